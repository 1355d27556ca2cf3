"""asv benchmarks of collide on Ray (``collide.cluster``): costs over the local path, timed in the same run.

Every ``track_*`` is a ratio of wall seconds (lower is better), on a local Ray instance of 2 CPUs
started inside a loopback-only network namespace (``tests.support.netns``; skipped where none
can be made, or without ray):

- ``extract_ray1_vs_local``: ``extract_to_store_ray`` with one worker of 2 CPUs / ``extract_to_store``
  (2 threads), tiny random Llama, all layers, 3000 prompts of 8-48 tokens (full: 30000, a few
  minutes; tiny: 200). Includes the worker's start and model load. Target <= 1 / 0.9;
- ``extract_ray2_vs_ray1``: two workers of 1 CPU / one worker of 2 CPUs. On this 2-core machine
  there is nothing to gain: it shows the cost of splitting, as measured (not a target);
- ``search_ray1_vs_local``: ``search_store_ray`` with one task of 2 threads in flight at a time /
  ``search_store`` (2 threads) of a one-layer store of LLM-like rows (``bench_search.write_store``),
  n=20000, d=576, panels of one 4096-row block: 5 panels, 15 tiles (full: n=60000, 15 panels, 120
  tiles, about a minute locally; tiny: n=1500, d=64). Target <= 1 / 0.9;
- ``search_ray2_vs_ray1``: two tasks of 1 thread in flight / one of 2 threads, as measured.

Equality of the Ray results with the local ones is a test (tests/cluster), not measured here. One
run each (a Ray job is not repeated: its start is part of its cost).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from .common import REPO, SkipNotImplemented, bench_size, pick, tiny_llama

CHILD_TIMEOUT_S = 3000  # the full size takes several minutes on 2 busy cores


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure_here() -> dict[str, float]:
    """The ratios of the module docstring, measured in this process (which must be inside the namespace)."""
    import dataclasses

    import ray

    from collide.cluster import extract_to_store_ray, search_store_ray
    from collide.config import ClusterConfig, ExtractConfig, SearchConfig, StoreConfig
    from collide.extract import extract_to_store
    from collide.search import search_store

    from .bench_extract import synthetic
    from .bench_search import write_store

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    lm = tiny_llama()
    prompts = synthetic(pick(200, 3000, 30000), 8, 48)
    layers = list(range(lm.n_layers + 1))
    store_cfg, extract_cfg = StoreConfig(shard_rows=pick(50, 500, 2000)), ExtractConfig(batch_tokens=2048,
                                                                                           progress=False)
    one = ClusterConfig(kind="ray", address=None, num_workers=1, cpus_per_worker=2, panel_blocks=1)
    two = dataclasses.replace(one, num_workers=2, cpus_per_worker=1)
    out = {}
    with tempfile.TemporaryDirectory(prefix="collide_bench_ray_") as tmp:
        def extract(name, cluster=None):
            args = (lm, prompts, layers, Path(tmp) / name, len(prompts), {"bench": "ray"}, store_cfg, extract_cfg)
            return _timed(lambda: extract_to_store(*args) if cluster is None else
                          extract_to_store_ray(*args, cluster, model_cfg=lm_config()))

        t_local, _ = extract("local")
        t_one, _ = extract("ray1", one)
        out["extract_ray1_vs_local"] = t_one / t_local
        if bench_size() != "tiny":
            t_two, _ = extract("ray2", two)
            out["extract_ray2_vs_ray1"] = t_two / t_one
        store = write_store(Path(tmp) / "search", pick(1500, 20000, 60000), pick(64, 576, 576), seed=3)
        search = SearchConfig(block_rows=pick(256, 4096, 4096), threads=2, progress=False)
        layer = store.layers[0]
        s_local, _ = _timed(lambda: search_store(store, layer, 1e-6, search))
        s_one, _ = _timed(lambda: search_store_ray(store, layer, 1e-6, search, one))
        out["search_ray1_vs_local"] = s_one / s_local
        if bench_size() != "tiny":
            s_two, _ = _timed(lambda: search_store_ray(store, layer, 1e-6, dataclasses.replace(search, threads=0),
                                                       two))
            out["search_ray2_vs_ray1"] = s_two / s_one
    ray.shutdown()
    return out


def lm_config():
    """The config the workers load: the tiny random Llama of ``common.tiny_llama``."""
    from collide.config import ModelConfig

    return ModelConfig(name="tiny", source="random:llama", family="llama")


def measure() -> dict:
    """Run ``measure_here`` in a child inside a loopback-only namespace; {"skipped": reason} where none can be made."""
    from tests.support.netns import namespace_problem, run_isolated

    problem = namespace_problem()
    if problem:
        return {"skipped": problem}
    proc = run_isolated([sys.executable, "-m", "benchmarks.suite.bench_ray"], REPO, CHILD_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_ray's child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Ray:
    """The ratios of the module docstring, measured once in ``setup_cache``."""

    unit = "ratio"
    rounds = 1
    repeat = 1
    number = 1
    timeout = CHILD_TIMEOUT_S

    def setup_cache(self):
        return measure()

    setup_cache.timeout = CHILD_TIMEOUT_S

    def _get(self, cache, name):
        if "skipped" in cache:
            raise SkipNotImplemented(cache["skipped"])
        if name not in cache:
            raise SkipNotImplemented(f"{name} is not measured at the tiny size")
        return cache[name]

    def track_extract_ray1_vs_local(self, cache):
        return self._get(cache, "extract_ray1_vs_local")

    def track_extract_ray2_vs_ray1(self, cache):
        return self._get(cache, "extract_ray2_vs_ray1")

    def track_search_ray1_vs_local(self, cache):
        return self._get(cache, "search_ray1_vs_local")

    def track_search_ray2_vs_ray1(self, cache):
        return self._get(cache, "search_ray2_vs_ray1")


if __name__ == "__main__":  # the child of ``measure``, inside the namespace
    print(json.dumps(measure_here()))
