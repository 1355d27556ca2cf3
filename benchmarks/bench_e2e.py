"""End-to-end benchmark: ``python -m collide`` on the embedded default (SmolLM2-135M over the stdlib docs).

Runs the real command in a subprocess (all layers, fixed batching so that reruns are comparable),
then, in this process, a plain HF forward pass of the same model over the same stored prompts.

Ratio (gated): ``stage_share``, the sum of the stage timings in report.json / the command's wall
time, both taken by the same process, so that machine load scales both alike (0.87-0.92 over six
runs at load 3-7 on 2 cores). It drops when time goes to untimed work: imports, Hydra, glue
between stages. Higher is better.

Figure, not gated: ``plain_forward_share``, CPU seconds of the plain HF forward (right-padded
batches of ``BATCH`` prompts sorted by length, ``output_hidden_states=True``, no writing) / CPU
seconds of the whole command: the share of a run the model itself must cost. The two are timed one
after the other, not interleaved, and on the shared machine the same forward took 10 to 24 CPU
seconds in consecutive runs (0.28-0.69 for this share), far beyond a 10% gate; the interleaved
extraction-vs-forward ratio is gated by bench_extract.

Exact: every layer certified, the collision count at layers 1..L, the prompt and layer counts,
and the minimum distance at the last layer to 5 significant digits (thread count and batch shapes
may move fp32 GEMM results in the last bits; the exact search itself is gated by bench_search).

``python benchmarks/bench_e2e.py [--full]`` prints the result as JSON.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUICK_PROMPTS = 64  # about a minute on 2 busy cores, model load included
FULL_PROMPTS = 1000  # the size of `make run`
BATCH = 32  # prompts per batch, in the command and in the plain forward
BATCH_TOKENS = 2048  # token budget per batch of the command (fixed: batch shapes stay the same across runs)


def run_command(run_dir: Path, n_prompts: int) -> tuple[float, float]:
    """Run the collide CLI into ``run_dir``; return its (wall, CPU) seconds (call once per process)."""
    cmd = [sys.executable, "-m", "collide", "model=smollm2", "corpus=stdlib-docs", f"n_prompts={n_prompts}",
           f"extract.batch_tokens={BATCH_TOKENS}", f"extract.max_batch_size={BATCH}", "extract.progress=false",
           "search.progress=false", f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def plain_forward_seconds(run_dir: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of a plain HF forward (all hidden states) over the prompts stored by the run."""
    import torch
    from omegaconf import OmegaConf

    from collide.config import ModelConfig
    from collide.extract import pad_id
    from collide.models import load_model
    from collide.store import open_store

    model_cfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml").model))
    lm = load_model(model_cfg)
    prompts = sorted(open_store(run_dir / "store").prompts(["token_ids"]).column("token_ids").to_pylist(), key=len)
    pad = pad_id(lm)
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for i in range(0, len(prompts), BATCH):
            batch = prompts[i:i + BATCH]
            width = max(map(len, batch))
            ids = torch.tensor([p + [pad] * (width - len(p)) for p in batch], device=lm.device)
            mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in batch], device=lm.device)
            lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return time.perf_counter() - start, time.process_time() - cpu_start


def run(quick: bool = True) -> dict:
    n_prompts = QUICK_PROMPTS if quick else FULL_PROMPTS
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        run_dir = Path(tmp) / "run"
        wall, cpu = run_command(run_dir, n_prompts)
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        report = json.loads((run_dir / "report.json").read_text())
        plain_wall, plain_cpu = plain_forward_seconds(run_dir)
    layers = report["layers"]
    stages = report["timings"]
    last = layers[-1]
    return {
        "ratios": {
            "stage_share": {"value": sum(stages.values()) / wall, "better": "higher", "target": None},
        },
        "exact": {
            "all_layers_certified": all(e["certified"] for e in layers),
            "contextual_collisions": report["verdict"]["n_collisions"],
            "n_prompts": report["n_prompts"],
            "n_layers_searched": len(layers),
            "last_layer_min_distance_5sig": float(f"{last['min_distance']:.5g}"),
        },
        "figures": {
            "plain_forward_share": plain_cpu / cpu,
            "wall_seconds": wall,
            "cpu_seconds": cpu,
            "plain_forward_seconds": plain_wall,
            "plain_forward_cpu_seconds": plain_cpu,
            "prompts_per_second_end_to_end": report["n_prompts"] / wall,
            "command_peak_rss_mib": peak_mib,
            **{f"{stage}_seconds": s for stage, s in stages.items()},
        },
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--full" not in sys.argv), indent=2))
