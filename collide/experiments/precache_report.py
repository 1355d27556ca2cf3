"""What ``collide precache`` writes besides precache.json: precache.md and the learning curves.

Runs made one mode at a time (one process per mode) go into one figure with

    python -m collide.experiments.precache_report curves|r2 OUT.png RUN/precache.json [RUN/precache.json ...]

``curves``: every run's learning curves; ``r2``: the R^2 probes of every run's models in one figure.
Matplotlib is imported only to draw (the GPU check writes no figure).
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

from collide.config import PrecacheConfig

# keys left out of a run's label: where it writes, what it runs, its budget and its machine
UNLABELLED = {"out", "modes", "max_cpu_seconds", "threads", "figures", "device", "eval_sequences", "max_lag",
              "eval_every"}
TARGETS = (0.2, 0.8)  # the dichotomy: vanilla at most 0.2 of the trivial loss, myopic at least 0.8


def label(result: dict, mode: str, varying: set[str]) -> str:
    """``mode`` and the run's values of the config keys in ``varying`` (vanilla: less ``myopic``)."""
    keys = sorted(varying - ({"myopic"} if mode == "vanilla" else set()))
    return " ".join([mode, *(f"{k}={result['config'][k]}" for k in keys)])


def varying_keys(results: list[dict]) -> set[str]:
    """The config keys (less UNLABELLED) whose values differ among ``results``; against PrecacheConfig's
    defaults for a single run."""
    defaults = {f.name: getattr(PrecacheConfig(), f.name) for f in fields(PrecacheConfig)}
    configs = [r["config"] for r in results] + ([defaults] if len(results) == 1 else [])
    return {k for k in configs[0] if k not in UNLABELLED and len({repr(c.get(k)) for c in configs}) > 1}


def markdown(result: dict) -> str:
    """precache.md: losses against the baselines, the budget, and the R^2 table of every mode and layer."""
    c = result["config"]
    schedule = ("cosine decay to 0" if c["schedule"] == "cosine" else
                f"halved on each plateau (patience {c['patience']} x {c['eval_every']} steps after step "
                f"{c['min_steps']} and below 0.99 x the trivial loss, {c['decays']} plateaus "
                "end it)")
    lines = [f"# Pre-caching on the synthetic task (arXiv 2404.00859), task={c['task']}", "",
             f"{c['n_layers']}-layer GPT-2 (d={c['d_model']}, {c['n_heads']} heads, ReLU), batches of "
             f"{c['batch_size']} fresh sequences of {c['seq_len']}, p={result['p']}, window={c['window']}, "
             f"sin({c['freq']:g} x), {c['loss']} loss, myopic={c['myopic']}, lr {c['lr']} (1% of "
             f"{c['steps']} steps warm-up, then {schedule}), seed {c['seed']}; evaluated on "
             f"{c['eval_sequences']} held-out sequences.", "",
             f"| mode | steps | stopped | sequences | training FLOPs | test {c['loss']} | trivial (mean of y) | "
             "current-input-only | test / trivial | test / current-input | wall s | CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        lines.append(f"| {m['mode']} | {m['steps']} | {m['stopped']} | {m['sequences']:,} | {m['train_flops']:.2e} | "
                     f"{m['test_loss']:.4f} | {m['trivial_loss']:.4f} | {m['current_input_loss']:.4f} | "
                     f"{m['normalised_loss']:.3f} | {m['loss_vs_current_input']:.3f} | {m['seconds']:.0f} | "
                     f"{m['cpu_seconds']:.0f} |")
    lags = range(c["max_lag"] + 1)
    lines += ["", f"R^2 of a linear probe from the state at n to sin({c['freq']:g} x_{{n-i}}) (held-out sequences; "
              "layer 0 = the input embedding):", "", "| mode | layer | " + " | ".join(f"i={i}" for i in lags) + " |",
              "|---|---|" + "---|" * len(lags)]
    for m in result["models"]:
        for p in m["probes"]:
            lines.append(f"| {m['mode']} | {p['layer']} | " + " | ".join(f"{r:.2f}" for r in p["r2"]) + " |")
    return "\n".join(lines) + "\n"


def curves_figure(results: list[dict], path: Path) -> Path:
    """Validation loss over the trivial loss against sequences seen (log), one line per run and mode:
    vanilla solid, myopic dashed, one colour per run; the dichotomy's targets dotted."""
    from collide.report.figures import COMPARE_SIZE, _new_figure, _save

    fig = _new_figure(COMPARE_SIZE)
    ax = fig.add_subplot()
    varying = varying_keys(results)
    for k, result in enumerate(results):
        batch = result["config"]["batch_size"]
        for m in result["models"]:
            xs = [point["step"] * batch for point in m["curve"]]
            ys = [point["val_loss"] / point["val_trivial"] for point in m["curve"]]
            ax.plot(xs, ys, "-" if m["mode"] == "vanilla" else "--", color=f"C{k % 10}", lw=1.2,
                    label=f"{label(result, m['mode'], varying)} ({m['normalised_loss']:.3f})")
    for target in TARGETS:
        ax.axhline(target, color="0.5", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_ylim(0, max(1.2, *(p["val_loss"] / p["val_trivial"] for r in results for m in r["models"]
                              for p in m["curve"][len(m["curve"]) // 10:])))
    ax.set_xlabel("training sequences seen")
    ax.set_ylabel("validation loss / trivial loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax.set_title("learning curves (in brackets: test loss / trivial)", fontsize=10)
    return _save(fig, path)


def r2_figure(results: list[dict], path: Path) -> Path:
    """The R^2 probes of every run's models in one figure (the first run's config: its window)."""
    from collide.report.figures import precache_figure

    return precache_figure({**results[0], "models": [m for r in results for m in r["models"]]}, path)


def main(argv: list[str]) -> Path:
    """``curves|r2 OUT.png RUN.json ...`` (module docstring)."""
    kind, out, results = argv[0], Path(argv[1]), [json.loads(Path(p).read_text()) for p in argv[2:]]
    return (curves_figure if kind == "curves" else r2_figure)(results, out)


if __name__ == "__main__":
    main(sys.argv[1:])
