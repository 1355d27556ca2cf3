"""What ``collide precache`` writes besides precache.json: precache.md and the learning curves.

The curves of several runs go into one figure with

    python -m collide.experiments.precache_report OUT.png RUN/precache.json [RUN/precache.json ...]
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


def label(result: dict, mode: str) -> str:
    """``mode`` and the keys of the run's config that differ from PrecacheConfig's defaults."""
    defaults = {f.name: getattr(PrecacheConfig(), f.name) for f in fields(PrecacheConfig)}
    changed = [f"{k}={v}" for k, v in result["config"].items() if k not in UNLABELLED and v != defaults.get(k)]
    return " ".join([mode, *changed])


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
    from collide.report.figures import REPORT_SIZE, _new_figure, _save

    fig = _new_figure(REPORT_SIZE)
    ax = fig.add_subplot()
    for k, result in enumerate(results):
        batch = result["config"]["batch_size"]
        for m in result["models"]:
            xs = [point["step"] * batch for point in m["curve"]]
            ys = [point["val_loss"] / point["val_trivial"] for point in m["curve"]]
            ax.plot(xs, ys, "-" if m["mode"] == "vanilla" else "--", color=f"C{k % 10}", lw=1.2,
                    label=f"{label(result, m['mode'])} ({m['normalised_loss']:.2f})")
    for target in TARGETS:
        ax.axhline(target, color="0.5", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_ylim(0, max(1.2, *(p["val_loss"] / p["val_trivial"] for r in results for m in r["models"]
                              for p in m["curve"][len(m["curve"]) // 10:])))
    ax.set_xlabel("training sequences seen")
    ax.set_ylabel("validation loss / trivial loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title("pre-caching task: learning curves (in brackets: test loss / trivial; dotted: 0.2 and 0.8)",
                 fontsize=10)
    return _save(fig, path)


if __name__ == "__main__":
    curves_figure([json.loads(Path(p).read_text()) for p in sys.argv[2:]], Path(sys.argv[1]))
