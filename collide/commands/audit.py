"""``collide audit SOURCE``: which layers of an activation cache give back its text (``collide.invert.audit``)."""

from __future__ import annotations

from collide.invert.config import AuditConfig

SCHEMA = AuditConfig
POSITIONAL = "source"
SUMMARY = "which stored layers give back the exact text, how much of it, how fast (inversion of a sample)"


def run(cfg: AuditConfig, command: str = "") -> dict:
    """Audit SOURCE (``collide.invert.audit.audit_source``), then one table row per layer and the verdict."""
    from collide.console import print_table, say
    from collide.invert.audit import audit_source

    doc = audit_source(cfg, command)
    rows = [[str(e["layer"]), e["status"], "-" if e.get("exact_prompts") is None else str(e["exact_prompts"]),
             f"{e.get('recovered_positions', 0)}/{e.get('n_positions', 0)}", str(e.get("tied_positions", "-")),
             str(e.get("missed_positions", "-")), f"{e.get('seconds_per_prompt') or 0:.1f}"]
            for e in doc["layers"]]
    print_table(f"audit of {doc['source']}", ["layer", "status", "exact prompts", "positions", "tied", "missed",
                                             "s / prompt"], rows)
    say(doc["verdict"])
    return doc
