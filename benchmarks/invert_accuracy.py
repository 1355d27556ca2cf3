"""Exactness and cost of ``collide invert`` on a real model: prose and random-id prompts at chosen layers.

    .venv/bin/python -m benchmarks.invert_accuracy --model smollm2 --layers 7,15,30 --prose 50 --random 10 \\
        --threads 2 --out benchmarks/results/invert-smollm2.json

Prompts come from ``benchmarks/suite/invert_texts.py`` (stdlib module docstrings, text no lens is fit
on; uniform random ids). Targets are the states of a plain unpadded transformers forward. Per layer
and kind: prompts recovered exactly (up to identical rows), mean candidates verified per searched
position, seconds per prompt (wall, and CPU seconds of this process, which on a machine shared with
other jobs is closer to what the prompt costs; the one-time lens fit is reported apart).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layers", default="7,15,30", help="comma list; 'L/4' style not accepted, give indices")
    ap.add_argument("--prose", type=int, default=50)
    ap.add_argument("--random", type=int, default=10)
    ap.add_argument("--random-layers", default=None, help="layers for the random-id prompts (default: --layers)")
    ap.add_argument("--length", type=int, default=20)
    ap.add_argument("--policy", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--lens", action="append", default=[], help="layer:key=value lens settings, e.g. 30:table=false")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from collide.cli import compose
    from collide.config import InvertConfig
    from collide.invert.driver import first_token
    from collide.invert.sipit import Inverter
    from collide.models import load_model
    from benchmarks.suite.invert_texts import prose_prompts, random_prompts

    lm = load_model(compose("invert", ["-", f"model={args.model}"]).model)
    cfg = InvertConfig(source="-", policy=args.policy)
    bos = first_token(cfg, lm.tokenizer)
    layers = [int(k) for k in args.layers.split(",")]
    rlayers = layers if args.random_layers is None else [int(k) for k in args.random_layers.split(",")]
    prose = [ids for ids, _ in prose_prompts(lm.tokenizer, args.prose, args.length)]
    results = {"model": args.model, "policy": args.policy, "threads": args.threads, "bos": bos, "layers": {}}

    def states(ids, layer):
        with torch.no_grad():
            return lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0].float().numpy()

    for layer in sorted(set(layers) | set(rlayers)):
        t0 = time.perf_counter()
        from dataclasses import replace
        extra = dict(kv.split(":", 1)[1].split("=", 1) for kv in args.lens if int(kv.split(":", 1)[0]) == layer)
        typed = {k: (None if v == "None" else v == "true" if v in ("true", "false") else int(v)) for k, v in extra.items()}
        inverter = Inverter(lm, layer, replace(cfg, lens=replace(cfg.lens, **typed)), bos=bos)
        fit_s = time.perf_counter() - t0
        distinct = np.asarray(inverter.first_of_group)
        kinds = {}
        if layer in layers and prose:
            kinds["prose"] = prose
        if layer in rlayers and args.random:
            kinds["random"] = random_prompts(distinct, args.random, args.length, seed=layer, bos=bos)
        entry = {"lens_seconds": round(fit_s, 1), "lens": inverter.lens.info if inverter.lens else None}
        for kind, prompts in kinds.items():
            exact, tried, secs, cpu, worst = 0, [], [], [], []
            for ids in prompts:
                target = states(ids, layer)
                t1, c1 = time.perf_counter(), time.process_time()
                got = inverter.invert(target)
                secs.append(time.perf_counter() - t1)
                cpu.append(time.process_time() - c1)
                ok = len(got) == len(ids) and all(r.recovered and t in r.group for r, t in zip(got, ids))
                exact += ok
                tried += [r.tried for r in got if not r.known]
                worst.append(max(r.distance / r.epsilon for r in got))
                print(f"L{layer} {kind} {len(secs)}/{len(prompts)} exact={ok} tried/pos={np.mean([r.tried for r in got]):.0f}"
                      f" {secs[-1]:.1f}s cpu={cpu[-1]:.1f}s", flush=True)
            entry[kind] = {"prompts": len(prompts), "exact": exact, "mean_tried": float(np.mean(tried)),
                           "median_tried": float(np.median(tried)), "max_tried": int(np.max(tried)),
                           "seconds_per_prompt": float(np.mean(secs)), "max_seconds": float(np.max(secs)),
                           "cpu_seconds_per_prompt": float(np.mean(cpu)),
                           "max_distance_over_eps": float(np.max(worst))}
            print(f"L{layer} {kind}: {entry[kind]}", flush=True)
        results["layers"][layer] = entry
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
