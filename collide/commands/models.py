"""``collide models list|verify|clear``: the converted-model cache of GGUF checkpoints (``collide.model_cache``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING


@dataclass
class ModelsConfig:
    """``collide models list|verify|clear [name=NAME]``: the GGUF checkpoints converted once and cached in
    $COLLIDE_CACHE/models (runs/models without the variable); a removed model is converted again on its next load."""

    # list (path, size, state) | verify (hash every file again, against its recorded sha256) | clear
    # (remove them) (positional)
    action: str = MISSING
    name: Optional[str] = None  # only the cached models of this model config name (e.g. smollm2); None = every one


SCHEMA = ModelsConfig
POSITIONAL = "action"
SUMMARY = "list, verify or clear the converted-model cache (collide models list|verify|clear [name=NAME])"
ACTIONS = ("list", "verify", "clear")


def run(cfg: ModelsConfig, command: str = "") -> int:
    """One table row per cached model (list, verify) or one line of what was removed (clear); returns the exit
    status, 1 when verify finds a damaged entry."""
    from collide import model_cache
    from collide.console import print_table, say
    from collide.errors import CollideError

    if cfg.action not in ACTIONS:
        raise CollideError(f"collide models {cfg.action!r} is not an action; use one of {', '.join(ACTIONS)}")
    entries = model_cache.entries(cfg.name)
    which = f" of model {cfg.name!r}" if cfg.name else ""
    if cfg.action == "clear":
        gone = [e for e in entries if not e["writing"]]
        for entry in gone:
            model_cache.remove(entry["path"])
        busy = len(entries) - len(gone)
        say(f"removed {len(gone)} cached model director{'y' if len(gone) == 1 else 'ies'}{which} "
            f"({model_cache.human(sum(e['bytes'] for e in gone))}) from {model_cache.root()}"
            + (f"; {busy} still being written, left alone" if busy else ""))
        return 0
    if cfg.action == "verify":
        for entry in entries:
            if entry["state"] == "ok":
                wrong = model_cache.problem(entry["path"], fresh=True)
                entry["state"] = "ok (verified)" if wrong is None else f"damaged: {wrong}"
    rows = [[e["name"], e["key"].get("dtype", "-"), e["key"].get("gguf_file", "-"), model_cache.human(e["bytes"]),
             e["state"] + (" (being written)" if e["writing"] else ""), str(e["path"])] for e in entries]
    print_table(f"converted models in {model_cache.root()}", ["model", "dtype", "GGUF file", "size", "state", "path"],
                rows, left=["model", "GGUF file", "state", "path"])
    for entry in entries:
        if entry["state"].startswith("damaged"):
            say(f"DAMAGED {entry['path']}: {entry['state'].removeprefix('damaged: ')}; it is converted again on its "
                "next load (or run collide models clear)")
    say(f"{len(entries)} cached model director{'y' if len(entries) == 1 else 'ies'}{which}, "
        f"{model_cache.human(sum(e['bytes'] for e in entries))}")
    return 1 if any(e["state"].startswith("damaged") for e in entries) else 0
