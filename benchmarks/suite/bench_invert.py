"""asv benchmark of ``collide.invert`` against the paper's own SIPIT procedure (``benchmarks.suite.paper_sipit``).

``track_candidate_time_vs_paper``: seconds per candidate token checked by collide's inverter
(one gradient step on the proxy with the prefix's KV cache, then ``batch`` candidates verified
in one batched single-token step) / seconds per candidate of the paper's procedure (forward +
backward + forward over the whole prefix, no cache, one candidate per iteration, ``allclose``),
both at one position after a real prefix, the same number of proposals each (lower is better;
target <= 0.1). Tiny: the tests' tiny random Llama, a 12-token prefix; quick/full: the embedded
SmolLM2-135M at layer L/2 after a 19-token stdlib-docs prefix.

``track_prompt_time_vs_paper`` (tiny only: on SmolLM2 the paper's procedure needs hours per
prompt here): seconds to invert a whole 8-token prompt, collide's gradient policy / paper.

``track_inexact_tokens``: share of the tokens of the tiny model's prompts (every layer) that
collide does not recover exactly (target 0; any other value is a regression).

The default policy (``auto``: the model's prior, two ridge lenses and the position-0 table,
verified in escalating batches) against the paper's gradient policy and the paper's procedure,
whole prompts of the evaluation prose (``invert_texts.prose_prompts``: stdlib module docstrings,
text no lens is fit on), inverted the same way by both sides:

``track_auto_candidates_vs_gradient``: mean candidates verified per searched position, auto /
gradient (target <= 0.1). ``track_auto_prompt_time_vs_gradient``: seconds per prompt, auto /
gradient (target <= 0.1). ``track_auto_prompt_time_vs_paper``: seconds per prompt, auto / the
paper's procedure (target <= 0.01); on SmolLM2 the paper's procedure is capped at ``PAPER_CAP``
proposals per position and stops at the first position it has not solved by then, so its time is
a lower bound and the ratio an upper bound. Tiny: the tiny Llama, 8-token prompts at its last
layer; quick: SmolLM2 at L/2, one prompt cut to 6 tokens; full: two 20-token prompts. The lens
is fit (or read from ``runs/lenses``) before the clock starts.
"""

from __future__ import annotations

import numpy as np
import torch

from .common import pick, smollm2, stdlib_prompts, tiny_llama, timed

TEXT = b"Injective maps"  # tiny prompts: the byte tokenizer's BOS then one token per byte


def _states(lm, ids, layer):
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0].numpy()


def measure() -> dict[str, float]:
    """Every ratio of the module docstring (one measurement each)."""
    from collide.invert.config import InvertConfig
    from collide.continuations import GrowingPrefix
    from .paper_sipit import invert_position, invert_prompt
    from collide.invert.sipit import Inverter

    tiny = pick(True, False, False)
    lm = tiny_llama() if tiny else smollm2()
    layer = lm.n_layers if tiny else lm.n_layers // 2
    ids = ([256] + list(TEXT[:12])) if tiny else list(stdlib_prompts(lm, 1)[0].token_ids)[:20]
    states = _states(lm, ids, layer)
    n = pick(64, 64, 128)  # proposals per side
    batch = pick(16, 64, 64)
    inverter = Inverter(lm, layer, InvertConfig(source="-", policy="gradient", batch=batch))
    prefix = GrowingPrefix(lm)
    for token in ids[:-1]:
        prefix.append(token)
    t = len(ids) - 1

    def ours():  # the policy and verifier of Inverter.position, for n proposals whatever they find
        target, tried = torch.from_numpy(states[t]).double(), inverter.duplicate.clone()
        gen = inverter._gradient_batches(prefix, tried, target, np.random.default_rng(0))
        done = 0
        while done < n:
            batch_ids = next(gen)
            tried[batch_ids] = True
            inverter._distances(prefix, batch_ids, target)
            done += len(batch_ids)
        return done

    ours_s, done = timed(ours)
    paper_s, res = timed(lambda: invert_position(lm, ids[:-1], states[t], layer, np.random.default_rng(0),
                                                 max_proposals=n))
    out = {"candidate_time_vs_paper": (ours_s / done) / (paper_s / res.proposals)}
    if tiny:
        short = ids[:8]
        short_states = _states(lm, short, layer)
        ours_s, got = timed(lambda: Inverter(lm, layer, InvertConfig(source="-", policy="gradient", batch=batch), bos=256)
                            .invert(short_states))
        paper_s, ref = timed(lambda: invert_prompt(lm, short_states, layer))
        assert [r.token for r in got] == [r.token for r in ref] == short
        out["prompt_time_vs_paper"] = ours_s / paper_s
        wrong = total = 0
        for k in range(lm.n_layers + 1):
            got = Inverter(lm, k, InvertConfig(source="-", batch=320), bos=256).invert(_states(lm, ids, k))
            wrong += sum(r.token != i for r, i in zip(got, ids)) + len(ids) - len(got)
            total += len(ids)
        out["inexact_tokens"] = wrong / total
    return out


