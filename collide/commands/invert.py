"""``collide invert SOURCE``: recover prompts exactly from their states at every position (``collide.invert``)."""

from __future__ import annotations

from collide.invert.config import InvertConfig

SCHEMA = InvertConfig
POSITIONAL = "source"
SUMMARY = "recover prompts exactly from their states at every position (SIPIT, certified)"


def run(cfg: InvertConfig, command: str = "") -> dict:
    """Invert every prompt of SOURCE (``collide.invert.driver.invert_source``; ``cluster=ray``: on Ray workers,
    ``collide.cluster.invert_source_ray``), then one row per prompt."""
    from collide.console import print_table, say
    from collide.invert.driver import invert_source
    from collide.invert.output import outcome_text

    from rich.markup import escape

    if cfg.cluster.kind == "ray":
        from collide.cluster import invert_source_ray

        doc = invert_source_ray(cfg, cfg.cluster, command)
    else:
        doc = invert_source(cfg, command)
    rows = [[escape(str(p["key"])), str(p["n_positions"]), {True: "yes", False: "NO"}.get(p.get("exact"), "-"),
             "yes" if p["complete"] else "NO", f"{p['seconds']:.1f}", escape(repr(p["recovered_text"][:60]))]
            for p in doc["prompts"]]
    print_table(f"inversion at layer {doc['layer']}", ["prompt", "positions", "exact", "complete", "seconds",
                                                       "recovered text"], rows, left=["prompt", "recovered text"])
    say(outcome_text(doc))
    return doc
