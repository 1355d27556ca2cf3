"""Report stage: one run's per-layer collision report, and the cross-run comparison CLI.

``write_report`` writes into the run directory:

* ``report.json``: the versioned record (schema: ``collide/report_schema.json``, documented in
  ``docs/report-schema.md``);
* ``report.md``: the verdict in plain words, a table of the layers, the closest prompts as text;
* ``collisions/layer=K.parquet``: every colliding pair of layer K (columns a, b, distance);
* ``figures/min_distance.png`` and ``figures/nn_boxplot.png``.

Conventions: distances are L2, not squared, between the fp32 states as stored. Layer k follows
``collide.models``: 0 = the embedding output, k = the output of block k, L = the last (after or
before the final norm, ``model.final_norm``). Layer 0 is expected to collide (prompts that end in
the same token share it), so the verdict does not count it against injectivity.

``python -m collide.report RUN_DIR [RUN_DIR ...]`` compares runs (see ``collide.compare``).
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

import numpy as np

import collide
from collide import figures
from collide.config import ReportConfig
from collide.figures import fmt_distance
from collide.search.results import nn_percentiles  # noqa: F401 (the report's percentiles, re-exported)

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1.0"  # major.minor: a reader of major M reads every M.x report
MD_COLLISIONS = 10  # colliding pairs per layer shown with their text in report.md
MD_TEXT_CHARS = 400  # prompt texts longer than this are cut in report.md
FIGURES = {"min_distance": "figures/min_distance.png", "nn_boxplot": "figures/nn_boxplot.png"}
# Sections that later commands add to a run's report (collide.exhaustive): a rewrite of the report
# (the same command run again) keeps them, their figures and their marked blocks of report.md.
EXTENSION_KEYS = ("exhaustive", "exhaustive_margin")
EXTENSION_BLOCK = re.compile(r"<!-- (collide\.\w+:\w+):begin -->\n.*?<!-- \1:end -->\n", re.S)
LAYER_CONVENTION = ("layer 0 = embedding output (input of block 1); layer k = output of block k; "
                    "layer L = last block, read after the final norm (post) or before it (pre)")


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


def _layer_list(layers: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    runs: list[list[int]] = []
    for k in sorted(layers):
        if runs and k == runs[-1][-1] + 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def _plural(n: int, noun: str, count: bool = True) -> str:
    word = noun if n == 1 else noun + "s"
    return f"{n:,} {word}" if count else word


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
        text = (f"{_plural(n_collisions, 'colliding pair')} (L2 < {fmt_distance(threshold)}) at "
                f"{_plural(len(colliding), 'layer', count=False)} {_layer_list([e['layer'] for e in colliding])}: "
                "distinct prompts map to the same state (see the colliding pairs below).")
    else:
        per_layer = {e["n_pairs"] for e in ctx}
        each = f" ({per_layer.pop():,} per layer)" if len(per_layer) == 1 else ""
        text = f"no collisions below {fmt_distance(threshold)} in {n_pairs:,} pairs across {len(ctx)} layers{each}"
        if uncertified or invalid:
            status = "inconclusive"
            if uncertified:
                text += (f", but {_plural(len(uncertified), 'layer', count=False)} {_layer_list(uncertified)} "
                         f"{'is' if len(uncertified) == 1 else 'are'} not certified: the true minimum may be lower")
            if invalid:
                text += (f"; {_plural(len(invalid), 'layer', count=False)} {_layer_list(invalid)} "
                         f"{'has' if len(invalid) == 1 else 'have'} prompts with NaN/Inf states, "
                         "left out of the search")
            text += "."
        else:
            status, text = "no_collisions", text + "."
    if emb:
        e = emb[0]
        text += (f" Layer 0 (embeddings): {_plural(e['n_collisions'], 'colliding pair')}, expected (prompts that "
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
        "n_duplicates": int(run_info["n_duplicates"]),
        "threshold": float(run_info["threshold"]),
        "dtype": model["dtype"],
        "layer_convention": {"final_norm": model["final_norm"], "n_layers": int(model["n_layers"]),
                             "description": LAYER_CONVENTION},
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


# --------------------------------------------------------------------------- report.md


def _text_block(text: str) -> str:
    """A fenced block that survives backticks and newlines in the prompt."""
    cut = text if len(text) <= MD_TEXT_CHARS else text[:MD_TEXT_CHARS] + " [...]"
    fence = "```"
    while fence in cut:
        fence += "`"
    return f"{fence}text\n{cut}\n{fence}"


def _prompt(report: dict, pid: int) -> str:
    text = report["prompt_texts"].get(str(pid))
    return f"prompt {pid}:\n\n{_text_block(text)}" if text is not None else f"prompt {pid} (text not stored)"


STATUS_TITLES = {"no_collisions": "injective on this sample", "collisions": "collisions found",
                 "inconclusive": "inconclusive", "no_contextual_layers": "nothing to decide"}


def render_markdown(report: dict) -> str:
    """report.md, a pure function of the report dict."""
    m, c, hw, v = report["model"], report["corpus"], report["hardware"], report["verdict"]
    L = report["layer_convention"]["n_layers"]
    commit = (report["git_commit"] or "unknown")[:12] + (" (uncommitted changes)" if report["git_dirty"] else "")
    out = [f"# collide report: {m['name']} on {c['name']}", "",
           f"**Verdict: {STATUS_TITLES[v['status']]}.** {v['text'][0].upper() + v['text'][1:]}", ""]
    if v["min_distance"] is not None:
        out += [f"Smallest distance at a contextual layer: {fmt_distance(v['min_distance'], 6)} at layer "
                f"{v['min_distance_layer']}.", ""]
    corpus_desc = ", ".join(f"{k}={c[k]}" for k in ("kind", "path", "seed", "min_tokens", "max_tokens")
                            if c.get(k) is not None)
    out += ["## Run", "", "| | |", "|---|---|",
            f"| model | {m['name']} (`{m['source']}`{' @ ' + m['revision'] if m.get('revision') else ''}), "
            f"family {m['family']}, L = {L} blocks, d = {m['d']} |",
            f"| dtype | {report['dtype']} (states stored as fp32) |",
            f"| layers | 0 = embeddings, k = output of block k, {L} = last block "
            f"{'after' if m['final_norm'] == 'post' else 'before'} the final norm (`final_norm={m['final_norm']}`) |",
            f"| corpus | {c['name']} ({corpus_desc}) |",
            f"| prompts | {report['n_prompts']:,} distinct token sequences "
            f"({_plural(report['n_duplicates'], 'duplicate')} dropped) |",
            f"| threshold | L2 < {fmt_distance(report['threshold'])} (not squared) |",
            f"| hardware | {hw['cpu']}, {hw['cores']} cores, {hw['ram_gib']} GiB RAM, GPU: {hw['gpu'] or 'none'} |",
            f"| software | collide {report['collide_version']}, commit {commit}, torch {hw['torch']}, "
            f"faiss {hw['faiss'] or 'not installed'} |",
            f"| command | `{report['command']}` |",
            f"| store | `{report['store']}` |", "",
            "## Timings", "", "| stage | seconds |", "|---|---:|"]
    out += [f"| {stage} | {s:.1f} |" for stage, s in report["timings"].items()]
    out += ["", "## Per-layer results", "",
            "Distances are L2 (not squared). NN = each prompt's distance to its nearest other prompt.", "",
            "| layer | vectors | pairs | min distance | certified | closest pair | collisions "
            "| NN 5% | NN median | NN 95% | NN max | invalid rows |",
            "|---:|---:|---:|---:|:---:|---|---:|---:|---:|---:|---:|---:|"]
    for e in report["layers"]:
        nn = e["nn_distance"] or {}
        name = f"{e['layer']} (embeddings)" if e["is_embedding_layer"] else str(e["layer"])
        cert = "yes" if e["certified"] else f"**no** ({e['uncertified_reason'] or 'budget'})"
        pair = "{} / {}".format(*e["closest_pair"]) if e["closest_pair"] else "-"
        out.append(f"| {name} | {e['n_vectors']:,} | {e['n_pairs']:,} | {fmt_distance(e['min_distance'], 6)} | {cert} | {pair} "
                   f"| {e['n_collisions']:,} | {fmt_distance(nn.get('p5'))} | {fmt_distance(nn.get('p50'))} | {fmt_distance(nn.get('p95'))} "
                   f"| {fmt_distance(nn.get('max'))} | {len(e['invalid_rows'])} |")
    if report["figures"]:
        out += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in report["figures"]]
    collided = [e for e in report["layers"] if e["n_collisions"] and not e["is_embedding_layer"]]
    if collided:
        out += ["", "## Colliding pairs", "",
                f"Pairs of distinct prompts under L2 {fmt_distance(report['threshold'])}. The full lists are in "
                "`collisions/layer=K.parquet`."]
        for e in collided:
            out += ["", f"### Layer {e['layer']}: {_plural(e['n_collisions'], 'pair')}"]
            for col in e["collisions"][:MD_COLLISIONS]:
                out += ["", f"Distance {fmt_distance(col['distance'], 6)}:", "", _prompt(report, col["a"]), "",
                        _prompt(report, col["b"])]
    out += _closest_pairs_section(report)
    return "\n".join(out) + "\n"


def _closest_pairs_section(report: dict) -> list[str]:
    """The closest pair of each layer as text, grouped by pair (many layers share their closest pair)."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for e in report["layers"]:
        if e["closest_pair"]:
            groups.setdefault(tuple(e["closest_pair"]), []).append(e)
    if not groups:
        return []
    out = ["", "## Closest pairs", "", "What nearly collided: the closest pair of prompts at each layer."]
    for (a, b), entries in groups.items():
        dists = ", ".join(f"{fmt_distance(e['min_distance'], 4)} at layer {e['layer']}" for e in entries[:6])
        more = f" and {len(entries) - 6} more layers" if len(entries) > 6 else ""
        out += ["", f"### Layer{'s' if len(entries) > 1 else ''} {_layer_list([e['layer'] for e in entries])}: "
                f"prompts {a} and {b}", "", f"L2 distance {dists}{more}.", "", _prompt(report, a), "",
                _prompt(report, b)]
    return out


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


