"""asv benchmark of the whole command: ``python -m collide`` on the embedded default.

``track_wall_vs_stage_time``: the command's wall seconds / the sum of the stage timings its
report.json records, both taken by the same process, so that machine load scales both alike (lower
is better; about 1.1 here: 0.87-0.92 as the inverse, over six runs at load 3-7 on 2 cores). It rises
when time goes to untimed work: imports, Hydra, glue between stages. The command runs in a
subprocess on SmolLM2 over the stdlib docs, all 31 layers, 64 prompts (full: 1000, the size of
``make run``; tiny: the tests' tiny random Llama, 32 prompts), with fixed batching
(``extract.batch_tokens=2048 extract.max_batch_size=32``) so that reruns compare.

The run's exactness (every layer certified, collisions found) is tested by tests/cli/test_cli.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import REPO, pick


def measure() -> dict[str, float]:
    """{"wall_vs_stage_time": value} of one run of the command (see the module docstring)."""
    model, n_prompts = pick(("tiny-random", 32), ("smollm2", 64), ("smollm2", 1000))
    with tempfile.TemporaryDirectory(prefix="collide_bench_e2e_") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "collide", f"model={model}", "corpus=stdlib-docs", f"n_prompts={n_prompts}",
               "extract.batch_tokens=2048", "extract.max_batch_size=32", "extract.progress=false",
               "search.progress=false", f"store.path={run_dir / 'store'}", f"hydra.run.dir={run_dir}"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
        wall = time.perf_counter() - start
        stages = json.loads((run_dir / "report.json").read_text())["timings"]
    return {"wall_vs_stage_time": wall / sum(stages.values())}


class Command:
    """The ratio of the module docstring, measured once in ``setup_cache``."""

    unit = "ratio"
    rounds = 1
    repeat = 1
    number = 1
    timeout = 1800

    def setup_cache(self):
        return measure()

    setup_cache.timeout = 1800

    def track_wall_vs_stage_time(self, cache):
        return cache["wall_vs_stage_time"]
