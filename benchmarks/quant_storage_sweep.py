"""Where does storage quantization create collisions? A lossless store's states, stored as int8 / int4.

usage: python benchmarks/quant_storage_sweep.py STORE [layers=all] [threshold=1e-6] [out=FILE.json]

STORE is a complete store of an unquantized forward (fp32, bf16 or fp16 storage: its states are the
model's). For every storage dtype (int8, int4) and scale granularity (row, tensor) the states are
encoded shard by shard exactly as ``collide run store.dtype=... store.quant_granularity=...`` would
write them (``collide.store.layout.encode_states`` on each shard's rows: the tensor scale covers one
layer of one shard), decoded (exactly, ``collide.store.quantized``), and searched exactly
(``collide.search.min_pairwise``, certified). Per dtype, granularity and layer it prints:

- ``collisions``: pairs of distinct prompts under the threshold (every one of them is at distance 0:
  two stored rows are either equal or at least one step apart), and ``rows``: the prompts in one;
- ``distinct``: distinct stored rows among the valid ones;
- ``min``: the exact min L2, and ``rel``: it over the median stored ‖h‖;
- ``zero``: the median share of a row's codes that are 0;
- ``err``: the median ‖q(h) − h‖ / ‖h‖ of the rounding.

The lossless store's own search is printed first (``stored``). ``out=`` writes every figure as JSON.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from collide.layers import parse_layers
from collide.search import min_pairwise
from collide.store import decode_states, encode_states, open_store
from collide.store.quantized import BITS

SCHEMES = [(dtype, granularity) for dtype in BITS for granularity in ("row", "tensor")]


def stored(store, k: int, dtype: str, granularity: str) -> tuple[np.ndarray, np.ndarray]:
    """(decoded float32 states, codes-are-zero share per row) of layer k as a (dtype, granularity) store holds it."""
    _, x = store.layer(k)
    out, zero, start = np.empty_like(x), np.empty(len(x)), 0
    for shard in store.shards:
        rows = slice(start, start + int(shard["rows"]))
        out[rows] = decode_states(encode_states(x[rows], dtype, granularity), dtype, d=store.d)
        with np.errstate(invalid="ignore"):
            zero[rows] = (out[rows] == 0).mean(axis=1)
        start = rows.stop
    return out, zero


def figures(x: np.ndarray, reference: np.ndarray, threshold: float, zero: np.ndarray | None) -> dict:
    """The figures of one layer's stored states ``x`` (module docstring)."""
    res = min_pairwise(x, threshold, nearest=False)
    valid = np.isfinite(x).all(axis=1)
    norm = np.median(np.linalg.norm(x[valid].astype(np.float64), axis=1))
    pairs = res.collisions
    in_pair = np.unique(np.concatenate([pairs.a, pairs.b])) if res.n_collisions else []
    ref = reference[valid].astype(np.float64)
    err = np.linalg.norm(x[valid] - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30)
    return {"collisions": res.n_collisions, "rows": len(in_pair), "distinct": len(np.unique(x[valid], axis=0)),
            "min": res.distance, "rel": res.distance / norm if norm else None, "certified": res.certified,
            "zero": float(np.median(zero[valid])) if zero is not None else float(np.median((x[valid] == 0).mean(1))),
            "err": float(np.median(err)), "invalid": int((~valid).sum()), "seconds": round(res.seconds, 2)}


def main(argv: list[str]) -> None:
    path, args = argv[0], dict(a.split("=", 1) for a in argv[1:])
    store = open_store(path)
    if store.dtype in BITS or not store.complete:
        raise SystemExit(f"{path}: a complete store of lossless storage (fp32, bf16, fp16) is needed")
    spec = args.get("layers", "all")
    layers = [k for k in parse_layers(spec.split(",") if "," in spec else spec, max(store.layers)) if k in store.layers]
    threshold = float(args.get("threshold", 1e-6))
    report = {"store": str(store.path), "n": store.n_rows, "d": store.d, "threshold": threshold, "layers": {}}
    tic = time.perf_counter()
    for k in layers:
        _, x = store.layer(k)
        row = {"stored": figures(x, x, threshold, None)}
        for dtype, granularity in SCHEMES:
            q, zero = stored(store, k, dtype, granularity)
            row[f"{dtype}/{granularity}"] = figures(q, x, threshold, zero)
        report["layers"][k] = row
        for name, r in row.items():
            rel = f"{r['rel']:.3g}" if r["rel"] is not None else "-"
            print(f"layer {k} {name}: collisions {r['collisions']} ({r['rows']} rows), distinct {r['distinct']}/"
                  f"{store.n_rows - r['invalid']}, min {r['min']:.4g}, rel {rel}, zero codes {r['zero']:.3f}, "
                  f"err {r['err']:.3g}, certified {r['certified']}", flush=True)
    report["seconds"] = round(time.perf_counter() - tic, 1)
    print(f"{len(layers)} layers in {report['seconds']} s")
    if "out" in args:
        with open(args["out"], "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
