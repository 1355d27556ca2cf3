"""``make gpu-check`` section ``precache``: the authors' synthetic pre-caching run, vanilla and myopic, on the GPU.

The configuration of their 128-d checkpoints (arXiv 2404.00859, github.com/wiwu2390/FutureGPT2-public):
``task=paper`` (conv 10, shift 1, sin(10 x), p = 1, sequences of 64), a 2-layer GPT-2 (d = 128, 2 heads,
ReLU), batches of 512, AdamW at lr 1e-3 with weight decay 0.01, a cosine schedule with 1% warm-up,
the Huber loss (delta 1), no gradient clipping, TF32 matrix products (their
``set_float32_matmul_precision('high')``); myopic training as their default (``myopic=residual``).
Batches are drawn on the device for every step (no data set is allocated).

Their run lasted PAPER_STEPS steps. Here each mode gets ``train_s`` seconds: the steps per second are
measured first (two short runs of the same code; their difference removes the fixed costs), and the
cosine schedule is laid over min(PAPER_STEPS, the steps that fit). Reported per mode: the steps and
their share of the authors', seconds per step, the training FLOPs, the test Huber loss over the
trivial loss against the authors' (TRAINING_LOSS), the validation curve and the R^2 of the probes.
Each mode's run also writes ``<out>/<mode>/precache.json`` (default ``out``:
benchmarks/results/precache-gpu-<UTC date>), from which the learning curves and the probes' figure are drawn:

    PYTHONPATH=. python3 -c "from benchmarks.precache_gpu import precache_check; print(precache_check())"
    python -m collide.experiments.precache_report curves docs/figures/precache_gpu_curves.png \
        benchmarks/results/precache-gpu-<date>/{vanilla,myopic}/precache.json
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from collide.config import PrecacheConfig
from collide.experiments.precache import run_experiment, train, train_flops

PAPER_STEPS = 58_593  # the authors' 128-d checkpoints: one epoch of 30M sequences in batches of 512
TRAINING_LOSS = {"vanilla": 0.01, "myopic": 1.24}  # their checkpoints' training Huber loss at p = 1
PAPER = dict(task="paper", p=1.0, seq_len=64, window=10, freq=10.0, d_model=128, n_layers=2, n_heads=2,
             batch_size=512, lr=1e-3, loss="huber", schedule="cosine",
             myopic="residual", max_lag=20, eval_sequences=2048, eval_every=500, threads=0, figures=False)
RESULTS = Path(__file__).resolve().parent / "results"
TRAIN_S = 150.0  # training seconds per mode: both modes, their timing and evaluation fit in 6 minutes
TIMING_STEPS = (20, 60)  # the two timing runs' lengths: seconds per step = difference / 40


def seconds_per_step(cfg: PrecacheConfig, mode: str) -> float:
    """Wall seconds per training step of ``mode`` on ``cfg.device``, fixed costs removed (after a warm-up)."""
    sync = torch.cuda.synchronize if cfg.device.startswith("cuda") else (lambda: None)
    short, long = TIMING_STEPS
    times = []
    for steps in (short, short, long):  # the first is the warm-up (kernels, allocator, cuBLAS handles)
        run = replace(cfg, steps=steps, eval_every=steps, schedule="cosine")
        sync()
        tic = time.perf_counter()
        train(run, mode)
        sync()
        times.append(time.perf_counter() - tic)
    return max(times[2] - times[1], 1e-9) / (long - short)


def precache_check(device: str = "cuda", train_s: float = TRAIN_S, max_steps: int = PAPER_STEPS,
                   out: Path | None = None, **overrides) -> dict:
    """Both modes for ``train_s`` seconds each on ``device`` into ``out`` (module docstring); ``overrides``
    replace PAPER's keys (a CPU run of the code path uses toy sizes)."""
    out = out or RESULTS / f"precache-gpu-{datetime.now(timezone.utc):%Y-%m-%d}"
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32, as the authors
    try:
        report = {"config": {**PAPER, **overrides}, "paper_steps": PAPER_STEPS, "train_s": train_s, "out": str(out)}
        for mode in ("vanilla", "myopic"):
            cfg = PrecacheConfig(**{**PAPER, **overrides}, device=device, out=str(out / mode), modes=[mode])
            per_step = seconds_per_step(cfg, mode)
            steps = max(1, min(max_steps, int(train_s / per_step)))
            cfg = replace(cfg, steps=steps, max_cpu_seconds=2 * train_s)  # a guard; the steps end the run
            tic = time.perf_counter()
            m = run_experiment(cfg, "benchmarks/precache_gpu.py")["models"][0]
            report[mode] = {
                "steps": m["steps"], "stopped": m["stopped"], "share_of_paper_steps": m["steps"] / PAPER_STEPS,
                "timed_s_per_step": per_step, "steps_per_s": 1 / per_step, "seconds": time.perf_counter() - tic,
                "train_flops": m["train_flops"], "flops_per_step": train_flops(cfg, mode) * cfg.batch_size,
                "test_huber": m["test_loss"], "trivial_huber": m["trivial_loss"],
                "test_over_trivial": m["normalised_loss"], "paper_training_huber": TRAINING_LOSS[mode],
                "paper_over_trivial": TRAINING_LOSS[mode] / m["trivial_loss"],
                "curve": [{k: p[k] for k in ("step", "train_loss", "val_loss", "val_trivial")} for p in m["curve"]],
                "probes": m["probes"]}
        return report
    finally:
        torch.set_float32_matmul_precision(saved)
