"""Compare finished runs: ``collide compare RUN_DIR [RUN_DIR ...] [out=DIR] [depth_axis=absolute]``.

A RUN_DIR is a run directory (holds report.json) or a Hydra multirun sweep directory (its job
subdirectories are taken in job order). The comparison writes ``comparison.md``,
``comparison.json`` and ``comparison.png`` (min pairwise L2 per layer, one line per run) into
``out=`` (default ``./comparison``). The old form ``python -m collide.report RUN_DIR ... [--out DIR]
[--absolute]`` still works.

Depth axis: "relative" (default) places layer k of an L-block model at k / L, so a 4-block and
a 30-block model share one axis; ``depth_axis=absolute`` uses the layer index.

Nothing is mixed silently. Runs that differ in threshold, final_norm or dtype are flagged
(dashed in the figure, noted in both tables, warned on the console); incomplete runs (no
report.json, uncertified layers, layers missing, NaN/Inf rows) are flagged too, and a run
without a report.json is listed but cannot be drawn.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from collide.report import figures
from collide.atomic import write_outputs
from collide.config import DepthAxis
from collide.errors import CollideError
from collide.report.figures import fmt_distance

log = logging.getLogger(__name__)

LIKE_FOR_LIKE = ("threshold", "final_norm", "dtype")  # runs must agree on these to compare as equals
SUPPORTED_MAJOR = "1"  # report.json schema major version this reader understands


@dataclass
class Run:
    path: Path  # the run directory
    report: dict | None  # its report.json, None when missing or unreadable
    label: str = ""  # legend and table name, unique among the compared runs
    problems: list[str] = field(default_factory=list)  # why it is incomplete or not like for like


def _job_order(path: Path):
    """Hydra job subdirectories start with the job number ("3-gpt2-mix"): sort by it, then by name."""
    match = re.match(r"(\d+)", path.name)
    return (int(match.group(1)) if match else float("inf"), path.name)


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories named by ``paths``: each path itself if it holds report.json, else its job subdirectories.

    A subdirectory counts as a job when it holds report.json or Hydra's ``.hydra/`` (a job that
    failed before writing its report). A directory with neither is returned as is (an incomplete run).
    """
    dirs: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise CollideError(f"run directory {str(path)!r} does not exist; pass run directories (holding "
                               "report.json) or a multirun sweep directory")
        if (path / "report.json").exists():
            dirs.append(path)
            continue
        jobs = [p for p in path.iterdir() if p.is_dir() and ((p / "report.json").exists() or (p / ".hydra").is_dir())]
        dirs.extend(sorted(jobs, key=_job_order) or [path])
    return dirs


def load_run(path: Path) -> Run:
    """A Run, with a problem noted when report.json is missing, unreadable or of an unknown major version."""
    file = path / "report.json"
    if not file.exists():
        return Run(path, None, problems=["no report.json (the run failed or is still running)"])
    try:
        report = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        return Run(path, None, problems=[f"report.json is not valid JSON ({exc})"])
    version = str(report.get("schema_version", "?"))
    if version.split(".")[0] != SUPPORTED_MAJOR:
        return Run(path, None, problems=[f"report.json schema_version {version} is not {SUPPORTED_MAJOR}.x; "
                                         "upgrade collide to read it"])
    return Run(path, report)


def like_for_like_values(report: dict) -> dict:
    """The values that must agree between compared runs."""
    return {"threshold": report["threshold"], "final_norm": report["layer_convention"]["final_norm"],
            "dtype": report["dtype"]}


