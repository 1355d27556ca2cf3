"""``collide myopic-lm``: vanilla vs myopic training of a small language model (``collide.experiments.myopic_lm``)."""

from __future__ import annotations

import logging

from collide.config import MyopicLMConfig

SCHEMA = MyopicLMConfig
POSITIONAL = None
SUMMARY = "vanilla vs myopic training of a small GPT-2-style LM on stdlib-docs (arXiv 2404.00859)"
RERUN = "run the same `collide myopic-lm` command again to train every mode from the start"
MEASURED_STEPS = 400  # the budget docs/precache.md measured the gap with (the default tokens / (16 x 128))

log = logging.getLogger(__name__)


def short_budget(cfg: MyopicLMConfig) -> str | None:
    """A warning when the training budget is below the steps the myopia gap was measured with, else None."""
    steps = cfg.tokens // (cfg.batch_size * cfg.seq_len)
    if steps >= MEASURED_STEPS:
        return None
    return (f"{steps} training step(s) per mode (tokens={cfg.tokens:,}): the gap was measured with "
            f"{MEASURED_STEPS} steps, and in that run the two modes' training losses stayed within 0.04 nats of "
            "each other, in either order, through step 250 (docs/precache.md); a gap from fewer steps means "
            "nothing: raise tokens (the default 819200 is 400 steps)")


def run(cfg: MyopicLMConfig, command: str = "") -> dict:
    """Train and evaluate every mode, then one row per mode and the myopia gap (with a warning under a short budget)."""
    from collide.commands import check_out_dir
    from collide.console import print_table, say
    from collide.experiments.myopic_lm import check, run_experiment

    check_out_dir(cfg.out)
    check(cfg)  # the budget's warning below assumes values in range
    warning = short_budget(cfg)
    if warning:
        log.warning(warning)
    result = run_experiment(cfg, command)
    rows = [[m["mode"], f"{m['eval_ce']:.4f}", f"{m['cpu_seconds']:.0f}"] for m in result["models"]]
    if "gap" in result:
        rows.append(["myopic - vanilla" + (" (not meaningful)" if warning else ""),
                     f"{result['gap']['absolute']:+.4f}", ""])
    print_table("held-out cross-entropy (nats / byte)", ["mode", "cross-entropy", "CPU s"], rows, left=["mode"])
    if warning:
        say(f"[yellow]warning:[/yellow] {warning}")
    return result
