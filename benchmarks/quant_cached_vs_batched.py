"""How far a cached single-token step (what `collide invert` verifies with) is from the padded batched forward
(what wrote the store) under a quantized forward: the max relative L2 gap per level, which the ε rule must cover.

usage: python benchmarks/quant_cached_vs_batched.py [model=smollm2] [n=8] [layers=7,15,30]
Prints one line per (level, layer): max and median of ‖cached − batched‖ / ‖batched‖ over every position.
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

    base = OmegaConf.to_container(OmegaConf.load(files("collide") / "conf" / "model" / f"{args.get('model', 'smollm2')}.yaml"))
    from collide.corpus import iter_prompts
    from collide.config import CorpusConfig

    for level in ("none", "int8", "int4"):
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
        for k in layers:
            r = torch.tensor(rel[k])
            print(f"{level} layer {k}: max {float(r.max()):.3g} median {float(r.median()):.3g} "
                  f"positions {len(r)} over 1e-4: {int((r > 1e-4).sum())}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