def flag_problems(runs: list[Run]) -> list[str]:
    """Add incompleteness and mismatch notes to ``runs``; return the like-for-like keys that differ.

    The reference value of a key is the most common one among the runs (the first run's on a tie);
    each run that differs gets a note such as "dtype=bf16, others fp32".
    """
    complete = [r for r in runs if r.report is not None]
    for run in complete:
        layers = run.report["layers"]
        uncertified = [e["layer"] for e in layers if not e["certified"]]
        if uncertified:
            run.problems.append(f"layers {uncertified} not certified")
        missing = sorted(set(run.report["selected_layers"]) - {e["layer"] for e in layers})
        if missing:
            run.problems.append(f"layers {missing} selected but not searched")
        invalid = [e["layer"] for e in layers if e["invalid_rows"]]
        if invalid:
            run.problems.append(f"NaN/Inf states at layers {invalid}")
    differing = []
    for key in LIKE_FOR_LIKE:
        values = [like_for_like_values(r.report)[key] for r in complete]
        counts = Counter(values)
        if len(counts) < 2:
            continue
        differing.append(key)
        top = max(counts.values())
        reference = next(v for v in values if counts[v] == top)
        for run, value in zip(complete, values):
            if value != reference:
                shown = (fmt_distance(value), fmt_distance(reference)) if key == "threshold" else (value, reference)
                run.problems.append(f"{key}={shown[0]}, others {shown[1]}")
    return differing


def quant_tag(report: dict) -> str:
    """The quantized forward of a run in short: "A4" (int4 activations), "W8A8", "fp" (none); "+noise" when
    model.noise added Gaussian noise to its stored states."""
    q = report["model"].get("quant") or {}
    bits = {"int8": "8", "int4": "4"}
    tag = "".join(f"{k}{bits[q[key]]}" for k, key in (("W", "weights"), ("A", "activations"))
                  if q.get(key, "none") in bits)
    tag = (tag + (" (bnb)" if q.get("backend") == "bitsandbytes" else "")) or "fp"
    return tag + ("+noise" if "noise" in report["model"] else "")


def label_runs(runs: list[Run]) -> None:
    """'model / corpus' (plus the quantized forward when any run quantizes), plus the run directory's name
    where two runs would still share a label."""
    quantized = any(r.report and quant_tag(r.report) != "fp" for r in runs)
    base = [f"{r.report['model']['name']} / {r.report['corpus']['name']}"
            + (f" / {quant_tag(r.report)}" if quantized else "") if r.report else r.path.name for r in runs]
    counts = Counter(base)
    for run, name in zip(runs, base):
        run.label = name if counts[name] == 1 else f"{name} ({run.path.name})"


def _depth(layer: int, n_layers: int) -> float:
    return layer / n_layers


def _at_depth(report: dict, layer: int) -> float | None:
    entry = next((e for e in report["layers"] if e["layer"] == layer), None)
    return entry["min_distance"] if entry else None


