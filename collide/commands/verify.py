"""``collide verify STORE [STORE ...]``: re-check every shard's sha256, size, rows and prompt ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from omegaconf import MISSING


@dataclass
class VerifyConfig:
    """``collide verify STORE [STORE ...]``: re-check every shard's sha256, size, rows and prompt ids."""

    stores: List[str] = MISSING  # store directories (positional)


SCHEMA = VerifyConfig
POSITIONAL = "stores"
SUMMARY = "re-check every shard's sha256, size, rows and prompt ids"


def run(cfg: VerifyConfig, command: str = "") -> int:
    """Print ``OK ...`` or the problems of each store (one line each, naming the file); returns the exit
    status, 1 if any store has a problem."""
    from collide.store import read_manifest
    from collide.store.verify import verify_store

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
