"""What per-token activation scales do to the channels beside the massive ones: codes rounded to 0.

usage: python benchmarks/quant_massive.py [model=smollm2] [n=64] [blocks=0,4,8,...]

The first ``n`` distinct prompts of the default corpus run through the unquantized model, one prompt per
forward. At the input x of every linear layer of the blocks (what ``model.quant.activations`` quantizes),
per token: the largest |x_i| over the token's channels and the channel holding it, and the share of
channels whose code under ``collide.quant.fake_quant``'s per-token scale max|x| / Q would be 0
(|x_i| < max|x| / (2Q)), for int8 (Q = 127) and int4 (Q = 7). Per block and linear layer (q/k/v share
their input, as do gate/up) it prints the median share over tokens, the median max|x| over its
median |x_i|, and the channels that most often hold the max.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from itertools import islice

import numpy as np
import torch

from collide.cli import compose
from collide.corpus import iter_prompts
from collide.extract import DistinctPrompts
from collide.models import load_model
from collide.quant import quantized_linears


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    cfg = compose("run", [f"model={args.get('model', 'smollm2')}"])
    lm = load_model(cfg.model)
    n = int(args.get("n", 64))
    wanted = [int(b) for b in args["blocks"].split(",")] if "blocks" in args else list(range(0, lm.n_layers, 4))
    seen: dict[str, list] = defaultdict(list)  # "block.kind" -> per-token (argmax, share0 int8, share0 int4, ratio)

    def hook(name):
        def record(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().double()
            peak, where = x.max(dim=1)
            ratio = peak / x.median(dim=1).values.clamp_min(1e-30)
            zero = {q: (x < peak[:, None] / (2 * q)).double().mean(dim=1) for q in (127, 7)}
            seen[name] += zip(where.tolist(), zero[127].tolist(), zero[7].tolist(), ratio.tolist())
        return record

    handles, names = [], {}
    for name, module, _ in quantized_linears(lm.blocks):
        block, kind = name.split(".", 1)
        if int(block) in wanted and not kind.endswith(("k_proj", "v_proj", "up_proj")):  # they share an input
            names[name] = f"{block}.{kind.rsplit('.', 1)[-1]}"
            handles.append(module.register_forward_pre_hook(hook(names[name])))
    prompts = islice(DistinctPrompts(iter_prompts(cfg.corpus, lm.tokenizer)), n)
    with torch.no_grad():
        for _, tokens, _ in prompts:
            lm.model(input_ids=torch.tensor([list(tokens)], device=lm.device))
    for h in handles:
        h.remove()
    print(f"{lm.name}: {n} prompts; per linear input, median over tokens")
    for name in names.values():
        rows = np.array([r[1:] for r in seen[name]])
        top = Counter(r[0] for r in seen[name]).most_common(2)
        print(f"block {name}: codes 0 at int8 {np.median(rows[:, 0]):.3f}, at int4 {np.median(rows[:, 1]):.3f}; "
              f"max/median |x| {np.median(rows[:, 2]):.3g}; max at channel "
              + ", ".join(f"{c} ({k / len(rows):.0%})" for c, k in top))


if __name__ == "__main__":
    main(sys.argv[1:])
