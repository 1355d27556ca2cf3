"""``collide search STORE [layers=...] [threshold=...] [out=...] [max_listed=...] [search.KEY=...]``

Runs the certified search on every selected layer of an existing store (no model, no corpus),
prints one line per layer and writes a JSON summary (default: ``STORE/../search.json``) and,
beside it, every collision of layer K in ``<summary stem>-collisions/layer=K.parquet`` (columns
a, b: prompt ids; distance: L2, fp64), however many there are.
Keys are those of collide.config.SearchCommandConfig (``collide search --help``); the command line
is parsed by collide.cli, so a misspelt key or a bad value exits with status 2 and one line naming it.

Example: ``collide search runs/stores/x layers=0:4 search.block_rows=2048 out=s.json``
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from collide.config import SearchCommandConfig
from collide.errors import CollideError
from collide.models import select_layers

log = logging.getLogger("collide.search")


def run(cfg: SearchCommandConfig, command: str = "") -> dict:
    """Search every selected layer of ``cfg.store``; print a table; write and return the JSON summary."""
    from collide.search import search_store
    from collide.store import open_store

    store_path = Path(cfg.store)
    store = open_store(store_path)
    layers = select_layers(cfg.layers, store.layers)
    if not store.complete:
        log.warning("store %s is in-progress: searching its %d complete rows", store_path, store.n_rows)
    print(f"{'layer':>5} {'n':>9} {'min distance':>14} {'certified':>9} {'pair (prompt ids)':>21} "
          f"{'collisions':>10} {'seconds':>8}")
    out = Path(cfg.out) if cfg.out else store_path.resolve().parent / "search.json"
    collisions_dir = out.with_name(f"{out.stem}-collisions")
    try:
        collisions_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CollideError(f"cannot create {collisions_dir}: {exc.strerror}; pass out=PATH in a writable "
                           "directory") from None
    summaries = []
    for k in layers:
        lr = search_store(store, k, cfg.threshold, cfg.search)
        lr.write_collisions(collisions_dir / f"layer={k}.parquet")
        s = lr.to_dict(cfg.max_listed)
        s["collisions_file"] = str(collisions_dir / f"layer={k}.parquet")
        summaries.append(s)
        pair = "-" if s["closest_pair"] is None else "{} / {}".format(*s["closest_pair"])
        print(f"{k:>5} {s['n_vectors']:>9} {lr.result.distance:>14.6g} {str(s['certified']):>9} {pair:>21} "
              f"{s['n_collisions']:>10} {s['seconds']:>8.2f}")
    summary = {"store": str(store_path), "threshold": cfg.threshold, "search": asdict(cfg.search), "layers": summaries}
    try:
        out.write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as exc:
        raise CollideError(f"cannot write {out}: {exc.strerror}; pass out=PATH to a writable file") from None
    print(f"written {out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m collide.search ...`` = ``collide search ...``."""
    from collide.cli import main as cli_main

    return cli_main(["search", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
