"""Exactness, wrong claims and cost of ``collide invert`` on a real model: prose and random-id prompts at chosen layers.

    .venv/bin/python -m benchmarks.invert_accuracy --model smollm2 --layers 7,15,30 --prose 50 --random 10 \\
        --threads 2 --out benchmarks/results/invert-smollm2.json
    .venv/bin/python -m benchmarks.invert_accuracy --layers 15 --prose 10 --random 0 --dump bf16-forward
    .venv/bin/python -m benchmarks.invert_accuracy --layers 15 --prose 5 --random 0 --quant int8
    python3 -m benchmarks.invert_accuracy --layers 15 --prose 10 --random 0 --device cuda   # make gpu-check

Prompts come from ``benchmarks/suite/invert_texts.py`` (stdlib module docstrings, text no lens is fit
on; uniform random ids). Targets (``--dump``): ``fp32``, the states of a plain unpadded fp32 transformers
forward; ``bf16``, the same rounded to bf16 (stored bf16); ``bf16-forward``, the states of a bf16 forward of
the same weights, stored bf16. ``--quant int8|int4``: the model's activations are quantized
(``model.quant.activations``) for the targets (one batched forward of all prompts, as extraction does) and
for the inversion. The inversion always runs the model in fp32 with ``epsilon`` (default auto: the noise
measured on the known first rows widens ε_noise, ``collide.invert.locate.measure_noise``).

Per layer and kind: prompts recovered exactly (up to identical rows), wrong claims (positions recovered or
unique with a token that is not the true one), tied and missed positions, mean candidates verified per
searched position, seconds per prompt with the model loaded and the lens ready (wall, and this process's CPU
seconds); the lens read or fit is reported apart (``lens_seconds``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def targets(lm_states, ids_list: list[list[int]], layer: int, dump: str) -> list[np.ndarray]:
    """(T, d) float32 states of each prompt at ``layer`` from ``lm_states`` (an fp32 or bf16 model), as ``dump``
    says: fp32 as computed, bf16 rounded to bf16 (then widened exactly)."""
    from collide.models import all_token_states

    ids = torch.tensor(ids_list, device=lm_states.device)
    with torch.no_grad():
        got = all_token_states(lm_states, ids, torch.ones_like(ids), [layer])[layer]
    if dump != "fp32":
        got = got.bfloat16()
    return [x.float().cpu().numpy() for x in got]


def run_kind(inverter, prompts: list[list[int]], states: list[np.ndarray], label: str) -> dict:
    exact, tried, secs, cpu, worst, wrong_rec, wrong_uni, tied, missed = 0, [], [], [], [], 0, 0, 0, 0
    for ids, target in zip(prompts, states):
        t1, c1 = time.perf_counter(), time.process_time()
        got = inverter.invert(target)
        secs.append(time.perf_counter() - t1)
        cpu.append(time.process_time() - c1)
        ok = len(got) == len(ids) and all(r.recovered and t in r.group for r, t in zip(got, ids))
        exact += ok
        tried += [r.tried for r in got if not r.known]
        worst.append(max(r.distance / r.epsilon for r in got))
        wrong_rec += sum(r.recovered and t not in r.group for r, t in zip(got, ids))
        wrong_uni += sum(r.unique and t not in r.group for r, t in zip(got, ids))
        tied += sum(bool(r.ties) for r in got)
        missed += sum(not r.recovered for r in got)
        print(f"{label} {len(secs)}/{len(prompts)} exact={ok} tried/pos={np.mean([r.tried for r in got]):.0f}"
              f" {secs[-1]:.2f}s cpu={cpu[-1]:.2f}s", flush=True)
    return {"prompts": len(prompts), "exact": exact, "wrong_recovered": wrong_rec, "wrong_unique": wrong_uni,
            "tied_positions": tied, "missed_positions": missed, "mean_tried": float(np.mean(tried)),
            "median_tried": float(np.median(tried)), "max_tried": int(np.max(tried)),
            "seconds_per_prompt": float(np.mean(secs)), "max_seconds": float(np.max(secs)),
            "cpu_seconds_per_prompt": float(np.mean(cpu)), "max_distance_over_eps": float(np.max(worst))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layers", default="7,15,30", help="comma list of HF hidden_states indices")
    ap.add_argument("--prose", type=int, default=50)
    ap.add_argument("--random", type=int, default=10)
    ap.add_argument("--random-layers", default=None, help="layers for the random-id prompts (default: --layers)")
    ap.add_argument("--length", type=int, default=20)
    ap.add_argument("--policy", default="auto")
    ap.add_argument("--epsilon", default="auto")
    ap.add_argument("--dump", default="fp32", choices=["fp32", "bf16", "bf16-forward"])
    ap.add_argument("--quant", default="none", choices=["none", "int8", "int4"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    ap.add_argument("--device", default="auto", help="model.device: auto (cuda if present), cpu, cuda")
    ap.add_argument("--out", default=None)
    ap.add_argument("--lens", action="append", default=[], help="layer:key=value lens settings, e.g. 30:table=false")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from dataclasses import replace

    from benchmarks.suite.invert_texts import prose_prompts, random_prompts
    from collide.cli import compose
    from collide.invert.config import InvertConfig
    from collide.invert.driver import applied_noise, first_token
    from collide.invert.locate import measure_noise
    from collide.invert.sipit import Inverter
    from collide.models import load_model

    overrides = ["-", f"model={args.model}", f"model.device={args.device}"] + (
        [f"model.quant.activations={args.quant}"] if args.quant != "none" else [])
    model_cfg = compose("invert", overrides).model
    lm = load_model(model_cfg)
    lm_states = load_model(replace(model_cfg, dtype="bf16")) if args.dump == "bf16-forward" else lm
    cfg = InvertConfig(source="-", policy=args.policy, epsilon=args.epsilon)
    bos = first_token(cfg, lm.tokenizer)
    layers = [int(k) for k in args.layers.split(",")]
    rlayers = layers if args.random_layers is None else [int(k) for k in args.random_layers.split(",")]
    prose = [ids for ids, _ in prose_prompts(lm.tokenizer, args.prose, args.length)]
    results = {"model": args.model, "device": str(lm.device), "policy": args.policy,
               "threads": torch.get_num_threads(), "bos": bos,
               "dump": args.dump, "quant": args.quant, "epsilon": args.epsilon, "layers": {}}
    stored = "fp32" if args.dump == "fp32" else "bf16"
    for layer in sorted(set(layers) | set(rlayers)):
        t0 = time.perf_counter()
        extra = dict(kv.split(":", 1)[1].split("=", 1) for kv in args.lens if int(kv.split(":", 1)[0]) == layer)
        typed = {k: (None if v == "None" else v == "true" if v in ("true", "false") else int(v)) for k, v in extra.items()}
        inverter = Inverter(lm, layer, replace(cfg, lens=replace(cfg.lens, **typed)), bos=bos, stored_dtype=stored)
        lens_s = time.perf_counter() - t0
        distinct = np.asarray(inverter.first_of_group)
        kinds = {}
        if layer in layers and prose:
            kinds["prose"] = prose
        if layer in rlayers and args.random:
            kinds["random"] = random_prompts(distinct, args.random, args.length, seed=layer, bos=bos)
        entry = {"lens_seconds": round(lens_s, 1), "lens": inverter.lens.info if inverter.lens else None}
        for kind, prompts in kinds.items():
            states = targets(lm_states, prompts, layer, args.dump)
            noise = measure_noise(inverter, np.stack([s[:2] for s in states[:4]]))
            inverter.noise = applied_noise(cfg, lm, noise)
            entry[kind] = {"noise": noise["relative"], **run_kind(inverter, prompts, states, f"L{layer} {kind}")}
            print(f"L{layer} {kind}: {entry[kind]}", flush=True)
        results["layers"][layer] = entry
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
