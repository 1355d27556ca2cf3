"""``python -m collide.search STORE [layers=...] [threshold=...] [out=...] [max_listed=...] [search.KEY=...]``

Runs the certified search on every selected layer of an existing store (no model, no corpus),
prints one line per layer and writes a JSON summary (default: ``STORE/../search.json``) and,
beside it, every collision of layer K in ``<summary stem>-collisions/layer=K.parquet`` (columns
a, b: prompt ids; distance: L2, fp64), however many there are.
Keys are those of ``SearchCLI`` below, and ``search.*`` those of collide.config.SearchConfig;
a misspelt key or a bad value exits with status 2 and one line naming it.

Example: ``python -m collide.search runs/x/store layers=0:4 search.block_rows=2048 out=s.json``
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from collide.config import SearchConfig
from collide.errors import CollideError

log = logging.getLogger("collide.search")


@dataclass
class SearchCLI:
    layers: Any = "all"  # store layers to search: all, an int, a list [0, 5] or a range "a:b" (inclusive)
    threshold: float = 1e-6  # L2 distance (not squared) under which a pair is a collision
    out: Optional[str] = None  # JSON summary path; None = STORE/../search.json
    max_listed: int = 100  # collisions per layer copied into the JSON (the Parquet files hold them all)
    search: SearchConfig = field(default_factory=SearchConfig)  # engine settings (search.backend=..., ...)


def parse_args(argv: list[str]) -> tuple[Path, SearchCLI]:
    """STORE and the key=value overrides, merged into the typed SearchCLI schema."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    paths = [a for a in argv if "=" not in a]
    if len(paths) != 1:
        raise CollideError(f"expected one STORE directory and key=value overrides, got {argv!r}; "
                           "usage: python -m collide.search STORE [layers=...] [threshold=...] [search.KEY=...]")
    # YAML would read a range like 1:30 as the base-60 integer 90: keep it a string
    overrides = [f"layers='{a[7:]}'" if a.startswith("layers=") and ":" in a and "'" not in a else a
                 for a in argv if "=" in a]
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(SearchCLI), OmegaConf.from_dotlist(overrides))
        return Path(paths[0]), OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        first = str(exc).strip().splitlines()[0]
        raise CollideError(f"bad override in {overrides}: {first}; keys: {list(SearchCLI.__dataclass_fields__)} "
                           f"and search.{{{','.join(SearchConfig.__dataclass_fields__)}}}") from None


def select_layers(spec, available: list[int]) -> list[int]:
    """The layers asked for ("all", an int, a list or "a:b" inclusive), each of which the store must hold."""
    if spec in ("all", None):
        return list(available)
    if isinstance(spec, str) and ":" in spec:
        lo, hi = spec.split(":", 1)
        lo, hi = int(lo) if lo else min(available), int(hi) if hi else max(available)
        wanted = [k for k in available if lo <= k <= hi]
    elif isinstance(spec, (int, str)):
        wanted = [int(spec)]
    else:
        wanted = sorted({int(k) for k in spec})
    missing = [k for k in wanted if k not in available]
    if missing or not wanted:
        raise CollideError(f"layers={spec!r}: the store holds layers {available}, not {missing or spec}; "
                           "pick layers among those")
    return wanted


def _finite(x: float):
    return x if math.isfinite(x) else None


def layer_summary(lr, max_listed: int) -> dict:
    """JSON-able summary of a LayerResult, pairs as prompt ids."""
    r, ids = lr.result, lr.prompt_ids
    return {
        "layer": lr.layer, "n": int(len(ids)), "n_pairs": r.n_pairs, "min_distance": _finite(r.distance),
        "closest_pair": list(lr.closest_pair_ids()) if r.pair is not None else None,
        "certified": r.certified, "uncertified_reason": r.uncertified_reason,
        "n_collisions": r.n_collisions,
        "collisions": [{"a": int(ids[i]), "b": int(ids[j]), "distance": dist} for i, j, dist in
                       r.collisions[:max_listed]],
        "invalid_prompt_ids": [int(ids[i]) for i in r.invalid_rows],
        "backend": r.backend, "precision": r.precision, "n_candidates": r.n_candidates, "seconds": r.seconds,
    }


def run(store_path: Path, cfg: SearchCLI) -> dict:
    """Search every selected layer of the store; print a table; write and return the JSON summary."""
    from collide.search import search_store
    from collide.store import open_store

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
        s = layer_summary(lr, cfg.max_listed)
        s["collisions_file"] = str(collisions_dir / f"layer={k}.parquet")
        summaries.append(s)
        pair = "-" if s["closest_pair"] is None else "{} / {}".format(*s["closest_pair"])
        print(f"{k:>5} {s['n']:>9} {lr.result.distance:>14.6g} {str(s['certified']):>9} {pair:>21} "
              f"{s['n_collisions']:>10} {s['seconds']:>8.2f}")
    summary = {"store": str(store_path), "threshold": cfg.threshold, "search": asdict(cfg.search), "layers": summaries}
    try:
        out.write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as exc:
        raise CollideError(f"cannot write {out}: {exc.strerror}; pass out=PATH to a writable file") from None
    print(f"written {out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        store_path, cfg = parse_args(sys.argv[1:] if argv is None else argv)
        run(store_path, cfg)
    except CollideError as exc:
        print(f"collide: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
