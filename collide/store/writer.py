"""Store stage: a sharded, checksummed, resumable Parquet store of last-token hidden states.

Layout (the contract, with a pyarrow-only reading recipe, is ``docs/store-format.md``)::

    STORE/manifest.json                what the store holds: identity, model facts, counts, shards
    STORE/prompts/part-NNNNN.parquet   prompt_id int64, token_ids list<int32>, n_tokens int32,
                                       source string[, text string][, extra columns]
    STORE/layer=K/part-NNNNN.parquet   prompt_id int64, state fixed_size_list<float32, d>

Shard i is the file ``part-{i:05d}.parquet`` in ``prompts/`` and in every ``layer=K/``; all of
them hold the same prompt ids, a contiguous range starting where shard i-1 ended. A shard counts
only once ``manifest.json`` lists it with each file's sha256. Files are written under a
temporary name, fsynced and renamed before that, and the manifest itself is replaced atomically,
so a crash at any instant leaves the store as it was after its last complete shard.

This module needs only numpy and pyarrow: stores are read without torch, the model or the corpus.
"""

from __future__ import annotations

import bisect
import copy
import fcntl
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from collide.atomic import TMP_SUFFIX, atomic_write, atomic_write_json, fsync_dir, os_error_message, sha256_file
from collide.errors import CollideError

log = logging.getLogger(__name__)

FORMAT = "collide-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROMPTS_DIR = "prompts"
# Parquet options: states are written plain (no compression, no dictionary) so that reading them
# is a decode of contiguous floats; the prompts table is small and compresses well with zstd.
STATE_OPTIONS = dict(compression="none", use_dictionary=False, write_statistics=["prompt_id"])
PROMPT_OPTIONS = dict(compression="zstd")
WRITE_THREADS = min(8, os.cpu_count() or 1)  # files of one shard written in parallel
# Batching parameters that fix which prompts share a forward batch: a resumed run reuses the
# values stored in the manifest so that its states are bit-identical to an uninterrupted run.
BATCHING_KEYS = ("shard_rows", "batch_tokens", "max_batch_size")


def layer_dir(k: int) -> str:
    """Directory (relative to the store) of layer k's shards."""
    return f"layer={k}"


def part_name(index: int) -> str:
    """File name of shard ``index`` inside ``prompts/`` and every ``layer=K/``."""
    return f"part-{index:05d}.parquet"


def state_array(states: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) float32 matrix -> fixed_size_list<float32, d> array, zero-copy for a C-contiguous input."""
    states = np.ascontiguousarray(states, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(states.reshape(-1)), states.shape[1])


def prompt_table(first_id: int, token_ids: Sequence[Sequence[int]], sources: Sequence[str],
                 texts: Sequence[str] | None = None, **extra) -> pa.Table:
    """The prompts table of one shard: ids ``first_id, first_id + 1, ...`` in row order.

    ``token_ids`` are exactly the ids fed to the model (BOS included); ``texts=None`` leaves the
    text column out (``store.keep_text=false``); ``extra`` columns (equal-length sequences or
    arrays) are appended as they are, e.g. the exhaustive test's base prompt and appended token.
    """
    n = len(token_ids)
    lengths = np.fromiter((len(t) for t in token_ids), np.int32, count=n)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(t, np.int32) for t in token_ids]) if n else np.empty(0, np.int32)
    columns = {
        "prompt_id": pa.array(np.arange(first_id, first_id + n, dtype=np.int64)),
        "token_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
        "n_tokens": pa.array(lengths),
        "source": pa.array(list(sources), type=pa.string()),
    }
    if texts is not None:
        columns["text"] = pa.array(list(texts), type=pa.string())
    columns.update({name: pa.array(values) for name, values in extra.items()})
    return pa.table(columns)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest(path: str | os.PathLike) -> dict:
    """The parsed ``manifest.json`` of the store at ``path``; CollideError if it is not a store."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        hint = f" (a run directory keeps its store in {path / 'store'})" if (path / "store" / MANIFEST).is_file() else ""
        raise CollideError(f"{path} is not a collide store: {file} does not exist{hint}; "
                           "pass the directory that holds manifest.json")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CollideError(f"cannot read {file}: {exc}; the store is damaged, re-extract it") from exc
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("format_version"), int):
        raise CollideError(f"{file} is not a collide store manifest (format={manifest.get('format')!r})")
    if manifest["format_version"] > FORMAT_VERSION:
        raise CollideError(f"{path} has store format version {manifest['format_version']}, newer than this "
                           f"collide reads ({FORMAT_VERSION}); upgrade collide")
    return manifest