PAPER_CAP = 256  # proposals per position of the paper's procedure on SmolLM2 (its time: a lower bound)


def measure_auto() -> dict[str, float]:
    """The auto-policy ratios of the module docstring (one measurement each, same prompts for every side)."""
    from collide.invert.config import InvertConfig
    from collide.invert.sipit import Inverter
    from .invert_texts import prose_prompts
    from .paper_sipit import invert_prompt

    tiny = pick(True, False, False)
    lm = tiny_llama() if tiny else smollm2()
    layer = lm.n_layers if tiny else lm.n_layers // 2
    bos = 256 if tiny else None
    if tiny:
        prompts = [[256] + list(text) for text in (b"Injectiv", b"A prompt")]
    else:
        prompts = [ids[:pick(8, 6, 20)] for ids, _ in prose_prompts(lm.tokenizer, pick(2, 1, 2))]
    auto = Inverter(lm, layer, InvertConfig(source="-"), bos=bos)  # fits or reads the lens first
    grad = Inverter(lm, layer, InvertConfig(source="-", policy="gradient", batch=pick(16, 64, 64)), bos=bos)
    sides = {"auto": (auto, [], []), "gradient": (grad, [], [])}
    paper_s, paper_solved = 0.0, True
    for ids in prompts:
        target = _states(lm, ids, layer)
        for name, (inverter, tried, secs) in sides.items():
            took, got = timed(lambda: inverter.invert(target))
            assert [r.token for r in got] == ids, (name, [r.token for r in got], ids)
            secs.append(took)
            tried += [r.tried for r in got if not r.known]
        took, ref = timed(lambda: invert_prompt(lm, target, layer, max_proposals=None if tiny else PAPER_CAP))
        paper_s += took
        paper_solved &= len(ref) == len(ids) and all(r.token is not None for r in ref)
    (_, a_tried, a_secs), (_, g_tried, g_secs) = sides["auto"], sides["gradient"]
    return {"auto_candidates_vs_gradient": float(np.mean(a_tried) / np.mean(g_tried)),
            "auto_prompt_time_vs_gradient": float(np.sum(a_secs) / np.sum(g_secs)),
            "auto_prompt_time_vs_paper": float(np.sum(a_secs) / paper_s),
            "auto_mean_tried": float(np.mean(a_tried)), "gradient_mean_tried": float(np.mean(g_tried)),
            "auto_seconds_per_prompt": float(np.mean(a_secs)), "gradient_seconds_per_prompt": float(np.mean(g_secs)),
            "paper_seconds_per_prompt": paper_s / len(prompts), "paper_solved": float(paper_solved)}


class Invert:
    """The ratios of the module docstring, measured once in ``setup_cache``."""

    unit = "ratio"
    rounds = 1
    repeat = 1
    number = 1
    timeout = 1800

    def setup_cache(self):
        return {**measure(), **measure_auto()}

    setup_cache.timeout = 1800

    def track_candidate_time_vs_paper(self, cache):
        return cache["candidate_time_vs_paper"]

    def track_prompt_time_vs_paper(self, cache):
        from .common import SkipNotImplemented

        if "prompt_time_vs_paper" not in cache:
            raise SkipNotImplemented("tiny size only: the paper's procedure takes hours per SmolLM2 prompt here")
        return cache["prompt_time_vs_paper"]

    def track_inexact_tokens(self, cache):
        from .common import SkipNotImplemented

        if "inexact_tokens" not in cache:
            raise SkipNotImplemented("tiny size only (every layer of the tiny Llama)")
        return cache["inexact_tokens"]

    track_inexact_tokens.unit = "tokens"  # a count: 0 is the right value

    def track_auto_candidates_vs_gradient(self, cache):
        return cache["auto_candidates_vs_gradient"]

    def track_auto_prompt_time_vs_gradient(self, cache):
        return cache["auto_prompt_time_vs_gradient"]

    def track_auto_prompt_time_vs_paper(self, cache):
        return cache["auto_prompt_time_vs_paper"]
