"""The per-layer table of docs/quantization.md from runs' report.json files.

usage: python benchmarks/quant_table.py NAME=RUN_DIR [NAME=RUN_DIR ...] [layers=1,8,15]

One row per layer (every layer of the first run, or ``layers``), and per run: colliding pairs, the exact
min L2, the relative margin over the median ‖h‖ and over the median centred norm ‖h − mean‖, and the
co-Lipschitz min (docs/quantization.md defines them). Markdown on stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cells(entry: dict) -> list[str]:
    diag = entry.get("diagnostics") or {}
    co = (diag.get("co_lipschitz") or {}).get("min")
    return [f"{entry['n_collisions']:,}", f"{entry['min_distance']:.4g}",
            *(f"{diag[key]:.3g}" if diag.get(key) is not None else "-"
              for key in ("relative_margin", "relative_margin_centred")),
            f"{co:.3g}" if co is not None else "-"]


def main(argv: list[str]) -> None:
    runs = {name: json.loads((Path(path) / "report.json").read_text())
            for name, path in (a.split("=", 1) for a in argv if not a.startswith("layers="))}
    wanted = next((a.split("=", 1)[1] for a in argv if a.startswith("layers=")), None)
    by_layer = {name: {e["layer"]: e for e in report["layers"]} for name, report in runs.items()}
    first = next(iter(by_layer.values()))
    layers = [int(k) for k in wanted.split(",")] if wanted else sorted(first)
    head = ["layer"] + [f"{name}: {col}" for name in runs for col in
                        ("collisions", "min L2", "rel. margin", "rel. margin (centred)", "co-Lip min")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---:|" * len(head))
    for k in layers:
        print(f"| {k} | " + " | ".join(c for name in runs for c in cells(by_layer[name][k])) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
