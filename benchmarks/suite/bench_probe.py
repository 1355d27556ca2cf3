"""asv benchmark of the future-token probe (``collide.experiments.probe``): its cost over the Gram matrices it needs.

Synthetic prompts shaped like the SmolLM2 target (2,000 prompts of 9..33 tokens, BOS included,
d=576, 5 layers, taus 1..4; tiny: 100 prompts, d=32, 2 layers; full: 8,000 prompts): Zipf-
distributed token ids over a 49,152-token vocabulary, and states holding a noisy embedding of the
token at t and of the token at t+1. ``probe_states`` (split, baselines, standardisation, two ridge
fits per layer and tau, validation over 6 strengths, test scoring) is timed against the floor of
any closed-form probe: one fp32 Gram matrix X^T X over every position of every layer, tau pair
(``torch.mm``), in the same run. ``track_probe_time_vs_gram`` = probe seconds / Gram seconds,
lower is better; best of 2 each. The probe's accuracy is a test (tests/experiments/test_probe.py).
"""

from __future__ import annotations

import numpy as np

from .common import best_time, pick


def synthetic(n_prompts: int, d: int, layers: list[int], seed: int = 0):
    """(token ids per prompt, layer_states(k)) with Zipf tokens and states that encode tokens t and t+1."""
    rng = np.random.default_rng(seed)
    vocab = 49_152
    tokens = [np.concatenate([[1], np.minimum(rng.zipf(1.3, rng.integers(8, 33)), vocab - 1)])
              for _ in range(n_prompts)]
    emb = rng.standard_normal((vocab, d), dtype=np.float32)
    states = {}
    for k in layers:
        noise = [rng.standard_normal((len(t), d), dtype=np.float32) for t in tokens]
        states[k] = [emb[t] + 0.5 * emb[np.concatenate([t[1:], [0]])] + 2 * e for t, e in zip(tokens, noise)]
    return tokens, lambda k: enumerate(states[k])


def measure() -> dict[str, float]:
    """{ratio name: value} of the module docstring (one measurement)."""
    import torch

    from collide.config import ProbeConfig
    from collide.experiments.probe import probe_states

    n_prompts, d, layers = pick((100, 32, [0, 1]), (2000, 576, [0, 8, 16, 24, 30]), (8000, 576, [0, 8, 16, 24, 30]))
    cfg = ProbeConfig(source="bench")
    tokens, layer_states = synthetic(n_prompts, d, layers)
    x = torch.from_numpy(np.concatenate([s for _, s in layer_states(layers[0])]))

    def grams():
        for _ in range(len(layers) * len(cfg.taus)):
            torch.mm(x.T, x)

    t_probe = best_time(lambda: probe_states(tokens, np.arange(n_prompts), layer_states, layers, d, cfg), 2)
    t_gram = best_time(grams, 2)
    return {"probe_time_vs_gram": t_probe / t_gram}


class Probe:
    """The ratio of the module docstring, measured once in ``setup_cache``."""

    unit = "ratio"
    rounds = 1
    repeat = 1
    number = 1
    timeout = 600

    def setup_cache(self):
        return measure()

    setup_cache.timeout = 600

    def track_probe_time_vs_gram(self, cache):
        return cache["probe_time_vs_gram"]
