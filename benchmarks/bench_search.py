"""Benchmark of the certified search (collide.search): speed ratios measured in one run, exactness facts.

``python benchmarks/bench_search.py [--full] [--scale] [--gpu-only]`` prints the result as JSON.

CPU section (n=20000, d=576, LLM-like rows: norms ~3000 of which 4 massive dimensions ~1500, a
low-rank part and a per-row scale; the torch engine, threads = all cores, same for FAISS):
- ``certified_vs_faiss_time``: time of the certified ``min_pairwise`` / time of a plain, uncertified
  FAISS IndexFlatL2 self-search with k=2 on the same rows (target <= 0.6);
- ``roofline_fraction``: unique pairs/s of ``min_pairwise`` / sgemm roofline pairs/s, the roofline
  being the best of numpy and torch on a (4096, d) x (d, 4096) sgemm timed in the same run, at
  2 d flops per pair (target >= 0.7);
- ``speedup_vs_pdist``: time of scipy ``pdist`` (fp64, exact) + its min / time of ``min_pairwise``,
  n=5000 (target >= 20).
Each timing is the best of 2 (quick) or 3 (full) interleaved repetitions: the machine is shared.
Full mode adds ``out_of_core_vs_in_memory_time`` (search_store streaming blocks of 4096 rows from a
Parquet store vs min_pairwise on the array, n=40000). ``--scale``: n=200000, d=576 through a store
with block_rows=4096 (the layer, 440 MiB, never sits in memory whole: two blocks of 9 MiB and a
64 MiB tile): pairs/s and peak RSS.

GPU section (when CUDA is available; needs only numpy and torch, run it alone with ``--gpu-only``,
``PYTHONPATH=.``): n=100000 (quick: 50000), d=4096 random rows with 4 massive dimensions and a
planted pair at L2 1e-7, torch engine in fp32 (TF32 off) and tf32x3: seconds per layer, as the
ratio ``gpu_n*_{precision}_layer_time_vs_1p5s`` = (seconds scaled to n=1e5 by the pair count) / 1.5 s
(target <= 1 on an H100), the fp32 roofline fraction (cuBLAS sgemm 8192 x 4096 x 8192 timed in the
same run), certified, both precisions agree, planted pair found; ``--scale`` adds n=1e6.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from collide.search import min_pairwise

D = 576  # hidden size of the CPU section (SmolLM2-135M)
PLANTED = (1e-7, 5e-7, 2e-6)  # L2 distances of the planted pairs; the first two are collisions at 1e-6


def llm_like(n: int, d: int, seed: int) -> np.ndarray:
    """fp32 rows resembling residual-stream states: norms ~3000, 4 massive dims ~1500, low rank."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32) * np.float32(8.0)
    x += (rng.standard_normal((n, 24), dtype=np.float32) @ rng.standard_normal((24, d), dtype=np.float32)) * 3
    x *= rng.lognormal(0.0, 0.2, size=(n, 1)).astype(np.float32)
    x[:, rng.choice(d, 4, replace=False)] = rng.normal(1500.0, 30.0, size=(n, 4)).astype(np.float32)
    return x


def plant(x: np.ndarray, dim: int) -> dict[tuple[int, int], float]:
    """Copy three rows onto others, then set one coordinate apart by PLANTED; returns {pair: exact L2}."""
    n = len(x)
    pairs = {}
    for k, delta in enumerate(PLANTED):
        a, b = 11 + 7 * k, n - 1 - 5 * k
        x[b] = x[a]
        x[a, dim], x[b, dim] = 0.0, np.float32(delta)
        pairs[(a, b)] = float(np.float32(delta))
    return pairs


def _timed(f):
    tic = time.perf_counter()
    out = f()
    return time.perf_counter() - tic, out


def sgemm_rate(d: int, threads: int) -> float:
    """Best fp32 GEMM rate (flop/s) of numpy and torch on a (4096, d) x (d, 4096) product.

    Two distinct operands: numpy sends a @ a.T to a symmetric rank-k update, ~12% slower here,
    which would understate the roofline.
    """
    a, b = np.random.default_rng(0).standard_normal((2, 4096, d), dtype=np.float32)
    out = np.empty((4096, 4096), np.float32)
    at, bt, outt = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = min(min(_timed(lambda: np.matmul(a, b.T, out=out))[0], _timed(lambda: torch.mm(at, bt.T, out=outt))[0])
                   for _ in range(3))
    finally:
        torch.set_num_threads(saved)
    return 2.0 * 4096 * 4096 * d / best


