"""Figures of collide reports (PNG, headless).

Every function draws from plain dicts (a report.json, a comparison, an
exhaustive.json), so a figure can be redrawn later from the JSON alone. Matplotlib's object API
is used without pyplot: no global state, no GUI backend, nothing left open.

Conventions: distances are L2 (not squared). A log axis cannot show an exact 0 (a collision), so
zeros are drawn at the axis floor with a red down-triangle and named in the legend. Layer 0 is
the embedding layer (shaded): prompts that end in the same token share it by construction.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from collide.atomic import atomic_write

DPI = 100  # PNG pixels = figure inches x DPI
REPORT_SIZE = (8.0, 4.5)  # inches: 800 x 450 px
COMPARE_SIZE = (10.0, 5.5)  # inches: 1000 x 550 px
MAX_TICKS = 16  # at most this many x ticks, whatever the depth (31+ layers stay readable)


def fmt_distance(x: float | None, digits: int = 4) -> str:
    """A distance (or threshold) for people: "-" when undefined (None), else ``digits`` significant
    digits with a short exponent (1e-6, not 1e-06)."""
    return "-" if x is None else re.sub(r"e([+-])0+(\d)", r"e\1\2", f"{x:.{digits}g}")


def _new_figure(size: tuple[float, float], fixed: bool = False) -> Figure:
    """A figure of ``size`` inches. ``fixed``: the run report's margins (legends inside the axes, titles of at
    most two lines), several times faster to draw than the constrained layout the other figures need."""
    fig = Figure(figsize=size, dpi=DPI, layout=None if fixed else "constrained")
    if fixed:
        fig.subplots_adjust(left=0.09, right=0.98, bottom=0.12, top=0.86, wspace=0.25)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` to ``path`` atomically, in the format its suffix names (.png)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # no bbox_inches="tight": the pixel size stays exactly size x DPI
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format=path.suffix.lstrip(".")))
    return path


def log_floor(values, threshold: float) -> float:
    """Where an exact 0 is drawn on a log axis: a decade below the smallest positive value or threshold."""
    positive = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return 10 ** math.floor(math.log10(min(positive + [threshold]))) / 10


def _title(report: dict) -> str:
    m, c = report["model"], report["corpus"]
    return (f"{m['name']} on {c['name']}: {report['n_prompts']:,} prompts, {m['dtype']}, "
            f"final norm {m['final_norm']}, L={m['n_layers']}")


def _shade_embedding_layer(ax, x0: float = 0.0, width: float = 0.5) -> None:
    ax.axvspan(x0 - width, x0 + width, color="0.85", zorder=0, label="layer 0: embeddings (expected to collide)")


def min_distance_figure(report: dict, path: Path) -> Path:
    """Min pairwise L2 per layer (log y) with the collision threshold as a line; hollow = not certified."""
    threshold = report["threshold"]
    layers = report["layers"]
    xs = [e["layer"] for e in layers]
    ys = [e["min_distance"] for e in layers]
    floor = log_floor(ys, threshold)
    fig = _new_figure(REPORT_SIZE, fixed=True)
    ax = fig.add_subplot()
    if any(e["is_embedding_layer"] for e in layers):
        _shade_embedding_layer(ax)
    drawn = [(x, y) for x, y in zip(xs, ys) if y is not None and y > 0]
    ax.plot([x for x, _ in drawn], [y for _, y in drawn], "-", color="C0", lw=1.2, zorder=2)
    certified = [(e["layer"], e["min_distance"]) for e in layers if e["certified"] and (e["min_distance"] or 0) > 0]
    uncertified = [(e["layer"], e["min_distance"]) for e in layers
                   if not e["certified"] and (e["min_distance"] or 0) > 0]
    zeros = [e["layer"] for e in layers if e["min_distance"] == 0]
    if certified:
        ax.plot(*zip(*certified), "o", color="C0", ms=5, zorder=3, label="certified exact minimum")
    if uncertified:
        ax.plot(*zip(*uncertified), "o", mfc="white", mec="C0", ms=6, zorder=3,
                label="not certified (an upper bound)")
    if zeros:
        ax.plot(zeros, [floor] * len(zeros), "v", color="C3", ms=7, zorder=4, label="exactly 0 (drawn at the floor)")
    ax.axhline(threshold, color="C3", ls="--", lw=1, label=f"collision threshold {fmt_distance(threshold)}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor / 2)
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=MAX_TICKS, integer=True))
    ax.set_xlabel("layer (0 = embeddings, k = output of block k)")
    ax.set_ylabel("min pairwise L2 distance (log)")
    ax.set_title(_title(report), fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def nn_boxplot_figure(report: dict, path: Path) -> Path:
    """Per-layer boxplot of each prompt's nearest-neighbour L2 distance (log y), from the report's percentiles.

    Box = 25-75%, line = median, whiskers = 5-95%, dots = min and max (the min is the layer's
    minimum pairwise distance).
    """
    threshold = report["threshold"]
    entries = [e for e in report["layers"] if e["nn_distance"] is not None]
    values = [v for e in entries for v in e["nn_distance"].values()]
    floor = log_floor(values, threshold)
    fig = _new_figure(REPORT_SIZE, fixed=True)
    ax = fig.add_subplot()
    if any(e["is_embedding_layer"] for e in entries):
        _shade_embedding_layer(ax)

    def at_floor(v: float) -> float:
        return v if v > 0 else floor

    stats = [dict(med=at_floor(p["p50"]), q1=at_floor(p["p25"]), q3=at_floor(p["p75"]), whislo=at_floor(p["p5"]),
                  whishi=at_floor(p["p95"]), fliers=[at_floor(p["min"]), at_floor(p["max"])])
             for p in (e["nn_distance"] for e in entries)]
    positions = [e["layer"] for e in entries]
    if stats:
        ax.bxp(stats, positions=positions, widths=0.6, manage_ticks=False, patch_artist=True,
               boxprops=dict(facecolor="C0", alpha=0.35), medianprops=dict(color="C0"),
               flierprops=dict(marker=".", ms=4, mec="0.3"))
    if any(v == 0 for v in values):
        ax.axhline(floor, color="C3", lw=0.8, ls=":", label="exactly 0 (drawn at the floor)")
    ax.axhline(threshold, color="C3", ls="--", lw=1, label=f"collision threshold {fmt_distance(threshold)}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor / 2)
    if positions:
        ax.set_xlim(min(positions) - 0.6, max(positions) + 0.6)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=MAX_TICKS, integer=True))
    ax.set_xlabel("layer (0 = embeddings, k = output of block k)")
    sampled = {e["nearest"]["n_rows"] for e in entries if (e.get("nearest") or {}).get("rows") == "sample"}
    ax.set_ylabel("nearest-neighbour L2 distance per prompt (log)" if not sampled else
                  f"nn L2 distance, {', '.join(f'{k:,}' for k in sorted(sampled))} sampled prompts (log)")
    ax.set_title(_title(report) + "\nbox 25-75%, whiskers 5-95%, dots min and max"
                 + (" (sample: each nn exact)" if sampled else ""), fontsize=10)
    ax.grid(True, axis="y", which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def comparison_figure(runs: list[dict], path: Path, depth_axis: str = "relative") -> Path:
    """Min pairwise L2 per layer, one line per run (the runs of collide.report.compare.comparison_json).

    ``depth_axis``: "relative" puts layer k of an L-block model at k / L (0 = embeddings, 1 = last),
    so models of different depth compare; "absolute" uses the layer index. Runs flagged with a
    problem are dashed and keep their note in the legend.
    """
    thresholds = sorted({r["threshold"] for r in runs})
    all_y = [p["min_distance"] for r in runs for p in r["per_layer"]]
    floor = log_floor(all_y, min(thresholds) if thresholds else 1e-6)
    fig = _new_figure(COMPARE_SIZE)
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        pts = [(p["depth"] if depth_axis == "relative" else p["layer"], p["min_distance"], p["certified"])
               for p in run["per_layer"] if p["min_distance"] is not None]
        label = run["label"] + (" [" + "; ".join(run["problems"]) + "]" if run["problems"] else "")
        ax.plot([x for x, y, _ in pts if y > 0], [y for _, y, _ in pts if y > 0],
                "-" if not run["problems"] else "--", color=color, lw=1.3, marker="o", ms=3, label=label)
        zeros = [x for x, y, _ in pts if y == 0]
        if zeros:
            ax.plot(zeros, [floor] * len(zeros), "v", color=color, ms=6)
        hollow = [(x, y) for x, y, c in pts if not c and y > 0]
        if hollow:
            ax.plot(*zip(*hollow), "o", mfc="white", mec=color, ms=6)
    if any(y == 0 for y in all_y):
        ax.axhline(floor, color="0.5", lw=0.8, ls=":", label="exactly 0 (triangles at the floor)")
    for t in thresholds:
        ax.axhline(t, color="C3", ls="--", lw=1, label=f"collision threshold {fmt_distance(t)}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor / 2)
    if depth_axis == "relative":
        ax.set_xlabel("relative depth: layer / L (0 = embeddings, 1 = last layer)")
        ax.set_xlim(-0.03, 1.03)
    else:
        ax.set_xlabel("layer (0 = embeddings, k = output of block k)")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=MAX_TICKS, integer=True))
    ax.set_ylabel("min pairwise L2 distance (log)")
    ax.set_title("min pairwise L2 per layer, one line per run (hollow = not certified, dashed = see note)",
                 fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _save(fig, path)


def exhaustive_figure(result: dict, path: Path, title: str) -> Path:
    """PNG: min distance per layer (log y). Exhaustive: each set a grey dot, the min over sets a line (pairs
    with different inputs: identical embedding rows collide by construction and are reported apart).
    Margin: mean over prompts with the min..max band (and the paper's GPT-2 Small line when it applies).
    Exact zeros sit at the axis floor as red triangles; the threshold is a dashed red line."""
    fig = _new_figure(REPORT_SIZE)
    ax = fig.add_subplot()
    layers, threshold = result["layers"], result["threshold"]
    if result["mode"] == "exhaustive":
        n_sets = result["n_sets"]  # sets are spread over +-0.2 around their layer, so that they stay visible
        per_set = [(e["layer"] + 0.4 * ((s + 0.5) / n_sets - 0.5), x) for e in result["per_layer"]
                   for s, x in enumerate(e["distinct_inputs"]["min_distance_per_set"]) if x is not None]
        main = [e["distinct_inputs"]["min_distance"] for e in result["per_layer"]]
    else:
        per_set = []
        main = [e["mean_min_distance"] for e in result["per_layer"]]
    floor = log_floor([x for _, x in per_set] + main, threshold)
    if per_set:
        ax.scatter([k for k, _ in per_set], [max(x, floor) for _, x in per_set], s=12, color="0.6",
                   label="min within one prompt's set", zorder=2)
    label = "min over all sets (different inputs)" if result["mode"] == "exhaustive" else "mean over prompts of the min"
    ax.plot(layers, [floor if x is None or x <= 0 else x for x in main], "o-", color="C0", label=label, zorder=3)
    if result["mode"] == "margin":
        ax.fill_between(layers, [max(e["min_min_distance"], floor) for e in result["per_layer"]],
                        [e["max_min_distance"] for e in result["per_layer"]], color="C0", alpha=0.15,
                        label="smallest .. largest prompt")
        paper = [(e["layer"], e["paper_gpt2_small"]) for e in result["per_layer"] if e["paper_gpt2_small"]]
        if paper:
            ax.plot(*zip(*paper), "s--", color="C2", label="paper (GPT-2 Small)")
    zeros = [k for k, x in per_set if x == 0] + [k for k, x in zip(layers, main) if x == 0]
    if zeros:
        ax.scatter(zeros, [floor] * len(zeros), marker="v", color="red", s=40, zorder=4, label="distance exactly 0")
    ax.axhline(threshold, color="red", linestyle="--", linewidth=1,
               label=f"collision threshold {fmt_distance(threshold)}")
    ax.set_yscale("log")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("L2 distance (not squared)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=MAX_TICKS))
    if len(layers) == 1:
        ax.set_xlim(layers[0] - 1, layers[0] + 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(True, which="major", alpha=0.3)
    return _save(fig, path)


def probe_figure(result: dict, path: Path) -> Path:
    """Future-token probe accuracy per layer (collide.experiments.probe's probe.json): top-1 and top-5 panels,
    one line per lookahead tau; the bigram baseline of each tau dashed and the most frequent token
    dotted, in the tau's colour."""
    fig = _new_figure((10.0, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    baselines = {b["tau"]: b for b in result["baselines"]}
    top = max([e["top5"] for e in result["results"]] + [b[m]["top5"] for b in baselines.values()
                                                         for m in ("bigram", "most_frequent")])
    for ax, metric in zip(axes, ("top1", "top5")):
        for i, tau in enumerate(result["taus"]):
            color = f"C{i % 10}"
            pts = sorted((e["layer"], e[metric]) for e in result["results"] if e["tau"] == tau)
            ax.plot(*zip(*pts), "o-", ms=3, color=color, label=f"probe, tau={tau}")
            ax.axhline(baselines[tau]["bigram"][metric], color=color, ls="--", lw=0.9)
            ax.axhline(baselines[tau]["most_frequent"][metric], color=color, ls=":", lw=0.9)
        ax.plot([], [], "k--", lw=0.9, label="bigram from the token at t")
        ax.plot([], [], "k:", lw=0.9, label="most frequent token")
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_title(f"{metric[:3]}-{metric[3:]} accuracy of the token at t+tau", fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=MAX_TICKS))
        ax.set_ylim(0, min(1.0, 1.15 * top + 0.02))
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("accuracy on held-out prompts")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle(f"{result['model']}: linear probes from the state at t, {result['n_prompts']:,} prompts "
                 f"({result['split']['test']} held out)", fontsize=10)
    return _save(fig, path)


def precache_figure(result: dict, path: Path) -> Path:
    """R^2 of linear probes from the state at n to sin(freq x_{n-i}) per lag i (collide.experiments.precache's
    precache.json, whose config gives freq): one colour per layer, solid = vanilla training, dashed = myopic."""
    freq = f"{float(result['config'].get('freq', 10.0)):g}"
    fig = _new_figure(REPORT_SIZE)
    ax = fig.add_subplot()
    styles = {"vanilla": "-", "myopic": "--"}
    for model in result["models"]:
        for probe in model["probes"]:
            ax.plot(range(len(probe["r2"])), probe["r2"], styles.get(model["mode"], "-."), marker="o", ms=3,
                    color=f"C{probe['layer'] % 10}", label=f"{model['mode']}, layer {probe['layer']}")
    ax.axvline(result["config"]["window"] - 0.5, color="0.5", lw=0.8, ls=":", label="end of the target's window")
    ax.set_xlabel(f"lag i: the probe reads sin({freq} x_{{n-i}}) from the state at n")
    ax.set_ylabel("R^2 on held-out sequences")
    ax.set_ylim(min(-0.05, *(min(p["r2"]) for m in result["models"] for p in m["probes"])), 1.0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=MAX_TICKS))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title(f"pre-caching: what the state at n keeps of past sin({freq} x) (0 = the input embedding)", fontsize=10)
    return _save(fig, path)


def _diagnostic_series(layers: list[dict]) -> tuple[list, list, list, list]:
    """(layer, relative margin, co-Lipschitz min, co-Lipschitz median) of the entries that have diagnostics."""
    rows = [(e["layer"], e["diagnostics"]) for e in layers if e.get("diagnostics")]
    xs = [x for x, _ in rows]
    margin = [d["relative_margin"] for _, d in rows]
    co_min = [(d["co_lipschitz"] or {}).get("min") for _, d in rows]
    co_med = [(d["co_lipschitz"] or {}).get("p50") for _, d in rows]
    return xs, margin, co_min, co_med


def _log_panel(ax, series: list[tuple[list, list, str, str]], ylabel: str) -> None:
    """Lines on a log y axis; exact zeros as red down-triangles at the floor."""
    values = [y for _, ys, _, _ in series for y in ys]
    floor = log_floor(values, min([v for v in values if v] or [1e-6]))
    for xs, ys, style, label in series:
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        ax.plot([x for x, y in pts if y > 0], [y for _, y in pts if y > 0], style, ms=3, lw=1.2, label=label)
        zeros = [x for x, y in pts if y == 0]
        if zeros:
            ax.plot(zeros, [floor] * len(zeros), "v", color="C3", ms=6)
    if any(v == 0 for v in values if v is not None):
        ax.axhline(floor, color="C3", lw=0.8, ls=":", label="exactly 0 (a collision; drawn at the floor)")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor / 2)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=MAX_TICKS, integer=True))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def diagnostics_figure(report: dict, path: Path) -> Path:
    """Two panels per layer (log y): the relative separation margin (min L2 / median state norm), and the
    co-Lipschitz estimate (L2 per token edit over nearest-neighbour pairs: min and median)."""
    xs, margin, co_min, co_med = _diagnostic_series(report["layers"])
    fig = _new_figure((10.0, 4.5), fixed=True)
    left, right = fig.subplots(1, 2)
    _log_panel(left, [(xs, margin, "-o", "min L2 / median state norm")], "relative separation margin (log)")
    _log_panel(right, [(xs, co_min, "-o", "min over NN pairs"), (xs, co_med, "--.", "median over NN pairs")],
               "co-Lipschitz: L2 per token edit (log)")
    for ax in (left, right):
        ax.set_xlabel("layer (0 = embeddings)")
    quant = (report["model"].get("quant") or {})
    tag = f"activations {quant.get('activations', 'none')}, weights {quant.get('weights', 'none')}"
    fig.suptitle(_title(report) + f"\nquantized forward: {tag}", fontsize=10)
    return _save(fig, path)


def comparison_diagnostics_figure(runs: list[dict], path: Path) -> Path:
    """Relative separation margin and co-Lipschitz min per layer, one line per run (``per_layer`` entries
    with ``relative_margin`` and ``co_lipschitz_min``), e.g. the quantization levels of a sweep."""
    fig = _new_figure(COMPARE_SIZE)
    left, right = fig.subplots(1, 2)
    _log_panel(left, [([p["layer"] for p in r["per_layer"]], [p.get("relative_margin") for p in r["per_layer"]],
                       "-o", r["label"]) for r in runs], "relative separation margin (log)")
    _log_panel(right, [([p["layer"] for p in r["per_layer"]], [p.get("co_lipschitz_min") for p in r["per_layer"]],
                        "-o", r["label"]) for r in runs], "co-Lipschitz min: L2 per token edit (log)")
    for ax in (left, right):
        ax.set_xlabel("layer (0 = embeddings)")
    fig.suptitle("geometric diagnostics per layer, one line per run (arXiv 2511.14808's margin and co-Lipschitz)",
                 fontsize=10)
    return _save(fig, path)
