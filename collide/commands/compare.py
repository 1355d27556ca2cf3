"""``collide compare RUN_DIR [RUN_DIR ...]``: one table and figure for several runs or a sweep."""

from __future__ import annotations

from pathlib import Path

from dataclasses import dataclass
from typing import List

from omegaconf import MISSING

from collide.config import DepthAxis


@dataclass
class CompareConfig:
    """``collide compare RUN_DIR [RUN_DIR ...]``: one table and figure for several runs or a sweep."""

    runs: List[str] = MISSING  # run directories or multirun sweep directories (positional)
    out: str = "comparison"  # output directory for comparison.{md,json,png}
    depth_axis: DepthAxis = DepthAxis.relative  # x axis of the figure: layer / L, or the layer index


SCHEMA = CompareConfig
POSITIONAL = "runs"
SUMMARY = "one table and figure for several runs or a sweep"
RERUN = "nothing was written: run the same `collide compare` command again to compare from the start"


def run(cfg: CompareConfig, command: str = "") -> dict:
    """Write comparison.{md,json,png} into ``cfg.out`` (``collide.report.compare``) and print the table."""
    from collide.commands import check_out_dir
    from collide.console import print_table, say
    from collide.report.compare import compare
    from collide.report.figures import fmt_distance

    check_out_dir(cfg.out)
    out = Path(cfg.out)
    summary = compare([Path(p) for p in cfg.runs], out, cfg.depth_axis)
    rows = []
    for r in summary["runs"]:
        if r["complete"]:
            p = r["paper_layers"]
            rows.append([r["label"], r["dtype"], str(r["n_layers"]), fmt_distance(p["1"]), fmt_distance(p["L/2"]),
                         fmt_distance(p["L"]), r["verdict"]])
        else:
            rows.append([r["label"], "", "", "", "", "", "[red]incomplete[/red]"])
    print_table("collide comparison: min pairwise L2", ["run", "dtype", "L", "layer 1", "layer L/2", "layer L",
                                                        "verdict"], rows, left=["run"])
    for r in summary["runs"]:
        if r["problems"]:
            say(f"[yellow]warning:[/yellow] {r['dir']}: {'; '.join(r['problems'])}")
    say(f"wrote {out / 'comparison.md'}, comparison.json and comparison.png")
    return summary
