"""asv benchmarks of the pruned certified search (``search.prune=pca``, collide/search/prune.py).

Every ``track_*`` is a cost of ours over a baseline timed in the same run (seconds / seconds, lower
is better); every pruned result is checked against the brute-force one (minimum, pair, collisions,
nn distances, certified: identical, else the measurement fails). CPU, ``threads()`` cores for both
sides (``taskset -c 0`` gives single-threaded numbers). Ratios:

- ``d576_nearest_vs_brute``, ``d576_min_vs_brute``: pruned / brute force (the torch engine,
  ``prune="off"``) with ``nearest=True`` / ``False``, rows ``llm_states(n, 576)``, n=20000 (tiny: 3000);
  targets on real stores <= 1/3 and <= 1/10;
- ``d4096_nearest_vs_brute``, ``d4096_min_vs_brute``: the same at d=4096, n=5000 (full: 20000, tiny: 1000);
  targets <= 1/10 and <= 1/30;
- ``nearest_vs_faiss``, ``min_vs_faiss``: pruned (``nearest`` on / off) / a plain, uncertified FAISS
  ``IndexFlatL2`` k=2 self-search on the d=576 rows (skipped without faiss);
- ``min_vs_brute_n5000``, ``min_vs_brute_n100000`` (full only): how the speed-up grows with n
  (``nearest=False``; n=20000 is ``d576_min_vs_brute``);
- ``real_nearest_vs_brute``, ``real_min_vs_brute`` (full only): a SmolLM2-135M store of 20000
  stdlib-docs prompts (``common.smollm2_store``), layer 10; skipped when the corpus or the model is missing.

``llm_states(n, d, seed)`` (synthetic LLM-like states): cluster centres N(0, I) (one per 8 rows)
plus a per-row spread N(0, 0.5^2 s_i^2 I) with s_i lognormal(0, 0.5), every coordinate j then scaled
by 40 j^-0.45 (a power-law spectrum: the leading 16 / 64 / 128 / 256 directions hold 0.49 / 0.71 /
0.83 / 0.94 of the variance at d=576, as real SmolLM2 states do: 0.42-0.51 / 0.68-0.76 / 0.83-0.88 /
0.95-0.97), and 4 massive dimensions ~1500. The bound is rotation invariant, so no rotation is applied.
Each timing is the best of 1 (tiny, quick) or 2 (full) interleaved repetitions.
"""

from __future__ import annotations

import numpy as np

from .common import SkipNotImplemented, interleaved_best, pick, threads


