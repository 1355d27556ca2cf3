"""``collide myopic-lm``: vanilla vs myopic training of a small language model (``collide.experiments.myopic_lm``)."""

from __future__ import annotations

from collide.config import MyopicLMConfig

SCHEMA = MyopicLMConfig
POSITIONAL = None
SUMMARY = "vanilla vs myopic training of a small GPT-2-style LM on stdlib-docs (arXiv 2404.00859)"


def run(cfg: MyopicLMConfig, command: str = "") -> dict:
    """Train and evaluate every mode, then one row per mode and the myopia gap."""
    from collide.console import print_table
    from collide.experiments.myopic_lm import run_experiment

    result = run_experiment(cfg, command)
    rows = [[m["mode"], f"{m['eval_ce']:.4f}", f"{m['cpu_seconds']:.0f}"] for m in result["models"]]
    if "gap" in result:
        rows.append(["myopic - vanilla", f"{result['gap']['absolute']:+.4f}", ""])
    print_table("held-out cross-entropy (nats / byte)", ["mode", "cross-entropy", "CPU s"], rows, left=["mode"])
    return result
