"""How far a cached single-token step (what `collide invert` verifies with) is from the padded batched forward
(what wrote the store) under a quantized forward: the max relative L2 gap per level, which the ε rule must cover.

usage: python benchmarks/quant_cached_vs_batched.py [model=smollm2] [n=8] [layers=7,15,30] [levels=none,int8,int4]
                                                   [candidates=0] [invert_prompts=2]
Prints one line per (level, layer): max and median of ‖cached − batched‖ / ‖batched‖ over every position.
With candidates=K > 0 it also checks what `collide invert` would decide at each position of the first
``invert_prompts`` prompts (deepest layer given): the states of the true token and of K random other tokens
after the true prefix (cached steps), against the batched target and the ε rule of collide.invert.sipit
(with the level's QUANT_RTOL): is the true token within ε, is it the nearest, how many others are within ε
(ties), and the nearest other token's distance over ‖target‖.
"""

from __future__ import annotations

import sys

import torch

from collide.config import ModelConfig, QuantConfig
from collide.continuations import GrowingPrefix
from collide.models import all_token_states, load_model


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    n, layers = int(args.get("n", 8)), [int(k) for k in args.get("layers", "7,15,30").split(",")]
    from omegaconf import OmegaConf
    from importlib.resources import files

    yaml = files("collide") / "conf" / "model" / f"{args.get('model', 'smollm2')}.yaml"
    base = OmegaConf.to_container(OmegaConf.load(yaml))
    from collide.corpus import iter_prompts
    from collide.config import CorpusConfig

    from collide.invert.sipit import epsilon_rule

    K, n_inv = int(args.get("candidates", 0)), int(args.get("invert_prompts", 2))
    for level in args.get("levels", "none,int8,int4").split(","):
        lm = load_model(ModelConfig(**base, quant=QuantConfig(activations=level)))
        prompts = []
        for p in iter_prompts(CorpusConfig(name="stdlib-docs", kind="stdlib-docs", min_tokens=8, max_tokens=16),
                              lm.tokenizer):
            prompts.append(list(p.token_ids))
            if len(prompts) == n:
                break
        T = max(map(len, prompts))
        pad = lm.tokenizer.pad_token_id or 0
        ids = torch.tensor([p + [pad] * (T - len(p)) for p in prompts])
        mask = torch.tensor([[1] * len(p) + [0] * (T - len(p)) for p in prompts])
        batched = all_token_states(lm, ids, mask, layers)
        rel = {k: [] for k in layers}
        for b, p in enumerate(prompts):
            prefix = GrowingPrefix(lm)
            for t, token in enumerate(p):
                got = prefix.states(torch.tensor([token]), layers)
                for k in layers:
                    ref = batched[k][b, t].double()
                    rel[k].append(float((got[k][0].double() - ref).norm() / ref.norm()))
                prefix.append(token)
        if K:
            k = max(layers)
            gen = torch.Generator().manual_seed(0)
            within = nearest = ties = positions = 0
            margins = []
            for b, p in enumerate(prompts[:n_inv]):
                prefix = GrowingPrefix(lm)
                for t, token in enumerate(p):
                    others = torch.randperm(len(lm.tokenizer), generator=gen)[:K]
                    others = others[others != token]
                    cand = torch.cat([torch.tensor([token]), others])
                    got = prefix.states(cand, [k])[k].double()
                    target = batched[k][b, t].double()
                    dist = (got - target).norm(dim=1)
                    eps = epsilon_rule(float(target.norm()), target.shape[0], lm.dtype, "fp32", level)
                    positions += 1
                    within += int(dist[0] <= eps)
                    nearest += int(dist[0] < dist[1:].min())
                    ties += int((dist[1:] <= eps).sum())
                    margins.append(float(dist[1:].min() / target.norm()))
                    prefix.append(token)
            m = torch.tensor(margins)
            print(f"{level} layer {k} invert check ({K} random candidates): true token within eps at {within}/"
                  f"{positions} positions, nearest at {nearest}/{positions}, other tokens within eps: {ties}, "
                  f"nearest other / norm: min {float(m.min()):.3g} median {float(m.median()):.3g}", flush=True)
        for k in layers:
            r = torch.tensor(rel[k])
            print(f"{level} layer {k}: max {float(r.max()):.3g} median {float(r.median()):.3g} "
                  f"positions {len(r)} over 1e-4: {int((r > 1e-4).sum())}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
