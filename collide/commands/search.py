"""``collide search STORE|RUN_DIR``: the certified search again on a store (no model, no corpus).

Searches every selected layer, prints one row per layer, and writes a JSON summary and every collision
of layer K (columns a, b: prompt ids; distance: L2, fp64), however many there are. By default both go
to a folder of their own inside the directory named (the store, or the run directory):
``searches/<settings hash>/search.json`` and ``searches/<settings hash>/collisions/layer=K.parquet``,
the hash covering the rows searched, the layers, the threshold, max_listed and the engine settings, so
searches of other stores or with other settings never replace each other's files. ``out=FILE.json``
writes the summary there and the collisions in ``<FILE stem>-collisions/`` beside it.

The collision files are written to a temporary folder and moved into place just before the JSON, so
a search that fails (or is interrupted) leaves the files of the previous search, or none, never a
file that its JSON does not list. Example: ``collide search runs/stores/x layers=0:4 threshold=1e-5``.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass, field as default
from pathlib import Path
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
    # JSON summary file (collisions in <stem>-collisions/ beside it); None = STORE/searches/<settings hash>/search.json
    out: Optional[str] = None
    max_listed: int = 100  # collisions per layer copied into the JSON (the Parquet files hold them all)
    search: SearchConfig = default(default_factory=SearchConfig)  # engine settings (search.backend=...)


log = logging.getLogger(__name__)

SCHEMA = SearchCommandConfig
POSITIONAL = "store"
SUMMARY = "search a store again (no model): searches/<hash>/search.json + collisions Parquet"
RERUN = "nothing was written: run the same `collide search` command again to search from the start"
SEARCHES = "searches"  # the folder of a store (or run directory) that holds its searches, one per settings hash


def settings_hash(cfg: SearchCommandConfig, layers: list[int], n_rows: int) -> str:
    """12 hex digits naming a search: the rows searched, layers, threshold, max_listed and engine settings
    (the progress bar left out)."""
    from collide.store.identity import identity_hash

    engine = {k: v for k, v in asdict(cfg.search).items() if k != "progress"}
    return identity_hash({"n_rows": n_rows, "layers": layers, "threshold": cfg.threshold,
                          "max_listed": cfg.max_listed, "search": engine})


def output_paths(cfg: SearchCommandConfig, layers: list[int], n_rows: int) -> tuple[Path, Path]:
    """(JSON summary, collisions folder): ``out`` and ``<stem>-collisions/`` beside it, else
    ``STORE|RUN_DIR/searches/<settings hash>/search.json`` and ``collisions/`` beside it."""
    if cfg.out:
        out = Path(cfg.out)
        return out, out.with_name(f"{out.stem}-collisions")
    folder = Path(cfg.store) / SEARCHES / settings_hash(cfg, layers, n_rows)
    return folder / "search.json", folder / "collisions"


def check(cfg: SearchCommandConfig) -> None:
    """One-line errors for a STORE that is not there, an ``out`` that is no JSON file path, a negative max_listed."""
    if not Path(cfg.store).exists():
        raise CollideError(f"{cfg.store} does not exist; pass a store directory (e.g. one under runs/stores/) or "
                           "a run directory")
    if cfg.out:
        if Path(cfg.out).is_dir():
            raise CollideError(f"out={cfg.out} is a directory; out names the JSON summary file, e.g. "
                               f"out={Path(cfg.out) / 'search.json'}")
        if Path(cfg.out).suffix != ".json":
            raise CollideError(f"out={cfg.out} does not end in .json; out names the JSON summary file, e.g. "
                               f"out={Path(cfg.out).with_suffix('.json')}")
    if cfg.max_listed < 0:
        raise CollideError(f"max_listed={cfg.max_listed} must be >= 0 (0 lists none in the JSON; the Parquet files "
                           "hold every collision)")


def run(cfg: SearchCommandConfig, command: str = "") -> dict:
    """Search every selected layer of the store (or of the run's store); write and return the JSON summary."""
    from collide.atomic import os_error_message, write_outputs
    from collide.console import print_table, say
    from collide.layers import select_layers
    from collide.search import search_store
    from collide.store import open_run_store

    check(cfg)
    store = open_run_store(cfg.store)
    layers = select_layers(cfg.layers, store.layers)
    if not store.complete:
        log.warning("store %s is in-progress: searching its %d complete rows", store.path, store.n_rows)
    out, collisions = output_paths(cfg, layers, store.n_rows)
    staging = out.parent / f".{collisions.name}.partial-{os.getpid()}"  # this process's, so never another's
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # folders a failure removes again
    try:
        shutil.rmtree(staging, ignore_errors=True)  # left by a killed search that had this process id
        staging.mkdir(parents=True)
    except OSError as exc:
        raise CollideError(os_error_message(out.parent, exc, "creating", setting="out=<a .json path>",
                                            rerun="")) from None
    done = False
    try:
        summaries, rows = [], []
        for k in layers:
            result = search_store(store, k, cfg.threshold, cfg.search)
            result.write_collisions(staging / f"layer={k}.parquet")
            entry = result.to_dict(cfg.max_listed)
            entry["collisions_file"] = str(collisions / f"layer={k}.parquet")
            summaries.append(entry)
            pair = "-" if entry["closest_pair"] is None else "{} / {}".format(*entry["closest_pair"])
            rows.append([str(k), f"{entry['n_vectors']:,}", f"{result.result.distance:.6g}",
                         "yes" if entry["certified"] else "[red]no[/red]", pair, f"{entry['n_collisions']:,}",
                         f"{entry['seconds']:.2f}"])
        summary = {"store": str(cfg.store), "threshold": cfg.threshold, "search": asdict(cfg.search),
                   "layers": summaries}
        written = publish(staging, collisions, lambda: write_outputs(out.parent, out.stem, summary))
        done = True
    except OSError as exc:
        raise CollideError(os_error_message(out, exc, setting="out=<a .json path>", rerun="")) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in [] if done else made:  # deepest first; each is empty unless another search filled it
            try:
                folder.rmdir()
            except OSError:
                break
    print_table(f"certified search of {store.path}", ["layer", "n", "min distance", "certified", "pair (prompt ids)",
                                                      "collisions", "seconds"], rows)
    say(f"written {written} (collisions: {collisions}/)")
    return summary


def publish(staging: Path, collisions: Path, write_json):
    """Move the collision files of ``staging`` into place as ``collisions`` and call ``write_json()``; if it
    fails, the previous collisions folder comes back, so the files on disk are always those the JSON lists."""
    previous = collisions.with_name(f".{collisions.name}.previous-{os.getpid()}")
    if collisions.exists():
        os.replace(collisions, previous)
    os.replace(staging, collisions)
    try:
        written = write_json()
    except BaseException:
        shutil.rmtree(collisions, ignore_errors=True)
        if previous.exists():
            os.replace(previous, collisions)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    return written