def cpu_section(quick: bool, out: dict) -> None:
    import faiss
    from scipy.spatial.distance import pdist

    threads = len(os.sched_getaffinity(0))
    reps = 2 if quick else 3
    n = 20000
    x = llm_like(n, D, seed=0)
    planted = plant(x, dim=int(np.argmin(np.abs(x).mean(0))))
    faiss.omp_set_num_threads(threads)
    t_eng, t_faiss, rate, res = math.inf, math.inf, 0.0, None
    for _ in range(reps):  # interleaved, best of each
        rate = max(rate, sgemm_rate(D, threads))
        t, res = _timed(lambda: min_pairwise(x, 1e-6, "torch", threads=threads))
        t_eng = min(t_eng, t)

        def faiss_k2():
            index = faiss.IndexFlatL2(D)
            index.add(x)
            return index.search(x, 2)

        t, _ = _timed(faiss_k2)
        t_faiss = min(t_faiss, t)
    pairs = n * (n - 1) / 2
    roof = rate / (2 * D)
    found = {(i, j) for i, j, _ in res.collisions}

    t_fb, fb = _timed(lambda: min_pairwise(x, 1e-6, "faiss", threads=threads))  # the certified faiss backend

    x5 = llm_like(5000, D, seed=1)
    t_pd, t_e5, pd_min, r5 = math.inf, math.inf, None, None
    for _ in range(reps):
        t, pd_min = _timed(lambda: float(pdist(x5.astype(np.float64)).min()))
        t_pd = min(t_pd, t)
        t, r5 = _timed(lambda: min_pairwise(x5, 1e-6, "torch", threads=threads))
        t_e5 = min(t_e5, t)

    out["ratios"].update({
        "certified_vs_faiss_time": {"value": t_eng / t_faiss, "better": "lower", "target": 0.6},
        "roofline_fraction": {"value": pairs / t_eng / roof, "better": "higher", "target": 0.7},
        "speedup_vs_pdist": {"value": t_pd / t_e5, "better": "higher", "target": 20.0},
    })
    out["exact"].update({
        "certified": bool(res.certified and r5.certified and fb.certified),
        "faiss_backend_agrees": (fb.distance, fb.pair, fb.collisions) == (res.distance, res.pair, res.collisions),
        "planted_collisions_found": found == {p for p, dist in planted.items() if dist < 1e-6},
        "planted_min_distance": res.distance,
        "planted_min_pair": f"{res.pair[0]},{res.pair[1]}",
        "pdist_min_agrees": bool(abs(r5.distance - pd_min) <= 1e-12 * pd_min),
        "min_distance_n5000": r5.distance,
    })
    out["figures"].update({
        "threads": threads, "seconds_certified_n20000": t_eng, "seconds_faiss_k2_n20000": t_faiss,
        "seconds_certified_faiss_backend_n20000": t_fb,
        "seconds_pdist_n5000": t_pd, "seconds_certified_n5000": t_e5,
        "mpairs_per_s": pairs / t_eng / 1e6, "roofline_mpairs_per_s": roof / 1e6, "sgemm_gflops": rate / 1e9,
        "candidates_n20000": res.n_candidates,
        # the best speedup over pdist that any engine screening every pair with an fp32 GEMM could
        # reach here: roofline pairs/s / pdist pairs/s (pdist is single-threaded fp64)
        "pdist_speedup_ceiling": roof / (5000 * 4999 / 2 / t_pd),
    })


def write_store(path: Path, n: int, d: int, seed: int, shard_rows: int = 8192):
    """A one-layer store of llm_like rows (layer 7), written shard by shard (bounded memory)."""
    from collide.store import StoreWriter, prompt_table

    header = dict(model=dict(name="bench"), dtype="fp32", final_norm="post", layer_convention="bench",
                  layers=[7], d=d, n_layers=7, n_prompts=n, keep_text=False, shard_rows=shard_rows,
                  batch_tokens=0, max_batch_size=1)
    writer = StoreWriter.open(path, {"bench": seed, "n": n}, header)
    for first in range(0, n, shard_rows):
        rows = min(shard_rows, n - first)
        states = llm_like(rows, d, seed=seed * 1_000_003 + first)
        table = prompt_table(first, [[i] for i in range(first, first + rows)], ["bench"] * rows)
        writer.commit_shard(table, {7: states})
    return writer.finish()


class PeakRSS:
    """Context manager sampling this process's resident memory every 20 ms; ``.mib`` = the peak seen."""

    def __enter__(self):
        import threading

        import psutil

        self.mib, self._stop, proc = 0.0, threading.Event(), psutil.Process()

        def sample():
            while not self._stop.is_set():
                self.mib = max(self.mib, proc.memory_info().rss / 2**20)
                self._stop.wait(0.02)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def store_section(out: dict, n: int, block_rows: int, in_memory: bool) -> None:
    """search_store streaming a Parquet store; optionally against min_pairwise on the same array."""
    from collide.config import SearchConfig
    from collide.search import search_store

    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "store", n, D, seed=2)
        import psutil

        rss0 = psutil.Process().memory_info().rss / 2**20
        with PeakRSS() as peak:
            t_store, lr = _timed(lambda: search_store(store, 7, 1e-6, SearchConfig(block_rows=block_rows,
                                                                                     progress=False)))
        pairs = n * (n - 1) / 2
        out["exact"][f"store_n{n}_certified"] = lr.result.certified
        out["exact"][f"store_n{n}_min_distance"] = lr.result.distance
        out["figures"].update({f"store_n{n}_seconds": t_store, f"store_n{n}_mpairs_per_s": pairs / t_store / 1e6,
                               f"store_n{n}_peak_rss_mib": peak.mib, f"store_n{n}_rss_before_mib": rss0,
                               f"store_n{n}_layer_mib": n * D * 4 / 2**20})
        if in_memory:
            ids, x = store.layer(7)
            t_mem, res = _timed(lambda: min_pairwise(x, 1e-6, "torch", block_rows=block_rows))
            out["ratios"]["out_of_core_vs_in_memory_time"] = {"value": t_store / t_mem, "better": "lower",
                                                              "target": None}
            out["exact"][f"store_n{n}_matches_in_memory"] = (res.distance, res.pair) == (lr.result.distance,
                                                                                         lr.result.pair)


