"""asv benchmark of the exhaustive continuation test's engine (``collide.continuations``).

``track_cached_time_vs_full``: seconds per continuation of prefix+t computed as one batched
single-token step against the prefix's KV cache / seconds per continuation of full forwards of
every prefix+t (lower is better; target <= 1 / 20). The embedded SmolLM2-135M (V=49152) at its last
layer on a 33-token prompt (about the corpus' longest window); 1024 cached continuations in one step
against 32 full forwards of 34 tokens (full: 2048 against 64, the size of an extraction batch);
tiny: the tests' tiny random Llama on 33 bytes. The value is the median over 3 back-to-back rounds
(full: 5) of the per-round ratio, so that load changes between rounds cancel out.

That both paths give the same states, and that a planted duplicate embedding row collides at
every layer, are tests (tests/exhaustive/test_exhaustive.py). The GPU run of the whole test on a Gemma-3
270M-shaped model is in ``make gpu-check`` (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import numpy as np

from .common import pick, smollm2, tiny_llama, timed

PREFIX_TOKENS = 33  # the default corpus' longest window (max_tokens=32, plus BOS where a tokenizer adds one)
PREFIX_TEXT = ("The paper argues that decoder-only transformer language models map distinct prompts to distinct "
               "hidden states, so that the prompt can always be recovered exactly from the hidden states of the "
               "model at any layer")


def measure() -> dict[str, float]:
    """{"cached_time_vs_full": value} (one measurement, see the module docstring)."""
    from collide.continuations import continuation_states, full_forward_states

    if pick(True, False, False):
        lm = tiny_llama()
        prefix = [256] + list(PREFIX_TEXT.encode()[:PREFIX_TOKENS - 1])
    else:
        lm = smollm2()
        prefix = lm.tokenizer(PREFIX_TEXT)["input_ids"][:PREFIX_TOKENS]  # as the corpus tokenizes a window
    layer = [lm.n_layers]
    n_cached, n_full, rounds = pick((256, 16, 3), (1024, 32, 3), (2048, 64, 5))
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    tokens = np.random.default_rng(0).choice(vocab, n_cached, replace=False)
    list(continuation_states(lm, prefix, tokens[:64], layer, batch_size=64))  # warm-up of both paths
    list(full_forward_states(lm, prefix, tokens[:8], layer, batch_size=8))
    per_round = []
    for _ in range(rounds):
        cached_s, _ = timed(lambda: list(continuation_states(lm, prefix, tokens, layer, batch_size=n_cached)))
        full_s, _ = timed(lambda: list(full_forward_states(lm, prefix, tokens[:n_full], layer, batch_size=n_full)))
        per_round.append((cached_s / n_cached) / (full_s / n_full))
    return {"cached_time_vs_full": float(np.median(per_round))}


class Continuations:
    """The ratio of the module docstring, measured once in ``setup_cache``."""

    unit = "ratio"
    rounds = 1
    repeat = 1
    number = 1
    timeout = 600

    def setup_cache(self):
        return measure()

    setup_cache.timeout = 600

    def track_cached_time_vs_full(self, cache):
        return cache["cached_time_vs_full"]
