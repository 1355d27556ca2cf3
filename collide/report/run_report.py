"""Report stage: one run's per-layer collision report, and the sections later commands add to it.

``write_report`` writes into the run directory:

* ``report.json``: the versioned record (schema: ``collide/report/report_schema.json``, documented in
  ``docs/report-schema.md``);
* ``report.md``: the verdict in plain words, a table of the layers, the closest prompts as text
  (``collide.report.markdown``);
* ``collisions/layer=K.parquet``: every colliding pair of layer K (columns a, b, distance);
* ``figures/min_distance.png`` and ``figures/nn_boxplot.png``.

``add_section`` lets a later command (``collide.exhaustive``) add a section to a finished run's
report: a ``report.json`` key, a figure and a marked block of ``report.md``; a rewrite of the
report (the run's command again) keeps them. Every file is written atomically (``collide.atomic``).

Conventions: distances are L2, not squared, between the fp32 states as stored. Layer k follows
``collide.models``: 0 = the embedding output, k = the output of block k, L = the last (after or
before the final norm, ``model.final_norm``). Layer 0 is expected to collide (prompts that end in
the same token share it), so the verdict does not count it against injectivity.

"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import re
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import collide
from collide.report import diagnostics, figures
from collide.atomic import write_outputs
from collide.console import print_table, say
from collide.config import ReportConfig
from collide.errors import CollideError
from collide.report.figures import fmt_distance
from collide.layers import CONVENTION, layer_list
from collide.report.markdown import MD_COLLISIONS, STATUS_TITLES, plural, render_markdown

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1.0"  # major.minor: a reader of major M reads every M.x report
FIGURES = {"min_distance": "figures/min_distance.png", "nn_boxplot": "figures/nn_boxplot.png"}
DIAGNOSTICS_FIGURE = "figures/diagnostics.png"  # separation margin and co-Lipschitz per layer (when computed)
# A section's block of report.md: <!-- collide.COMMAND:NAME:begin --> ... <!-- collide.COMMAND:NAME:end -->
SECTION_BLOCK = re.compile(r"<!-- collide\.(\w+):(\w+):begin -->\n.*?<!-- collide\.\1:\2:end -->\n", re.S)


# --------------------------------------------------------------------------- environment facts


def hardware_info() -> dict:
    """CPU model, logical cores, RAM (GiB), GPU name (or None), torch and faiss versions."""
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    faiss_version = None  # read from package metadata: importing faiss only to log its loader is noise
    for dist in ("faiss-cpu", "faiss-gpu", "faiss"):
        try:
            faiss_version = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss_version,
    }


def git_commit(path: Path | None = None, ignore: tuple[str, ...] = ()) -> tuple[str | None, bool | None]:
    """(commit sha, dirty) of the git checkout holding ``path`` (default: collide's source), or (None, None).

    dirty = tracked files differ from the commit, leaving out the paths in ``ignore`` (relative to the
    checkout's root), e.g. a results folder that the caller itself rewrites.
    """
    cwd = Path(path) if path else Path(collide.__file__).parent
    excluded = [f":(top,exclude){p}" for p in ignore]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", *excluded],
                                cwd=cwd, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return sha.stdout.strip(), bool(status.stdout.strip())


# --------------------------------------------------------------------------- report.json


def layer_entry(layer_result, max_listed: int) -> dict:
    """The report.json entry of one layer: LayerResult.to_dict (pairs, collisions and invalid rows as
    prompt ids, nn_distance as percentiles) plus the report's own keys."""
    layer = int(layer_result.layer)
    return {"layer": layer, "is_embedding_layer": layer == 0, **layer_result.to_dict(max_listed),
            "collisions_file": f"collisions/layer={layer}.parquet"}


def verdict(layers: list[dict], threshold: float) -> dict:
    """The run's verdict on injectivity; layer 0 (embeddings) is reported but never counted.

    status: "no_collisions" (every contextual layer certified, none under threshold, no invalid
    rows), "collisions" (some contextual pair under threshold), "inconclusive" (no collision found
    but a layer is not certified or has NaN/Inf rows), "no_contextual_layers" (only layer 0 searched).
    """
    ctx = [e for e in layers if not e["is_embedding_layer"]]
    emb = [e for e in layers if e["is_embedding_layer"]]
    colliding = [e for e in ctx if e["n_collisions"]]
    uncertified = [e["layer"] for e in ctx if not e["certified"]]
    invalid = [e["layer"] for e in ctx if e["invalid_rows"]]
    n_pairs = sum(e["n_pairs"] for e in ctx)
    n_collisions = sum(e["n_collisions"] for e in ctx)
    if not ctx:
        status, text = "no_contextual_layers", ("only layer 0 (embeddings) was searched; it says nothing about "
                                                "injectivity. Select layers 1..L.")
    elif colliding:
        status = "collisions"
        text = (f"{plural(n_collisions, 'colliding pair')} (L2 < {fmt_distance(threshold)}) at "
                f"{plural(len(colliding), 'layer', count=False)} {layer_list([e['layer'] for e in colliding])}: "
                "distinct prompts map to the same state (see the colliding pairs below).")
    else:
        per_layer = {e["n_pairs"] for e in ctx}
        each = f" ({per_layer.pop():,} per layer)" if len(per_layer) == 1 else ""
        text = f"no collisions below {fmt_distance(threshold)} in {n_pairs:,} pairs across {len(ctx)} layers{each}"
        if uncertified or invalid:
            status = "inconclusive"
            if uncertified:
                text += (f", but {plural(len(uncertified), 'layer', count=False)} {layer_list(uncertified)} "
                         f"{'is' if len(uncertified) == 1 else 'are'} not certified: the true minimum may be lower")
            if invalid:
                text += (f"; {plural(len(invalid), 'layer', count=False)} {layer_list(invalid)} "
                         f"{'has' if len(invalid) == 1 else 'have'} prompts with NaN/Inf states, "
                         "left out of the search")
            text += "."
        else:
            status, text = "no_collisions", text + "."
    if emb:
        e = emb[0]
        text += (f" Layer 0 (embeddings): {plural(e['n_collisions'], 'colliding pair')}, expected (prompts that "
                 "end in the same token share this state by construction) and not counted against injectivity."
                 if e["n_collisions"] else " Layer 0 (embeddings): no collisions.")
    mins = [(e["min_distance"], e["layer"]) for e in ctx if e["min_distance"] is not None]
    best = min(mins) if mins else (None, None)
    return {"status": status, "text": text, "n_pairs": n_pairs, "n_layers": len(ctx), "n_collisions": n_collisions,
            "embedding_collisions": emb[0]["n_collisions"] if emb else None,
            "min_distance": best[0], "min_distance_layer": best[1]}


def _shown_prompt_ids(layers: list[dict]) -> list[int]:
    """Prompts whose text report.md shows: each layer's closest pair and its first colliding pairs."""
    ids = set()
    for e in layers:
        ids.update(e["closest_pair"] or ())
        if not e["is_embedding_layer"]:
            for c in e["collisions"][:MD_COLLISIONS]:
                ids.update((c["a"], c["b"]))
    return sorted(ids)


def build_report(run_info: dict, results: list, max_listed: int, store=None) -> dict:
    """The report.json dict of a run (see docs/report-schema.md); ``store`` supplies prompt texts if it keeps them."""
    model = dict(run_info["model"])
    layers = [layer_entry(r, max_listed) for r in sorted(results, key=lambda r: r.layer)]
    commit, dirty = git_commit()
    texts = store.texts(_shown_prompt_ids(layers)) if store is not None else {}
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "corpus": dict(run_info["corpus"]),
        "n_prompts": int(run_info["n_prompts"]),
        # null when the run took the first N prompts of a larger store: its count covers the store's own N
        "n_duplicates": None if run_info["n_duplicates"] is None else int(run_info["n_duplicates"]),
        "threshold": float(run_info["threshold"]),
        "dtype": model["dtype"],
        "store_dtype": store.manifest.get("dtype", "fp32") if store is not None else model["dtype"],
        "layer_convention": {"final_norm": model["final_norm"], "n_layers": int(model["n_layers"]),
                             "description": CONVENTION},
        "selected_layers": [int(k) for k in run_info["layers"]],
        "timings": {stage: float(s) for stage, s in run_info["timings"].items()},
        "store": run_info["store"],
        "command": run_info["command"],
        "hardware": hardware_info(),
        "collide_version": collide.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "verdict": verdict(layers, float(run_info["threshold"])),
        "layers": layers,
        "prompt_texts": {str(k): v for k, v in sorted(texts.items())},
        "figures": [],
    }


# --------------------------------------------------------------------------- writing


def write_collisions(run_dir: Path, results: list) -> None:
    """collisions/layer=K.parquet for every layer: the full collision table (a, b, distance), even when empty."""
    out = Path(run_dir) / "collisions"
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        r.write_collisions(out / f"layer={r.layer}.parquet")


def write_figures(report: dict, run_dir: Path) -> list[str]:
    """The two PNGs of a report; returns their paths relative to the run directory."""
    figures.min_distance_figure(report, Path(run_dir) / FIGURES["min_distance"])
    figures.nn_boxplot_figure(report, Path(run_dir) / FIGURES["nn_boxplot"])
    return list(FIGURES.values())


def write_report(run_dir: Path, run_info: dict, results: list, store, cfg: ReportConfig) -> dict:
    """Write report.json, report.md, collisions/ and figures/ into ``run_dir``; return the report dict.

    Sections that ``add_section`` put into an earlier report of ``run_dir`` are kept, with their
    figures and report.md blocks.

    ``run_info`` comes from the pipeline (model, corpus, n_prompts, n_duplicates, threshold, layers,
    timings, store, command); ``results`` are the per-layer search results (collide.search.LayerResult);
    ``store`` (or None) gives the prompt texts of the closest and colliding pairs when it keeps text.
    The time spent here is recorded as ``timings["report"]``.
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(run_info, results, cfg.max_collisions_listed, store)
    report["quantization"] = diagnostics.quantization_record(report)
    if getattr(cfg, "diagnostics", True):
        diagnostics.attach(report, results, store, getattr(cfg, "diagnostics_rows", 4096))
    write_collisions(run_dir, results)
    if cfg.figures:
        report["figures"] = write_figures(report, run_dir)
        if "diagnostics" in report:
            figures.diagnostics_figure(report, run_dir / DIAGNOSTICS_FIGURE)
            report["figures"].append(DIAGNOSTICS_FIGURE)
    report["timings"]["report"] = time.perf_counter() - start
    sections, extra_figures, blocks = earlier_sections(run_dir)
    report.update(sections)
    report["figures"] += [f for f in extra_figures if f not in report["figures"]]
    write_outputs(run_dir, "report", report, render_markdown(report) + "".join(f"\n{b}" for b in blocks))
    log.info("report: %s (%s) in %.1f s", run_dir / "report.md", report["verdict"]["status"],
             report["timings"]["report"])
    return report


# --------------------------------------------------------------------------- sections added later


def read_report(run_dir: Path) -> dict | None:
    """RUN_DIR/report.json as a dict, None when there is none; CollideError when it cannot be read."""
    file = Path(run_dir) / "report.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CollideError(f"cannot read {file} ({exc}); rerun the run's own `python -m collide` command "
                           "to rewrite it (a complete store is only searched again)") from None


def section_markers(key: str) -> tuple[str, str]:
    """The (begin, end) markers of section ``key`` in report.md.

    A key is ``COMMAND`` or ``COMMAND_NAME`` (the command that adds it, e.g. "exhaustive",
    "exhaustive_margin"); its markers are ``<!-- collide.COMMAND:NAME:begin -->`` and ``...:end -->``,
    with NAME = COMMAND for a key without "_".
    """
    command, _, name = key.partition("_")
    tag = f"collide.{command}:{name or command}"
    return f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"


def _section_key(command: str, name: str) -> str:
    """The report.json key of the block marked ``collide.COMMAND:NAME`` (inverse of ``section_markers``)."""
    return command if name == command else f"{command}_{name}"


def earlier_sections(run_dir: Path) -> tuple[dict, list[str], list[str]]:
    """The sections of the run's current report, to keep when it is rewritten: (report.json
    sections {key: value}, the figures the report does not draw itself, the marked report.md
    blocks); all empty when there is no readable earlier report."""
    try:
        earlier = json.loads((run_dir / "report.json").read_text())
        md = (run_dir / "report.md").read_text()
    except (OSError, ValueError):
        return {}, [], []
    blocks = list(SECTION_BLOCK.finditer(md))
    keys = [_section_key(*m.groups()) for m in blocks]
    sections = {key: earlier[key] for key in keys if key in earlier}
    extra_figures = [f for f in earlier.get("figures", []) if f not in (*FIGURES.values(), DIAGNOSTICS_FIGURE)] \
        if sections else []
    return sections, extra_figures, [m.group(0) for m in blocks]


def add_section(run_dir: Path, key: str, summary: dict, markdown: str, figure: str | None = None) -> None:
    """Add (or replace) section ``key`` of a finished run's report.

    ``summary`` becomes ``report.json[key]``, ``figure`` (a path relative to RUN_DIR) joins
    ``report.json["figures"]``, and ``markdown`` replaces the block of report.md between the
    section's markers (``section_markers``), or is appended. Both files are rewritten atomically.
    ``key`` must not be one of the report's own keys (docs/report-schema.md). Changes nothing,
    with a warning, when the run has no report.json.
    """
    run_dir = Path(run_dir)
    report = read_report(run_dir)
    if report is None:
        log.warning("%s has no report.json; its %r section is not added", run_dir, key)
        return
    report[key] = summary
    if figure is not None and figure not in report.setdefault("figures", []):
        report["figures"].append(figure)
    begin, end = section_markers(key)
    md_file = run_dir / "report.md"
    md = md_file.read_text() if md_file.is_file() else ""
    block = f"{begin}\n{markdown}{end}\n"
    if begin in md and end in md:
        md = md[:md.index(begin)] + block + md[md.index(end) + len(end) + 1:]
    else:
        md = md.rstrip("\n") + "\n\n" + block
    write_outputs(run_dir, "report", report, md)


# --------------------------------------------------------------------------- console


def print_summary(report: dict, console=None) -> None:
    """A table of the layers and the verdict, for the end of a run (on ``console``, default stdout)."""
    rows = []
    for e in report["layers"]:
        nn = e["nn_distance"] or {}
        rows.append([f"{e['layer']}{' (emb)' if e['is_embedding_layer'] else ''}", fmt_distance(e["min_distance"], 6),
                     "yes" if e["certified"] else "[red]no[/red]",
                     f"[red]{e['n_collisions']:,}[/red]" if e["n_collisions"] and not e["is_embedding_layer"]
                     else f"{e['n_collisions']:,}", fmt_distance(nn.get("p50")), f"{e['seconds']:.1f}"])
    print_table(f"{report['model']['name']} on {report['corpus']['name']}: {report['n_prompts']:,} prompts, "
                f"threshold {fmt_distance(report['threshold'])}",
                ["layer", "min distance", "certified", "collisions", "NN median", "seconds"], rows, console=console)
    colour = {"no_collisions": "green", "collisions": "red"}.get(report["verdict"]["status"], "yellow")
    say(f"[{colour}]{STATUS_TITLES[report['verdict']['status']]}:[/{colour}] {report['verdict']['text']}", console)
