"""asv benchmarks of the cost of exact nearest-neighbour distances.

The certified search reports every row's exact nearest-neighbour distance (``search.nearest``,
the default); without it, only the minimum and the collisions. Each ``track_*`` is the ratio of
the seconds of the search with ``nearest=True`` over the seconds with ``nearest=False`` on the
same rows in the same run (lower is better; target <= 1.15), CPU, the torch engine, threads = all
cores, best of interleaved repetitions:

- ``track_exact_nn_overhead_random``: ``min_pairwise`` on ``bench_search.llm_like`` rows (4 massive
  dimensions ~1500, norms ~3000), n=20000 (tiny: 1500), d=576;
- ``track_exact_nn_overhead_smollm2``: ``search_store`` over layers 1, 10, 20 and 30 of a store of
  the embedded SmolLM2-135M (d=576) on 1500 stdlib-docs prompts (tiny: 48; the corpus yields about
  2000 distinct prompts). Building the store (model load and extraction) takes a few minutes on 2 cores.

``nearest=False`` does less than the search before exact nearest neighbours did (that one
re-ranked each row's screened nearest neighbour once, an upper bound): the ratio overstates the
cost over it.
"""

from __future__ import annotations

from .bench_search import D, llm_like
from .common import interleaved_best, pick, threads

SMOLLM2_LAYERS = [1, 10, 20, 30]  # hidden_states indices searched in the SmolLM2 store


def random_overhead() -> float:
    """Seconds with nearest / seconds without, ``min_pairwise`` on llm_like rows (see the module docstring)."""
    from collide.search import min_pairwise

    n, reps, cores = pick(1500, 20000, 20000), pick(2, 2, 3), threads()
    x = llm_like(n, D, seed=3)
    best = interleaved_best({f"nearest={f}": (lambda f=f: min_pairwise(x, 1e-6, "torch", threads=cores, nearest=f))
                             for f in (True, False)}, reps)
    return best["nearest=True"] / best["nearest=False"]


def smollm2_overhead(n: int | None = None) -> float:
    """Seconds with nearest / seconds without, ``search_store`` over SMOLLM2_LAYERS of a store of the
    first ``n`` (default: by size) distinct stdlib-docs prompts of SmolLM2."""
    import tempfile
    from pathlib import Path

    from collide.config import ExtractConfig, SearchConfig, StoreConfig
    from collide.corpus import iter_prompts, load_corpus_config
    from collide.extract import extract_to_store
    from collide.search import search_store

    from .common import smollm2

    n, reps = n or pick(48, 1500, 1500), pick(2, 3, 3)
    lm = smollm2()
    with tempfile.TemporaryDirectory(prefix="collide_bench_exact_nn_") as tmp:
        # the whole stream: its first n prompts may hold duplicates, the store takes n distinct ones
        store = extract_to_store(lm, iter_prompts(load_corpus_config("stdlib-docs"), lm.tokenizer), SMOLLM2_LAYERS,
                                 Path(tmp) / "store", n, {"bench": "exact_nn", "n": n}, StoreConfig(shard_rows=256),
                                 ExtractConfig(batch_tokens=2048, progress=False))

        def search(nearest: bool):
            cfg = SearchConfig(progress=False, threads=threads(), nearest=nearest)
            return [search_store(store, k, 1e-6, cfg) for k in SMOLLM2_LAYERS]

        best = interleaved_best({"on": lambda: search(True), "off": lambda: search(False)}, reps)
    return best["on"] / best["off"]


class ExactNearestNeighbours:
    """The two overhead ratios of the module docstring, each measured once in ``setup_cache``."""

    unit = "ratio"
    rounds = 1
    repeat = 1
    number = 1
    timeout = 900

    def setup_cache(self):
        return {"random": random_overhead(), "smollm2": smollm2_overhead()}

    setup_cache.timeout = 900

    def track_exact_nn_overhead_random(self, cache):
        return cache["random"]

    def track_exact_nn_overhead_smollm2(self, cache):
        return cache["smollm2"]
