"""``collide precache``: the synthetic pre-caching experiment of arXiv 2404.00859, vanilla vs myopic."""

from __future__ import annotations

from collide.config import PrecacheConfig

SCHEMA = PrecacheConfig
POSITIONAL = None
SUMMARY = "the synthetic pre-caching experiment (arXiv 2404.00859): vanilla vs myopic"
RERUN = "nothing was written: run the same `collide precache` command again to train from the start"


def run(cfg: PrecacheConfig, command: str = "") -> dict:
    """Train, evaluate and probe every mode (``collide.experiments.precache``), then one row per mode."""
    from collide.commands import check_out_dir
    from collide.console import print_table
    from collide.experiments.precache import run_experiment

    check_out_dir(cfg.out)
    result = run_experiment(cfg, command)
    rows = [[m["mode"], f"{m['steps']:,}", m["stopped"], f"{m['test_loss']:.4f}", f"{m['trivial_loss']:.4f}",
             f"{m['current_input_loss']:.4f}", f"{m['normalised_loss']:.3f}"] for m in result["models"]]
    print_table(f"pre-caching: test {cfg.loss} loss", ["mode", "steps", "stopped", "test", "trivial",
                                                       "current input only", "test / trivial"], rows, left=["mode"])
    return result
