"""Is a stored state a function of the prompt? The spread of each prompt's last-token state across batchings.

usage: python benchmarks/quant_batch_invariance.py [model=smollm2] [n=128] [levels=none,int8,int4]
                                                  [layers=all] [out=FILE.json] [threads=0]

The first ``n`` distinct prompts of the default corpus (stdlib-docs, windows of 8 to 32 tokens) are run
through the model, for each activation level (``model.quant.activations``), in these batchings:

- ``alone``: one prompt per forward, no padding (the reference);
- ``padded8``, ``padded64``: right-padded batches of 8 or 64 consecutive prompts (mixed lengths);
- ``extract``: what extraction did before one prompt per forward: length-bucketed right-padded
  batches under a 4096-token budget (``collide.extract.plan_batches``);
- ``same8``, ``same64``: batches of up to 8 or 64 prompts of the same length, no padding.

Per level and layer it prints the spread of each prompt's state: the largest L2 distance between two of
its batchings (``max``, ``median`` over prompts; relative = over the prompt's ‖h‖), the prompts whose states
are not bitwise equal across the batchings, those whose spread exceeds 1e-4 ‖h‖ (a rounding flip), and
which batchings equal ``alone`` bitwise for every prompt. ``out=`` writes every figure as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from itertools import islice

import numpy as np
import torch

from collide.cli import compose
from collide.corpus import iter_prompts
from collide.extract import DistinctPrompts, pad_batch, pad_id, plan_batches
from collide.layers import parse_layers
from collide.models import last_token_states, load_model


def batchings(lengths: np.ndarray) -> dict[str, list[np.ndarray]]:
    """{name: batches of row indices} (see the module docstring)."""
    n = len(lengths)
    rows = np.arange(n)
    order = np.argsort(lengths, kind="stable")
    same = {}
    for size in (8, 64):
        batches = []
        for length in np.unique(lengths):
            members = order[lengths[order] == length]
            batches += [members[i:i + size] for i in range(0, len(members), size)]
        same[size] = batches
    return {"alone": [rows[i:i + 1] for i in range(n)],
            "padded8": [rows[i:i + 8] for i in range(0, n, 8)],
            "padded64": [rows[i:i + 64] for i in range(0, n, 64)],
            "extract": plan_batches(lengths, 4096, 256),
            "same8": same[8], "same64": same[64]}


def states_of(lm, seqs: list, batches: list[np.ndarray], layers: list[int]) -> np.ndarray:
    """(layers, n, d) float64 last-token states of ``seqs`` computed in ``batches``."""
    out = np.empty((len(layers), len(seqs), lm.d))
    pad = pad_id(lm)
    for rows in batches:
        ids, mask = pad_batch([seqs[i] for i in rows], pad, lm.device)
        got = last_token_states(lm, ids, mask, layers)
        for slot, k in enumerate(layers):
            out[slot, rows] = got[k].double().cpu().numpy()
    return out


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    n, model = int(args.get("n", 128)), args.get("model", "smollm2")
    if int(args.get("threads", 0)):
        torch.set_num_threads(int(args["threads"]))
    report = {"model": model, "n": n, "threads": torch.get_num_threads(), "levels": {}}
    for level in args.get("levels", "none,int8,int4").split(","):
        cfg = compose("run", [f"model={model}", f"model.quant.activations={level}"])
        lm = load_model(cfg.model)
        spec = args.get("layers", "all")
        layers = parse_layers(spec.split(",") if "," in spec else spec, lm.n_layers)
        seqs = [tokens for _, tokens, _ in islice(DistinctPrompts(iter_prompts(cfg.corpus, lm.tokenizer)), n)]
        lengths = np.array([len(s) for s in seqs])
        got, seconds = {}, {}
        for name, batches in batchings(lengths).items():
            t0 = time.perf_counter()
            got[name] = states_of(lm, seqs, batches, layers)
            seconds[name] = round(time.perf_counter() - t0, 3)
        print(f"{level}: seconds per batching {seconds}", flush=True)
        names = list(got)
        stack = np.stack([got[name] for name in names])  # (batchings, layers, n, d)
        norm = np.linalg.norm(got["alone"], axis=-1)  # (layers, n)
        diameter = np.zeros_like(norm)
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                diameter = np.maximum(diameter, np.linalg.norm(stack[a] - stack[b], axis=-1))
        rel = diameter / np.where(norm > 0, norm, 1)
        per_layer = {}
        for slot, k in enumerate(layers):
            equal = [name for name in names if np.array_equal(got[name][slot], got["alone"][slot])]
            per_layer[k] = {"max": float(diameter[slot].max()), "median": float(np.median(diameter[slot])),
                            "rel_max": float(rel[slot].max()), "rel_median": float(np.median(rel[slot])),
                            "prompts_not_bitwise": int((diameter[slot] > 0).sum()),
                            "prompts_over_1e-4": int((rel[slot] > 1e-4).sum()),
                            "norm_median": float(np.median(norm[slot])), "bitwise_equal_to_alone": equal}
            r = per_layer[k]
            print(f"{level} layer {k}: spread max {r['max']:.3g} median {r['median']:.3g} (relative max "
                  f"{r['rel_max']:.3g} median {r['rel_median']:.3g}); not bitwise {r['prompts_not_bitwise']}/{n}, "
                  f"over 1e-4: {r['prompts_over_1e-4']}/{n}; bitwise = alone: {','.join(equal)}", flush=True)
        report["levels"][level] = {"seconds": seconds, "layers": per_layer}
    if "out" in args:
        with open(args["out"], "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