def llm_states(n: int, d: int, seed: int) -> np.ndarray:
    """fp32 rows: clustered, power-law spectrum, 4 massive dimensions (see the module docstring)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(n // 8, 1), d), dtype=np.float32)
    x = centres[rng.integers(0, len(centres), n)]
    x += rng.standard_normal((n, d), dtype=np.float32) * (np.float32(0.5) * rng.lognormal(0.0, 0.5, (n, 1)).astype(
        np.float32))
    x *= np.arange(1, d + 1, dtype=np.float32) ** np.float32(-0.45) * np.float32(40.0)
    x[:, rng.choice(d, 4, replace=False)] += rng.normal(1500.0, 30.0, size=(n, 4)).astype(np.float32)
    return x


def _same(a, b) -> None:
    if (a.distance, a.pair, a.certified) != (b.distance, b.pair, b.certified) or a.collisions != b.collisions \
            or not np.array_equal(a.nn_distance, b.nn_distance, equal_nan=True):
        raise AssertionError("the pruned search disagrees with the brute force")


def compare(x: np.ndarray, nearest: bool, reps: int, figures: dict, name: str, faiss_too: bool = False) -> dict:
    """{"brute": s, "pruned": s[, "faiss": s]} best wall seconds on rows x; results checked equal."""
    from collide.search import min_pairwise

    cores = threads()
    out = {}
    fns = {"brute": lambda: out.__setitem__("brute", min_pairwise(x, 1e-6, "torch", threads=cores, nearest=nearest,
                                                                  prune="off")),
           "pruned": lambda: out.__setitem__("pruned", min_pairwise(x, 1e-6, "torch", threads=cores,
                                                                    nearest=nearest, prune="pca"))}
    if faiss_too:
        try:
            import faiss

            faiss.omp_set_num_threads(cores)

            def faiss_k2():
                index = faiss.IndexFlatL2(x.shape[1])
                index.add(x)
                return index.search(x, 2)

            fns["faiss"] = faiss_k2
        except ImportError:
            pass
    best = interleaved_best(fns, reps)
    _same(out["brute"], out["pruned"])
    figures[name] = {"n": len(x), "d": x.shape[1], "nearest": nearest, **{f"{k}_s": v for k, v in best.items()},
                     "prune": out["pruned"].prune}
    return best


def real_rows(n: int, layer: int = 10) -> np.ndarray:
    """Layer ``layer`` of a SmolLM2 store of n stdlib-docs prompts, built in a temporary directory."""
    import tempfile
    from pathlib import Path

    from .common import smollm2_store

    with tempfile.TemporaryDirectory(prefix="collide_bench_prune_") as tmp:
        store = smollm2_store(Path(tmp) / "store", n, [layer])
        return np.asarray(store.layer(layer)[1], np.float32)


def measure() -> tuple[dict[str, float], dict]:
    """({ratio name: value}, {figure name: seconds and prune records}) of the module docstring."""
    reps, figures, out = pick(1, 1, 2), {}, {}
    n = pick(3000, 20000, 20000)
    x = llm_states(n, 576, seed=0)
    for nearest, tag in ((True, "nearest"), (False, "min")):
        best = compare(x, nearest, reps, figures, f"d576_{tag}", faiss_too=True)
        out[f"d576_{tag}_vs_brute"] = best["pruned"] / best["brute"]
        if "faiss" in best:
            out[f"{tag}_vs_faiss"] = best["pruned"] / best["faiss"]
    x = llm_states(pick(1000, 5000, 20000), 4096, seed=1)
    for nearest, tag in ((True, "nearest"), (False, "min")):
        best = compare(x, nearest, reps, figures, f"d4096_{tag}")
        out[f"d4096_{tag}_vs_brute"] = best["pruned"] / best["brute"]
    for size in pick([1000], [5000], [5000, 100_000]):
        best = compare(llm_states(size, 576, seed=2), False, reps, figures, f"d576_min_n{size}")
        out[f"min_vs_brute_n{size}"] = best["pruned"] / best["brute"]
    if pick(False, False, True):
        try:
            x = real_rows(20000)
        except Exception as exc:  # noqa: BLE001 - a missing model or a short corpus skips the real ratios
            figures["real_skipped"] = str(exc)
        else:
            for nearest, tag in ((True, "nearest"), (False, "min")):
                best = compare(x, nearest, reps, figures, f"real_{tag}")
                out[f"real_{tag}_vs_brute"] = best["pruned"] / best["brute"]
    return out, figures


class PrunedSearch:
    """The ratios of the module docstring, measured once in ``setup_cache``."""

    unit = "ratio"
    rounds = 1
    repeat = 1
    number = 1
    timeout = 3600

    def setup_cache(self):
        return measure()[0]

    setup_cache.timeout = 3600

    def _get(self, cache: dict, name: str) -> float:
        if name not in cache:
            raise SkipNotImplemented(f"{name} is not measured here (faiss missing, or not the full size)")
        return cache[name]

    def track_d576_nearest_vs_brute(self, cache):
        return self._get(cache, "d576_nearest_vs_brute")

    def track_d576_min_vs_brute(self, cache):
        return self._get(cache, "d576_min_vs_brute")

    def track_d4096_nearest_vs_brute(self, cache):
        return self._get(cache, "d4096_nearest_vs_brute")

    def track_d4096_min_vs_brute(self, cache):
        return self._get(cache, "d4096_min_vs_brute")

    def track_nearest_vs_faiss(self, cache):
        return self._get(cache, "nearest_vs_faiss")

    def track_min_vs_faiss(self, cache):
        return self._get(cache, "min_vs_faiss")

    def track_min_vs_brute_n5000(self, cache):
        return self._get(cache, "min_vs_brute_n5000")

    def track_min_vs_brute_n100000(self, cache):
        return self._get(cache, "min_vs_brute_n100000")

    def track_real_nearest_vs_brute(self, cache):
        return self._get(cache, "real_nearest_vs_brute")

    def track_real_min_vs_brute(self, cache):
        return self._get(cache, "real_min_vs_brute")


if __name__ == "__main__":  # python -m benchmarks.suite.bench_prune: ratios and figures as JSON
    import json

    ratios, figs = measure()
    print(json.dumps({"ratios": ratios, "figures": figs}, indent=1, default=str))