def earlier_extensions(run_dir: Path) -> tuple[dict, list[str], list[str]]:
    """What later commands added to the run's current report, to keep when it is rewritten:
    (report.json sections {key: value}, their figures, their marked report.md blocks); all empty
    when there is no earlier report."""
    try:
        earlier = json.loads((run_dir / "report.json").read_text())
        md = (run_dir / "report.md").read_text()
    except (OSError, ValueError):
        return {}, [], []
    sections = {key: earlier[key] for key in EXTENSION_KEYS if key in earlier}
    extra_figures = [f for f in earlier.get("figures", []) if f not in FIGURES.values()] if sections else []
    return sections, extra_figures, [m.group(0) for m in EXTENSION_BLOCK.finditer(md)]


def write_report(run_dir: Path, run_info: dict, results: list, store, cfg: ReportConfig) -> dict:
    """Write report.json, report.md, collisions/ and figures/ into ``run_dir``; return the report dict.

    ``run_info`` comes from the pipeline (model, corpus, n_prompts, n_duplicates, threshold, layers,
    timings, store, command); ``results`` are the per-layer search results (collide.search.LayerResult);
    ``store`` (or None) gives the prompt texts of the closest and colliding pairs when it keeps text.
    The time spent here is recorded as ``timings["report"]``.
    """
    start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(run_info, results, cfg.max_collisions_listed, store)
    write_collisions(run_dir, results)
    if cfg.figures:
        report["figures"] = write_figures(report, run_dir)
    report["timings"]["report"] = time.perf_counter() - start
    sections, extra_figures, blocks = earlier_extensions(run_dir)
    report.update(sections)
    report["figures"] += [f for f in extra_figures if f not in report["figures"]]
    (run_dir / "report.md").write_text(render_markdown(report) + "".join(f"\n{b}" for b in blocks))
    (run_dir / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    log.info("report: %s (%s) in %.1f s", run_dir / "report.md", report["verdict"]["status"],
             report["timings"]["report"])
    return report


# --------------------------------------------------------------------------- console


def print_summary(report: dict, console=None) -> None:
    """A rich table of the layers and the verdict, for the end of a run."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"{report['model']['name']} on {report['corpus']['name']}: {report['n_prompts']:,} prompts, "
                        f"threshold {fmt_distance(report['threshold'])}")
    for col in ("layer", "min distance", "certified", "collisions", "NN median", "seconds"):
        table.add_column(col, justify="right")
    for e in report["layers"]:
        nn = e["nn_distance"] or {}
        table.add_row(f"{e['layer']}{' (emb)' if e['is_embedding_layer'] else ''}", fmt_distance(e["min_distance"], 6),
                      "yes" if e["certified"] else "[red]no[/red]",
                      f"[red]{e['n_collisions']:,}[/red]" if e["n_collisions"] and not e["is_embedding_layer"]
                      else f"{e['n_collisions']:,}", fmt_distance(nn.get("p50")), f"{e['seconds']:.1f}")
    console.print(table)
    colour = {"no_collisions": "green", "collisions": "red"}.get(report["verdict"]["status"], "yellow")
    console.print(f"[{colour}]{STATUS_TITLES[report['verdict']['status']]}:[/{colour}] {report['verdict']['text']}",
                  highlight=False)


if __name__ == "__main__":
    from collide.compare import main

    main()