def run_summary(run: Run) -> dict:
    """One run of comparison.json."""
    if run.report is None:
        return {"dir": str(run.path), "label": run.label, "complete": False, "problems": run.problems}
    r = run.report
    L = r["layer_convention"]["n_layers"]
    return {
        "dir": str(run.path), "label": run.label, "complete": True, "problems": run.problems,
        "model": r["model"]["name"], "source": r["model"]["source"], "corpus": r["corpus"]["name"],
        "n_prompts": r["n_prompts"], "dtype": r["dtype"], "final_norm": r["layer_convention"]["final_norm"],
        "threshold": r["threshold"], "n_layers": L, "verdict": r["verdict"]["status"],
        "n_collisions": r["verdict"]["n_collisions"], "git_commit": r["git_commit"], "quant": quant_tag(r),
        "paper_layers": {"1": _at_depth(r, 1), "L/2": _at_depth(r, L // 2), "L": _at_depth(r, L)},
        "per_layer": [{"layer": e["layer"], "depth": _depth(e["layer"], L), "min_distance": e["min_distance"],
                       "certified": e["certified"], "n_collisions": e["n_collisions"],
                       "relative_margin": (e.get("diagnostics") or {}).get("relative_margin"),
                       "co_lipschitz_min": ((e.get("diagnostics") or {}).get("co_lipschitz") or {}).get("min")}
                      for e in r["layers"]],
    }


def comparison_markdown(summary: dict) -> str:
    """comparison.md: the problems first, then one row per run (min distance at layers 1, L/2 and L, as the paper)."""
    out = ["# collide comparison", "", f"{len(summary['runs'])} runs, figure `comparison.png` "
           f"({summary['depth_axis']} depth axis). Distances are min pairwise L2 (not squared).", ""]
    if summary["differing"]:
        out += [f"**Not like for like:** the runs differ in {', '.join(summary['differing'])}; "
                "those runs are dashed in the figure.", ""]
    flagged = [r for r in summary["runs"] if r["problems"]]
    if flagged:
        out += ["## Problems", ""]
        out += [f"- `{r['dir']}` ({r['label']}): {'; '.join(r['problems'])}" for r in flagged] + [""]
    out += ["## Runs", "",
            "| run | model | corpus | prompts | dtype | final norm | threshold | L | layer 1 | layer L/2 | layer L "
            "| collisions (layers 1..L) | verdict | notes |",
            "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in summary["runs"]:
        if not r["complete"]:
            out.append(f"| {r['label']} | | | | | | | | | | | | incomplete | {'; '.join(r['problems'])} |")
            continue
        p = r["paper_layers"]
        out.append(f"| {r['label']} | {r['model']} | {r['corpus']} | {r['n_prompts']:,} | {r['dtype']} "
                   f"| {r['final_norm']} | {fmt_distance(r['threshold'])} | {r['n_layers']} "
                   f"| {fmt_distance(p['1'])} | {fmt_distance(p['L/2'])} | {fmt_distance(p['L'])} "
                   f"| {r['n_collisions']:,} | {r['verdict']} | {'; '.join(r['problems'])} |")
    out += ["", "![min distance per layer](comparison.png)"]
    out += _side_by_side(summary)
    return "\n".join(out) + "\n"


def _side_by_side(summary: dict) -> list[str]:
    """Per layer, each run's collisions, relative separation margin and co-Lipschitz min (L2 per token edit),
    side by side: e.g. the quantization levels of a sweep. Empty without diagnostics."""
    runs = [r for r in summary["runs"] if r["complete"]]
    if not any(p.get("co_lipschitz_min") is not None or p.get("relative_margin") is not None
               for r in runs for p in r["per_layer"]):
        return []
    layers = sorted({p["layer"] for r in runs for p in r["per_layer"]})
    at = {(i, p["layer"]): p for i, r in enumerate(runs) for p in r["per_layer"]}
    out = ["", "## Side by side: collisions, relative margin, co-Lipschitz min", "",
           "Per layer and run: colliding pairs / min L2 over the median state norm / min over nearest-neighbour "
           "pairs of L2 per token edit (docs/report-schema.md). Figure: `comparison_diagnostics.png`.", "",
           "| layer | " + " | ".join(r["label"] for r in runs) + " |", "|---:|" + "---|" * len(runs)]
    for layer in layers:
        cells = []
        for i in range(len(runs)):
            p = at.get((i, layer))
            cells.append("-" if p is None else f"{p['n_collisions']:,} / {fmt_distance(p.get('relative_margin'), 3)}"
                         f" / {fmt_distance(p.get('co_lipschitz_min'), 3)}")
        out.append(f"| {layer} | " + " | ".join(cells) + " |")
    return out + ["", "![diagnostics per layer](comparison_diagnostics.png)"]


def compare(paths: list[Path], out: Path, depth_axis: DepthAxis = DepthAxis.relative) -> dict:
    """Compare the runs under ``paths``; write comparison.{md,json,png} into ``out``; return the summary.

    ``depth_axis`` is validated where the config is composed (``CompareConfig``)."""
    runs = [load_run(p) for p in expand_run_dirs(paths)]
    if not any(r.report for r in runs):
        raise CollideError(f"no report.json under {', '.join(map(str, paths))}; pass finished run directories")
    differing = flag_problems(runs)
    label_runs(runs)
    summary = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "depth_axis": str(depth_axis),
               "differing": differing, "runs": [run_summary(r) for r in runs]}
    drawn = [r for r in summary["runs"] if r["complete"]]
    extra = {"comparison.png": lambda path: figures.comparison_figure(drawn, path, depth_axis)}
    if _side_by_side(summary):
        extra["comparison_diagnostics.png"] = lambda path: figures.comparison_diagnostics_figure(drawn, path)
    write_outputs(out, "comparison", summary, comparison_markdown(summary), extra)
    return summary
