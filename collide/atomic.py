"""Atomic file writes: every file collide writes appears whole or not at all.

``atomic_write(path, write)`` lets ``write`` fill ``NAME.tmp`` beside ``path``, reads it back for
its sha256 and size, fsyncs it, renames it over ``path`` and fsyncs the directory, so that after a
crash at any instant ``path`` holds either its old content or the new one, never a prefix.
``os_error_message`` turns the OSError of a failed write into one line naming the path and the fix.

Needs only the standard library.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

TMP_SUFFIX = ".tmp"  # the temporary file is NAME.tmp beside NAME
HASH_CHUNK = 1 << 22  # bytes read per step when hashing a file


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of directory ``path`` (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(f) -> tuple[str, int]:
    """(sha256 hex digest, bytes) of what is left to read in the binary file object ``f``."""
    digest, size = hashlib.sha256(), 0
    while chunk := f.read(HASH_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of the file at ``path``."""
    with open(path, "rb") as f:
        return sha256_of(f)[0]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> dict:
    """Create or replace ``path`` atomically; returns {"sha256": hex digest, "bytes": size} of it.

    ``write(tmp)`` must create the file ``tmp`` (``NAME.tmp`` in the same directory). It is then
    read back for its digest (of the bytes on disk), fsynced, renamed over ``path``, and the
    directory is fsynced. On any exception the temporary file is removed and the exception
    propagates (an OSError: see ``os_error_message``); ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            digest, size = sha256_of(f)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return {"sha256": digest, "bytes": size}


def atomic_write_text(path: str | os.PathLike, text: str) -> dict:
    """``atomic_write`` of ``text`` encoded as UTF-8."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> dict:
    """``atomic_write`` of ``obj`` as strict JSON (indent=2, trailing newline; NaN/Inf raise ValueError
    before anything is written)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def os_error_message(path: str | os.PathLike, exc: OSError, what: str = "writing", setting: str = "store.path",
                     rerun: str = ": it resumes after the last complete shard") -> str:
    """One line for an OSError while writing ``path``: what failed, and the fix.

    ``setting`` is the config key that moves the output elsewhere (e.g. "store.path",
    "hydra.run.dir"); ``rerun`` is appended to the advice to rerun after freeing disk space.
    """
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return (f"no space left on the device while {what} {path}; free disk space (or point {setting} at a "
                f"disk with room) and rerun the same command{rerun}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path} ({exc.strerror}); make it writable or set {setting} to a writable directory"
    return f"{what} {path} failed: {exc.strerror or exc}; fix the path or set {setting} to another directory"


def write_outputs(out_dir: str | os.PathLike, stem: str, doc: dict, markdown: str | None = None,
                  figures: dict[str, Callable[[Path], None]] | None = None) -> Path:
    """A command's outputs in ``out_dir``, each file atomic: the figures, then ``<stem>.md``, then ``<stem>.json``.

    ``figures`` maps a path relative to ``out_dir`` (``"figures/x.png"``) to a function that draws
    it there (``collide.report.figures`` write atomically too). The JSON comes last, so that a JSON
    on disk always describes a Markdown and figures that are there. Returns the JSON's path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for rel, draw in (figures or {}).items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        draw(out / rel)
    if markdown is not None:
        atomic_write_text(out / f"{stem}.md", markdown)
    atomic_write_json(out / f"{stem}.json", doc)
    return out / f"{stem}.json"
