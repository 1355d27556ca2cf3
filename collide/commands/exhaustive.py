"""``collide exhaustive RUN_DIR``: the paper's exhaustive continuation test on a finished run (``collide.exhaustive``)."""

from __future__ import annotations

from collide.exhaustive.config import ExhaustiveConfig

SCHEMA = ExhaustiveConfig
POSITIONAL = "run_dir"
SUMMARY = "the paper's exhaustive continuation test on a finished run"


def run(cfg: ExhaustiveConfig, command: str = "") -> dict:
    """The whole test (``collide.exhaustive.exhaustive_test``), then a table of its per-layer results."""
    from collide.console import print_table
    from collide.exhaustive.driver import exhaustive_test
    from collide.report.figures import fmt_distance

    result = exhaustive_test(cfg, command)
    title = f"{result['mode']} test: {result['model']['name']}, {result['n_sets']} prompts"
    if result["mode"] == "exhaustive":
        columns = ["layer", "pairs", "min distance", "certified", "collisions", "identical inputs"]
        rows = [[str(e["layer"]), f"{e['n_pairs']:,}", fmt_distance(e["distinct_inputs"]["min_distance"], 6),
                 "yes" if e["distinct_inputs"]["certified"] else "NO", f"{e['distinct_inputs']['n_collisions']:,}",
                 f"{e['n_collisions_identical_inputs']:,}"] for e in result["per_layer"]]
    else:
        paper = any(e["paper_gpt2_small"] is not None for e in result["per_layer"])
        columns = ["layer", "mean min distance", "smallest", "certified"] + (["paper GPT-2 Small"] if paper else [])
        rows = [[str(e["layer"]), fmt_distance(e["mean_min_distance"], 4), fmt_distance(e["min_min_distance"], 4),
                 "yes" if e["certified"] else "NO"] + ([fmt_distance(e["paper_gpt2_small"], 4)] if paper else [])
                for e in result["per_layer"]]
    print_table(title, columns, rows)
    return result
