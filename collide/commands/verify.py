"""``collide verify STORE [STORE ...]``: re-check every shard's sha256, size, rows and prompt ids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List

from omegaconf import MISSING

from collide.errors import CollideError


@dataclass
class VerifyConfig:
    """``collide verify STORE [STORE ...]``: re-check every shard's sha256, size, rows and prompt ids."""

    stores: List[str] = MISSING  # store directories (positional)


SCHEMA = VerifyConfig
POSITIONAL = "stores"
SUMMARY = "re-check every shard's sha256, size, rows and prompt ids"
RERUN = "nothing was written: run the same `collide verify` command again to check from the start"


def check(cfg: VerifyConfig) -> None:
    """One line for an argument that is no store at all (bad input, exit 2), before any store is checked."""
    from collide.store.layout import MANIFEST
    from collide.store.reader import RUN_RECORD

    for store in cfg.stores:
        path = Path(store)
        if not path.exists():
            raise CollideError(f"{store} does not exist; pass store directories (e.g. under runs/stores/)")
        if not (path / MANIFEST).is_file():
            named = f"; its store is the path in {path / RUN_RECORD}" if (path / RUN_RECORD).is_file() else ""
            raise CollideError(f"{store} is not a collide store (it holds no {MANIFEST}){named}; pass store "
                               "directories (e.g. under runs/stores/)")


def run(cfg: VerifyConfig, command: str = "") -> int:
    """Print ``OK ...`` or the problems of each store (one line each, naming the file); returns the exit
    status, 1 if any store has a problem. An argument that is no store is a one-line error (status 2)."""
    from collide.store import read_manifest
    from collide.store.verify import verify_store

    check(cfg)
    status = 0
    for store in cfg.stores:
        problems = verify_store(store)
        if problems:
            status = 1
            for problem in problems:
                print(problem)
            print(f"FAILED {store}: {len(problems)} problem(s)")
        else:
            manifest = read_manifest(store)
            print(f"OK {store}: {len(manifest['shards'])} shards, {manifest['counts']['n_prompts']} prompts, "
                  f"layers {manifest['layers']}, d={manifest['d']}, dtype {manifest['dtype']}, positions "
                  f"{manifest['positions']}, {manifest['status']}")
    return status
