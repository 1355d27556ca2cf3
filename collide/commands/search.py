"""``collide search STORE|RUN_DIR``: the certified search again on a store (no model, no corpus).

Searches every selected layer, prints one row per layer, and writes a JSON summary (default:
``search.json`` beside the store, or inside the run directory) and, beside it, every collision of
layer K in ``<summary stem>-collisions/layer=K.parquet`` (columns a, b: prompt ids; distance: L2,
fp64), however many there are. Example: ``collide search runs/stores/x layers=0:4 out=s.json``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from dataclasses import dataclass, field as default
from typing import Any, Optional

from omegaconf import MISSING

from collide.config import SearchConfig
from collide.errors import CollideError


@dataclass
class SearchCommandConfig:
    """``collide search STORE``: the certified search again on a store (no model, no corpus)."""

    store: str = MISSING  # the store directory, or a run directory (its store) (positional)
    layers: Any = "all"  # store layers to search: all, an int, a list [0, 5] or a range "a:b" (inclusive)
    threshold: float = 1e-6  # L2 distance (not squared) under which a pair is a collision
    out: Optional[str] = None  # JSON summary path; None = search.json beside STORE (or in RUN_DIR)
    max_listed: int = 100  # collisions per layer copied into the JSON (the Parquet files hold them all)
    search: SearchConfig = default(default_factory=SearchConfig)  # engine settings (search.backend=...)


log = logging.getLogger(__name__)

SCHEMA = SearchCommandConfig
POSITIONAL = "store"
SUMMARY = "search a store again (no model): search.json + collisions Parquet"


def summary_path(cfg: SearchCommandConfig, store_dir: Path) -> Path:
    """``out``, else ``search.json`` beside the store (a store argument) or in the run directory (a run)."""
    if cfg.out:
        return Path(cfg.out)
    given = Path(cfg.store).resolve()
    return (given.parent if given == store_dir.resolve() else given) / "search.json"


def run(cfg: SearchCommandConfig, command: str = "") -> dict:
    """Search every selected layer of the store (or of the run's store); write and return the JSON summary."""
    from collide.atomic import os_error_message, write_outputs
    from collide.console import print_table, say
    from collide.layers import select_layers
    from collide.search import search_store
    from collide.store import open_run_store

    store = open_run_store(cfg.store)
    layers = select_layers(cfg.layers, store.layers)
    if not store.complete:
        log.warning("store %s is in-progress: searching its %d complete rows", store.path, store.n_rows)
    out = summary_path(cfg, store.path)
    collisions_dir = out.with_name(f"{out.stem}-collisions")
    try:
        collisions_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CollideError(f"cannot create {collisions_dir}: {exc.strerror}; pass out=PATH in a writable "
                           "directory") from None
    summaries, rows = [], []
    for k in layers:
        result = search_store(store, k, cfg.threshold, cfg.search)
        result.write_collisions(collisions_dir / f"layer={k}.parquet")
        entry = result.to_dict(cfg.max_listed)
        entry["collisions_file"] = str(collisions_dir / f"layer={k}.parquet")
        summaries.append(entry)
        pair = "-" if entry["closest_pair"] is None else "{} / {}".format(*entry["closest_pair"])
        rows.append([str(k), f"{entry['n_vectors']:,}", f"{result.result.distance:.6g}",
                     "yes" if entry["certified"] else "[red]no[/red]", pair, f"{entry['n_collisions']:,}",
                     f"{entry['seconds']:.2f}"])
    summary = {"store": str(cfg.store), "threshold": cfg.threshold, "search": asdict(cfg.search), "layers": summaries}
    try:
        written = write_outputs(out.parent, out.stem, summary)
    except OSError as exc:
        raise CollideError(os_error_message(out, exc, setting="out")) from None
    print_table(f"certified search of {store.path}", ["layer", "n", "min distance", "certified", "pair (prompt ids)",
                                                      "collisions", "seconds"], rows)
    say(f"written {written}")
    return summary