def gpu_rows(n: int, d: int, seed: int, device) -> torch.Tensor:
    """Random fp32 rows on the GPU: N(0, 1) plus 4 massive dims ~1000, a pair planted at L2 1e-7."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, generator=g, device=device)
    x[:, :4] += 1000.0 + 10.0 * torch.randn(n, 4, generator=g, device=device)
    x[n - 1] = x[3]
    x[3, 10], x[n - 1, 10] = 0.0, 1e-7
    return x


def gpu_section(quick: bool, scale: bool, out: dict) -> None:
    dev = torch.device("cuda")
    out["figures"]["gpu"] = torch.cuda.get_device_name(dev)
    d = 4096
    a = torch.randn(8192, d, device=dev)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.mm(a, a.T)
    torch.cuda.synchronize()
    t, _ = _timed(lambda: (torch.mm(a, a.T), torch.cuda.synchronize()))
    roof = 2.0 * 8192 * 8192 * d / t / (2 * d)  # fp32 roofline, unique pairs/s
    del a
    sizes = [50_000 if quick else 100_000] + ([1_000_000] if scale else [])
    for n in sizes:
        x = gpu_rows(n, d, seed=0, device=dev)
        pairs = n * (n - 1) / 2
        results = {}
        for precision in ("fp32", "tf32x3"):
            min_pairwise(x[:20000], 1e-6, "torch", precision=precision, block_rows=8192)  # warm-up
            torch.cuda.synchronize()
            t, res = _timed(lambda: min_pairwise(x, 1e-6, "torch", precision=precision, block_rows=16384))
            results[precision] = res
            out["figures"][f"gpu_n{n}_{precision}_seconds"] = t
            out["figures"][f"gpu_n{n}_{precision}_gpairs_per_s"] = pairs / t / 1e9
            out["figures"][f"gpu_n{n}_{precision}_candidates"] = res.n_candidates
            if precision == "fp32":
                out["ratios"][f"gpu_n{n}_fp32_roofline_fraction"] = {"value": pairs / t / roof, "better": "higher",
                                                                     "target": 0.7}
            at_1e5 = t * (1e5 * (1e5 - 1) / 2) / pairs  # seconds per layer scaled to n=1e5 (time ~ pairs)
            out["ratios"][f"gpu_n{n}_{precision}_layer_time_vs_1p5s"] = {"value": at_1e5 / 1.5, "better": "lower",
                                                                        "target": 1.0}
        a32, t32 = results["fp32"], results["tf32x3"]
        out["exact"][f"gpu_n{n}_certified"] = bool(a32.certified and t32.certified)
        out["exact"][f"gpu_n{n}_precisions_agree"] = (a32.distance, a32.pair, a32.collisions) == (
            t32.distance, t32.pair, t32.collisions)
        out["exact"][f"gpu_n{n}_planted_found"] = [c[:2] for c in a32.collisions] == [(3, n - 1)]
        del x
        torch.cuda.empty_cache()
    out["figures"]["gpu_fp32_roofline_gpairs_per_s"] = roof / 1e9


def run(quick: bool = True, scale: bool = False, gpu_only: bool = False) -> dict:
    """The benchmark dict (ratios, exact, figures); see the module docstring."""
    out: dict = {"ratios": {}, "exact": {}, "figures": {}}
    if not gpu_only:
        cpu_section(quick, out)
        if not quick:
            store_section(out, 40_000, 4096, in_memory=True)
        if scale:
            store_section(out, 200_000, 4096, in_memory=False)
    if torch.cuda.is_available():
        gpu_section(quick, scale, out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="nightly size (default: quick)")
    parser.add_argument("--quick", action="store_true", help="quick size (the default)")
    parser.add_argument("--scale", action="store_true", help="add n=200000 on CPU (store) and n=1e6 on GPU")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU section (needs numpy and torch)")
    args = parser.parse_args()
    print(json.dumps(run(quick=not args.full, scale=args.scale, gpu_only=args.gpu_only), indent=2))
