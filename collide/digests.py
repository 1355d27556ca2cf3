"""sha256 digests of large files, read once: a memo keyed by each file's size, modification time and inode.

collide checks the large files it reads against recorded digests: the GGUF checkpoint a converted
model is keyed by, the converted model itself, lens bundles. sha256 runs at about 0.4 GB/s on a
2-core machine, 2.3 s for Gemma-3 270M's 1.07 GB of converted weights, so ``sha256(path)`` hashes
a file once and keeps the digest in ``$COLLIDE_CACHE/file-hashes.json`` (``runs/`` by default,
``collide.config.cache_path``) under its absolute path, with its stamp: size in bytes, modification
time in ns and inode. A later call on a file with the same stamp answers from the memo; a file that
was rewritten, truncated or replaced since has another stamp and is hashed again. A change that
keeps size, mtime and inode (a byte flipped in place with the mtime reset) is caught only by
``sha256(path, fresh=True)`` (``collide models verify``).

``check(directory, recorded)`` compares the files of a directory against their recorded
``{"sha256", "bytes"}``. The memo is a cache: a lost or unwritable memo only costs hashing again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from collide.atomic import atomic_write_json, sha256_file
from collide.config import cache_path

log = logging.getLogger(__name__)

MEMO = "file-hashes.json"  # under collide.config.cache_path


def memo_path() -> Path:
    return Path(cache_path(MEMO))


def stamp(path: Path) -> list[int]:
    """[size in bytes, mtime in ns, inode] of ``path``: what a rewrite, a truncation or a replacement changes."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _read_memo() -> dict:
    try:
        memo = json.loads(memo_path().read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def remember(path: str | os.PathLike, digest: str, file_stamp: list[int] | None = None) -> None:
    """Record ``digest`` as the sha256 of ``path`` (hashed by the caller, e.g. as it was written), with its
    current stamp; entries of files that no longer exist are dropped."""
    path = Path(path).resolve()
    memo = {k: v for k, v in _read_memo().items() if Path(k).exists()}
    memo[str(path)] = {"stamp": file_stamp or stamp(path), "sha256": digest}
    try:
        memo_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(memo_path(), memo)
    except OSError as exc:  # a read-only cache folder: the digest is computed again next time
        log.debug("cannot write the digest memo %s: %s", memo_path(), exc)


def sha256(path: str | os.PathLike, fresh: bool = False) -> str:
    """sha256 hex digest of the file at ``path``: from the memo when its stamp is unchanged (unless ``fresh``),
    else read whole and remembered."""
    path = Path(path).resolve()
    before = stamp(path)
    entry = None if fresh else _read_memo().get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == before and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_file(path)
    remember(path, digest, before)  # the stamp from before reading: a write during hashing is seen next time
    return digest


def check(directory: str | os.PathLike, recorded: dict, fresh: bool = False) -> str | None:
    """None when every file ``recorded`` lists ({name: {"sha256", "bytes"}}) is in ``directory`` with its size
    and digest; else a phrase naming the first file that is not."""
    directory = Path(directory)
    for name, want in sorted(recorded.items()):
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want.get("bytes"):
            return f"{name} has {size} bytes where {want.get('bytes')} were written"
        if sha256(path, fresh) != want.get("sha256"):
            return f"{name} does not match its recorded sha256"
    return None