# --------------------------------------------------------------------------- reading


def file_problem(path: Path, entry: dict) -> str | None:
    """What is wrong with one file the manifest lists (missing, size, sha256), or None."""
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or rewritten)"
    if sha256_file(path) != entry["sha256"]:
        return f"{path}: sha256 mismatch (the file is corrupted or was modified)"
    return None



class Store:
    """Read access to a store: ids, (n, d) float32 state matrices per layer, and the prompts.

    Only the shards listed in the manifest are read, so an ``in-progress`` store reads as the
    prompts of its complete shards. Rows are in prompt_id order (0, 1, 2, ...).
    """

    def __init__(self, path: str | os.PathLike, verified: Iterable[Path] = ()):
        self.path = Path(path)  # store directory
        self.manifest: dict = read_manifest(self.path)  # the parsed manifest.json
        self.layers: list[int] = [int(k) for k in self.manifest["layers"]]  # stored layers, ascending
        self.d: int = int(self.manifest["d"])  # width of each state vector
        self.shards: list[dict] = self.manifest["shards"]  # complete shards, in prompt_id order
        self.n_rows: int = sum(int(s["rows"]) for s in self.shards)  # prompts in the complete shards
        self.complete: bool = self.manifest["status"] == "complete"  # False while extraction is unfinished
        self.keep_text: bool = bool(self.manifest.get("keep_text", True))  # prompts carry a text column
        # files whose sha256 matched the manifest in this session: ``verified`` are files the caller
        # hashed itself (a StoreWriter, from the bytes on disk, as it listed them)
        self._verified: set[Path] = set(verified)

    def __repr__(self) -> str:
        status = "complete" if self.complete else "in-progress"
        return f"Store({str(self.path)!r}, {status}, n_rows={self.n_rows}, d={self.d}, layers={self.layers})"

    def _layer_files(self, k: int) -> list[Path]:
        if k not in self.layers:
            raise CollideError(f"layer {k} is not in the store {self.path} (it holds layers {self.layers}); "
                               "pick one of those or extract again with that layer selected")
        return [self._checked(s, f"{layer_dir(k)}/{part_name(s['index'])}") for s in self.shards]

    def _checked(self, shard: dict, rel: str) -> Path:
        """The path of a listed file, after checking its size and sha256 (once per Store).

        Hashing runs at several hundred MB/s, far faster than the search that reads the states,
        and it is what keeps a damaged file from being compared as numbers.
        """
        path = self.path / rel
        if path not in self._verified:
            problem = file_problem(path, shard["files"][rel])
            if problem:
                raise CollideError(f"{problem}. Run `python -m collide.verify {self.path}` to list every bad "
                                   "file, then restore them from a copy or extract again into a new store.path")
            self._verified.add(path)
        return path

    def layer(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 (n,), states float32 (n, d)) of layer k, rows in prompt_id order.

        A one-shard store is returned zero-copy from the Arrow buffers (read-only arrays: copy
        before writing into them); more shards are decoded one by one into one preallocated
        matrix (one copy, no concatenation of tables).
        """
        files = self._layer_files(k)
        if len(files) == 1:
            table = pq.read_table(files[0], columns=["prompt_id", "state"])
            state = table.column("state")
            if state.num_chunks == 1:
                return (table.column("prompt_id").chunk(0).to_numpy(),
                        state.chunk(0).flatten().to_numpy().reshape(-1, self.d))
        ids = np.empty(self.n_rows, np.int64)
        states = np.empty((self.n_rows, self.d), np.float32)
        row = 0
        for file in files:
            table = pq.read_table(file, columns=["prompt_id", "state"])
            for id_chunk, state_chunk in zip(table.column("prompt_id").chunks, table.column("state").chunks):
                n = len(id_chunk)
                ids[row:row + n] = id_chunk.to_numpy()
                states[row:row + n] = state_chunk.flatten().to_numpy().reshape(n, self.d)
                row += n
        if row != self.n_rows:
            raise CollideError(f"layer {k} of {self.path} has {row} rows, the manifest says {self.n_rows}; "
                               f"run `python -m collide.verify {self.path}`")
        return ids, states

    def iter_blocks(self, k: int, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Blocks (ids int64 (m,), states float32 (m, d)) of layer k in prompt_id order.

        Every block has exactly ``rows`` rows except the last (m <= rows); together they cover all
        n_rows rows once. Memory is bounded by about two blocks plus one Parquet batch, whatever
        the size of the layer. Each block is a fresh array the caller may keep.
        """
        if rows < 1:
            raise CollideError(f"iter_blocks rows={rows} must be >= 1")
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        n_pending = 0
        for file in self._layer_files(k):
            for batch in pq.ParquetFile(file).iter_batches(batch_size=rows, columns=["prompt_id", "state"]):
                pending.append((batch.column(0).to_numpy(),
                                batch.column(1).flatten().to_numpy().reshape(-1, self.d)))
                n_pending += batch.num_rows
                while n_pending >= rows:
                    block, pending, n_pending = _take(pending, rows), _drop(pending, rows), n_pending - rows
                    yield block
        if n_pending:
            yield _take(pending, n_pending)

    def prompts(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The prompts table (prompt_id, token_ids, n_tokens, source[, text][, extra]) in prompt_id order."""
        files = [self._checked(s, f"{PROMPTS_DIR}/{part_name(s['index'])}") for s in self.shards]
        if columns is not None and files:
            available = pq.read_schema(files[0]).names
            missing = [c for c in columns if c not in available]
            if missing:
                hint = " (the store was written with store.keep_text=false)" if "text" in missing else ""
                raise CollideError(f"the prompts of {self.path} have no column {missing}{hint}; "
                                   f"available columns: {available}")
        tables = [pq.read_table(f, columns=None if columns is None else list(columns)) for f in files]
        if not tables:
            empty = prompt_table(0, [], [], [] if self.keep_text else None)
            return empty if columns is None else empty.select(list(columns))
        return pa.concat_tables(tables)

    def texts(self, prompt_ids: Sequence[int]) -> dict[int, str]:
        """{prompt_id: text} for the given ids; empty when the store keeps no text."""
        if not self.keep_text:
            return {}
        wanted = {int(i) for i in prompt_ids}
        starts = [int(s["first_prompt_id"]) for s in self.shards]
        by_shard: dict[int, set[int]] = {}
        for pid in wanted:
            index = bisect.bisect_right(starts, pid) - 1
            if index < 0 or pid >= starts[index] + int(self.shards[index]["rows"]):
                raise CollideError(f"prompt_id {pid} is not in the store {self.path} (ids 0..{self.n_rows - 1})")
            by_shard.setdefault(index, set()).add(pid)
        out: dict[int, str] = {}
        for index, ids in by_shard.items():
            shard = self.shards[index]
            table = pq.read_table(self._checked(shard, f"{PROMPTS_DIR}/{part_name(shard['index'])}"),
                                  columns=["prompt_id", "text"])
            for pid, text in zip(table.column("prompt_id").to_pylist(), table.column("text").to_pylist()):
                if pid in ids:
                    out[pid] = text
        return out


def _take(pieces: list[tuple[np.ndarray, np.ndarray]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n rows of a list of (ids, states) pieces, as one new pair of arrays."""
    ids, states, got = [], [], 0
    for piece_ids, piece_states in pieces:
        m = min(n - got, len(piece_ids))
        ids.append(piece_ids[:m])
        states.append(piece_states[:m])
        got += m
        if got == n:
            break
    return np.concatenate(ids), np.concatenate(states)


def _drop(pieces: list[tuple[np.ndarray, np.ndarray]], n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The pieces left after removing their first n rows (views, no copy)."""
    out = []
    for piece_ids, piece_states in pieces:
        if n >= len(piece_ids):
            n -= len(piece_ids)
            continue
        out.append((piece_ids[n:], piece_states[n:]))
        n = 0
    return out


def open_store(path: str | os.PathLike) -> Store:
    """Open the store at ``path`` for reading (needs only pyarrow and numpy)."""
    return Store(path)


# --------------------------------------------------------------------------- writing


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def identity_diff(stored: dict, wanted: dict) -> list[tuple[str, object, object]]:
    """(dotted key, stored value, wanted value) for every key whose value differs (JSON-normalised)."""
    a, b = _flatten(json.loads(json.dumps(stored))), _flatten(json.loads(json.dumps(wanted)))
    missing = object()
    return [(key, a.get(key, "<absent>"), b.get(key, "<absent>")) for key in sorted(a.keys() | b.keys())
            if a.get(key, missing) != b.get(key, missing)]


def lock_store(path: Path) -> int:
    """Take the writer's exclusive lock on the store directory; returns the descriptor holding it.

    An advisory ``flock`` on the directory itself (no lock file): the kernel releases it when the
    process ends, even by SIGKILL, so a killed run never leaves a stale lock behind.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CollideError(f"the store {path} is being written by another writer (another run, or an unclosed "
                           "StoreWriter); wait for it to end, or give this run its own hydra.run.dir (or "
                           "store.path)") from None
    return fd


class StoreWriter:
    """Creates a store, or resumes an ``in-progress`` one, and commits shards atomically.

    ``open`` checks a resumed store's identity; ``commit_shard`` writes one shard (to temporary
    names, fsynced, renamed) and only then lists it in the manifest; ``finish`` marks the store
    complete. One thread at a time may call ``commit_shard`` (the extractor uses one writer
    thread); the manifest is only touched by these methods.
    """

    def __init__(self, path: Path, manifest: dict, lock_fd: int | None = None):
        self.path = path  # store directory
        self.manifest = manifest  # the manifest as last written to disk
        self._lock_fd = lock_fd  # open descriptor of the store directory holding the writer's lock
        self.written: set[Path] = set()  # files this writer committed (hashed from disk as it listed them)

    def close(self) -> None:
        """Release the writer's lock on the store directory (also done by ``finish`` and at exit)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __del__(self):
        self.close()

    # ----------------------------------------------------------------- create or resume

    @classmethod
    def open(cls, path: str | os.PathLike, identity: dict, header: dict) -> "StoreWriter":
        """Create the store at ``path`` or reopen it for resuming.

        ``identity``: JSON-able dict (model config, corpus config, seed, layers, dtype, n_prompts,
        ...) that must equal the stored one key by key; a difference raises CollideError naming
        the key. One exception: a store whose prompt stream ran out at M distinct prompts
        (``stream_end``) may be finished with identity n_prompts=M.
        ``header``: the facts recorded at the top of the manifest: ``layers``, ``d``, ``keep_text``,
        ``n_prompts`` (the target), ``model``, ``layer_convention``, ``final_norm``, ``n_layers``,
        and the batching keys (``shard_rows``, ``batch_tokens``, ``max_batch_size``). On resume
        the stored batching keys win, so that batches are composed exactly as before.
        """
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CollideError(os_error_message(path, exc, "creating the store directory")) from exc
        lock_fd = lock_store(path)
        try:
            return cls._open_locked(path, identity, header, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _open_locked(cls, path: Path, identity: dict, header: dict, lock_fd: int) -> "StoreWriter":
        if not (path / MANIFEST).exists():
            if any(path.iterdir()):
                raise CollideError(f"store.path {path} exists, is not empty and holds no {MANIFEST}; "
                                   "set store.path to a new or empty directory")
            manifest = dict(format=FORMAT, format_version=FORMAT_VERSION, status="in-progress",
                            created_at=now_iso(), updated_at=now_iso(), identity=identity, **header,
                            counts=dict(n_prompts=0, n_duplicates=0, n_tokens=0),
                            nonfinite_rows={str(k): 0 for k in header["layers"]}, stream_end=None,
                            timings=dict(forward_s=0.0, write_s=0.0, wall_s=0.0), shards=[])
            writer = cls(path, json.loads(json.dumps(manifest)), lock_fd)
            writer._write_manifest()  # first, so that a killed run leaves a store that resumes
            writer._make_dirs()
            log.info("created store %s", path)
            return writer
        manifest = read_manifest(path)
        cls._check_resumable(path, manifest, identity, header)
        writer = cls(path, manifest, lock_fd)
        writer._make_dirs()
        for key in BATCHING_KEYS:
            if header.get(key) and manifest.get(key) and header[key] != manifest[key]:
                log.warning("store %s was started with %s=%s; using it instead of %s so that the batches and "
                            "the states are bit-identical to an uninterrupted run", path, key, manifest[key],
                            header[key])
        if manifest["n_prompts"] != header["n_prompts"]:  # finishing a store whose stream ran out
            manifest["identity"], manifest["n_prompts"] = json.loads(json.dumps(identity)), header["n_prompts"]
            writer._write_manifest()
        writer._remove_strays()
        log.info("resuming store %s: %d complete shards, %d prompts", path, len(manifest["shards"]),
                 manifest["counts"]["n_prompts"])
        return writer

    @staticmethod
    def _check_resumable(path: Path, manifest: dict, identity: dict, header: dict) -> None:
        fix = "use a new store.path or delete the store to start over"
        diff = identity_diff(manifest["identity"], identity)
        stream_end = manifest.get("stream_end")
        if stream_end is not None and header["n_prompts"] == stream_end:
            diff = [entry for entry in diff if entry[0] != "n_prompts"]
        if diff:
            key, stored, wanted = diff[0]
            more = f" (and {len(diff) - 1} more keys)" if len(diff) > 1 else ""
            raise CollideError(f"the store {path} was made with a different {key}: stored {stored!r}, this run "
                               f"{wanted!r}{more}; never mixing two runs in one store: {fix}")
        for key in ("layers", "d", "keep_text"):
            if manifest.get(key) != header.get(key):
                raise CollideError(f"the store {path} was made with {key}={manifest.get(key)!r}, this run has "
                                   f"{header.get(key)!r}; {fix}")
        if manifest["n_prompts"] != header["n_prompts"] and stream_end != header["n_prompts"]:
            raise CollideError(f"the store {path} was made with n_prompts={manifest['n_prompts']}, this run has "
                               f"{header['n_prompts']}; {fix}")

    def _make_dirs(self) -> None:
        for directory in [PROMPTS_DIR] + [layer_dir(k) for k in self.manifest["layers"]]:
            try:
                (self.path / directory).mkdir(exist_ok=True)
            except OSError as exc:
                raise CollideError(os_error_message(self.path / directory, exc, "creating")) from exc

    def _remove_strays(self) -> None:
        """Delete temporary files and shards not listed in the manifest (left by a killed run)."""
        listed = {f for shard in self.manifest["shards"] for f in shard["files"]}
        for directory in [PROMPTS_DIR] + [layer_dir(k) for k in self.manifest["layers"]]:
            for file in (self.path / directory).iterdir():
                if f"{directory}/{file.name}" not in listed:
                    log.info("removing %s, left by an interrupted run", file)
                    file.unlink()
        (self.path / (MANIFEST + TMP_SUFFIX)).unlink(missing_ok=True)

    # ----------------------------------------------------------------- state

    @property
    def shards(self) -> list[dict]:
        """The complete shards, in prompt_id order."""
        return self.manifest["shards"]

    @property
    def n_rows(self) -> int:
        """Prompts in the complete shards (= the next prompt_id)."""
        return int(self.manifest["counts"]["n_prompts"])

    @property
    def complete(self) -> bool:
        return self.manifest["status"] == "complete"

    def batching(self, key: str):
        """A batching parameter as stored in the manifest (None if not chosen yet)."""
        return self.manifest.get(key)

    # ----------------------------------------------------------------- commits

    def _write_manifest(self, manifest: dict | None = None) -> None:
        """Atomically replace manifest.json by ``manifest`` (default: the current one) and adopt it."""
        manifest = self.manifest if manifest is None else manifest
        manifest["updated_at"] = now_iso()
        file = self.path / MANIFEST
        try:
            atomic_write_json(file, manifest)
        except OSError as exc:
            raise CollideError(os_error_message(file, exc)) from exc
        self.manifest = manifest

    def _write_parquet(self, table: pa.Table, rel: str, options: dict) -> dict:
        return atomic_write(self.path / rel, lambda tmp: pq.write_table(
            table, tmp, row_group_size=max(table.num_rows, 1), **options))

    def commit_shard(self, prompts: pa.Table, states: dict[int, np.ndarray], info: dict | None = None) -> dict:
        """Write one shard and list it in the manifest; returns its manifest entry.

        ``prompts``: the shard's prompts table (see ``prompt_table``), ids continuing the store's.
        ``states``: {layer: (rows, d) float32} for every stored layer, row r = prompts row r.
        ``info``: JSON-able facts kept in the shard's entry. Keys the manifest also aggregates:
        ``n_duplicates`` (cumulative, copied to counts), ``batch_tokens`` (the budget used, becomes
        the store's), ``forward_s`` (summed into timings).
        Rows with NaN or Inf are stored as they are and counted per layer (``nonfinite_rows``).
        On OSError (full disk, unwritable path) the shard's files are removed, the manifest keeps
        the previous shards, and CollideError names the path and the fix.
        """
        t0 = time.perf_counter()
        info = dict(info or {})
        index, first, rows = len(self.shards), self.n_rows, prompts.num_rows
        ids = prompts.column("prompt_id").to_numpy()
        if rows == 0 or ids[0] != first or not np.array_equal(ids, np.arange(first, first + rows)):
            raise ValueError(f"shard {index} must hold prompt ids {first}..{first + rows - 1} in order")
        if sorted(states) != self.manifest["layers"]:
            raise ValueError(f"states for layers {sorted(states)}, the store holds {self.manifest['layers']}")
        d, layers = self.manifest["d"], self.manifest["layers"]
        for k in layers:
            if np.shape(states[k]) != (rows, d):
                raise ValueError(f"layer {k} states have shape {np.shape(states[k])}, want {(rows, d)}")

        def write(rel: str, table: pa.Table, options: dict) -> tuple[str, dict | None, OSError | None]:
            try:
                return rel, self._write_parquet(table, rel, options), None
            except OSError as exc:
                return rel, None, exc

        def write_layer(k: int) -> tuple[str, dict | None, OSError | None, int]:
            matrix = np.asarray(states[k], dtype=np.float32)
            bad_rows = int(rows - np.count_nonzero(np.isfinite(matrix).all(axis=1)))
            table = pa.table({"prompt_id": prompts.column("prompt_id"), "state": state_array(matrix)})
            return (*write(f"{layer_dir(k)}/{part_name(index)}", table, STATE_OPTIONS), bad_rows)

        # Files are independent: encode, hash and fsync them in parallel (pyarrow, hashlib and
        # file I/O release the GIL), so that writing keeps up with a GPU.
        with ThreadPoolExecutor(max_workers=min(WRITE_THREADS, len(layers) + 1)) as pool:
            prompt_job = pool.submit(write, f"{PROMPTS_DIR}/{part_name(index)}", prompts, PROMPT_OPTIONS)
            results = [prompt_job.result() + (0,)] + list(pool.map(write_layer, layers))
        failed = [(rel, exc) for rel, _, exc, _ in results if exc is not None]
        if failed:
            for rel, *_ in results:
                (self.path / rel).unlink(missing_ok=True)
            rel, exc = failed[0]
            raise CollideError(os_error_message(self.path / rel, exc)) from exc
        files = {rel: entry for rel, entry, _, _ in results}
        nonfinite = {str(k): bad for k, (_, _, _, bad) in zip(layers, results[1:])}
        n_tokens = int(prompts.column("n_tokens").to_numpy().sum())
        shard = dict(index=index, first_prompt_id=int(first), rows=int(rows), n_tokens=n_tokens,
                     nonfinite_rows=nonfinite, files=files, **info)
        m = copy.deepcopy(self.manifest)
        m["shards"].append(shard)
        m["counts"]["n_prompts"] += rows
        m["counts"]["n_tokens"] += n_tokens
        if "n_duplicates" in info:
            m["counts"]["n_duplicates"] = int(info["n_duplicates"])
        if "batch_tokens" in info:
            m["batch_tokens"] = int(info["batch_tokens"])
        for k, count in nonfinite.items():
            m["nonfinite_rows"][k] += count
            if count:
                log.warning("layer %s: %d rows of shard %d hold NaN or Inf; stored as they are and flagged in "
                            "the manifest (the search excludes them)", k, count, index)
        m["timings"]["forward_s"] += float(info.get("forward_s", 0.0))
        m["timings"]["write_s"] += time.perf_counter() - t0
        self._write_manifest(m)
        self.written.update(self.path / rel for rel in files)
        log.debug("committed shard %d (%d rows) in %.2f s", index, rows, time.perf_counter() - t0)
        return shard

    def mark_stream_end(self, n_distinct: int) -> None:
        """Record that the prompt stream ended after ``n_distinct`` distinct prompts."""
        m = copy.deepcopy(self.manifest)
        m["stream_end"] = int(n_distinct)
        self._write_manifest(m)

    def finish(self, wall_s: float = 0.0) -> Store:
        """Mark the store complete, record ``wall_s`` (the finishing run's seconds) and open it for reading."""
        m = copy.deepcopy(self.manifest)
        m["status"] = "complete"
        m["timings"]["wall_s"] = float(wall_s)
        self._write_manifest(m)
        self.close()
        return Store(self.path, verified=self.written)
