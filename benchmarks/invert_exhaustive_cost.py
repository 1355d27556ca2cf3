"""Cost per position of ``collide invert policy=exhaustive`` on SmolLM2: position 0 (the table) and position 1.

    .venv/bin/python -m benchmarks.invert_exhaustive_cost --layer 7 --threads 1

The first ``--tokens`` tokens (default 2) of a prose prompt (``benchmarks/suite/invert_texts.py``), batch 1024; prints per position the
seconds, the candidates compared, the margin Δ and whether it is certified.
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=2, help="positions to invert (1 = position 0 only: the table)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from collide.cli import compose
    from collide.invert.config import InvertConfig
    from collide.invert.sipit import Inverter
    from collide.models import load_model
    from benchmarks.suite.invert_texts import prose_prompts

    lm = load_model(compose("invert", ["-", "model=smollm2"]).model)
    ids = prose_prompts(lm.tokenizer, 1)[0][0][:args.tokens]
    with torch.no_grad():
        target = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[args.layer][0]
    inverter = Inverter(lm, args.layer, InvertConfig(source="-", policy="exhaustive", batch=1024))
    for r in inverter.invert(target.numpy()):
        print(f"position {r.position}: token {r.token} (true {ids[r.position]}) {r.seconds:.2f} s, compared {r.tried}, "
              f"margin {r.margin:.4g}, eps {r.epsilon:.3g}, certified {r.certified}", flush=True)


if __name__ == "__main__":
    main()
