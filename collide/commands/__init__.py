"""The subcommands of ``collide``: one module each, holding its schema (or naming the stage's) and its
one ``run(cfg, command)``.

``collide.cli`` registers these functions; each composes nothing itself and prints its own results
through ``collide.console``. The stages they call (``collide.pipeline``, ``collide.search``,
``collide.exhaustive``, ``collide.invert``, ``collide.experiments``, ``collide.report``) never
import a command or the CLI.
"""

from __future__ import annotations

import os
from pathlib import Path

from collide.errors import CollideError


def check_out_dir(out: str | os.PathLike, key: str = "out") -> None:
    """One line before any work if the output directory ``out`` (the value of ``key``) cannot be one: an existing
    file, a path through a file, or a directory (or nearest existing parent) that is not writable."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise CollideError(f"{key}={out} is an existing file; {key} names an output directory: pass a new or "
                           "existing directory")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CollideError(f"{key}={out} goes through the file {parent}; pass a directory path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CollideError(f"cannot write into {parent} (permission denied); set {key} to a writable directory")
