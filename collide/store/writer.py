"""Writing a store: ``StoreWriter`` creates or resumes one and commits shards atomically.

Each shard's files are written under temporary names, fsynced and renamed
(``collide.atomic.atomic_write``); only then does the manifest, replaced the same way, list them
with their sha256. A crash at any instant leaves the store as it was after its last complete
shard; reopening it removes what a killed writer left (``layout.stray_files``).

Needs only numpy and pyarrow.
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from collide.atomic import atomic_write, atomic_write_json, os_error_message
from collide.errors import CollideError
from collide.store.layout import (BATCHING_KEYS, FORMAT, MANIFEST, POSITIONS, PROMPT_OPTIONS, PROMPTS_DIR, STORAGE,
                                  decode_states, encode_states, format_version, identity_diff, layer_dir, now_iso,
                                  part_name, positions_dir, read_manifest, state_field, state_options, store_dirs,
                                  stray_files, value_width)
from collide.store.quantized import BITS as QUANTIZED, GRANULARITIES
from collide.store.reader import Store

log = logging.getLogger(__name__)

WRITE_THREADS = min(8, os.cpu_count() or 1)  # files of one shard written in parallel


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
        ``dtype`` (storage dtype: fp32 | bf16 | fp16 | int8 | int4), ``quant_granularity`` (int8 / int4
        only: row | tensor, default row), ``positions`` (last | all; default last),
        ``n_prompts`` (the target), ``model``, ``layer_convention``, ``final_norm``, ``n_layers``,
        and the batching keys (``shard_rows``, ``batch_tokens``, ``max_batch_size``). On resume
        the stored batching keys win, so that batches are composed exactly as before.
        """
        path = Path(path)
        header = dict(header, positions=str(header.get("positions", "last")), dtype=str(header["dtype"]))
        if header["dtype"] not in STORAGE or header["positions"] not in POSITIONS:
            raise CollideError(f"store dtype={header['dtype']!r} / positions={header['positions']!r}: use a dtype "
                               f"of {sorted(STORAGE)} and positions of {list(POSITIONS)}")
        if header["dtype"] in QUANTIZED:
            header["quant_granularity"] = str(header.get("quant_granularity") or "row")
            if header["quant_granularity"] not in GRANULARITIES:
                raise CollideError(f"store quant_granularity={header['quant_granularity']!r}: use one of "
                                   f"{list(GRANULARITIES)}")
        else:
            header.pop("quant_granularity", None)
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
            manifest = dict(format=FORMAT, format_version=format_version(header["dtype"]), status="in-progress",
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
        for key in ("layers", "d", "keep_text", "dtype", "quant_granularity", "positions"):
            if manifest.get(key) != header.get(key):
                raise CollideError(f"the store {path} was made with {key}={manifest.get(key)!r}, this run has "
                                   f"{header.get(key)!r}; {fix}")
        if manifest["n_prompts"] != header["n_prompts"] and stream_end != header["n_prompts"]:
            raise CollideError(f"the store {path} was made with n_prompts={manifest['n_prompts']}, this run has "
                               f"{header['n_prompts']}; {fix}")

    def _make_dirs(self) -> None:
        for directory in store_dirs(self.manifest["layers"], self.manifest["positions"]):
            try:
                (self.path / directory).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CollideError(os_error_message(self.path / directory, exc, "creating")) from exc

    def _remove_strays(self) -> None:
        """Delete temporary files and shards not listed in the manifest (left by a killed run).

        A file may vanish while this runs: on a cluster, a worker of the killed run can still be
        finishing its shard (it renames its temporary file) until Ray reaps it.
        """
        for file in stray_files(self.path, self.manifest):
            log.info("removing %s, left by an interrupted run", file)
            file.unlink(missing_ok=True)

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

    def commit_shard(self, prompts: pa.Table, states: dict[int, np.ndarray], info: dict | None = None,
                     positions: dict[int, np.ndarray] | None = None) -> dict:
        """Write one shard and list it in the manifest; returns its manifest entry.

        ``prompts``: the shard's prompts table (see ``prompt_table``), ids continuing the store's.
        ``states``: {layer: (rows, d)} last-token states for every stored layer, row r = prompts
        row r. ``positions`` (a positions=all store only): {layer: (sum of n_tokens, d)} the state
        at every position, prompt by prompt in row order, positions 0..n_tokens-1 within each.
        States are float32 (converted to the storage dtype, rounding to nearest even; int8 / int4:
        quantized as ``collide.store.quantized`` defines, one scale per row or per file) or already of
        the storage numpy dtype (float16 for fp16; uint16 bfloat16 bit patterns for bf16; uint8 rows for
        int8 / int4).
        ``info``: JSON-able facts kept in the shard's entry. Keys the manifest also aggregates:
        ``n_duplicates`` (cumulative, copied to counts), ``batch_tokens`` (the budget used, becomes
        the store's), ``forward_s`` (summed into timings).
        Last-token rows with NaN or Inf are stored as they are and counted per layer
        (``nonfinite_rows``). On OSError (full disk, unwritable path) the shard's files are removed,
        the manifest keeps the previous shards, and CollideError names the path and the fix.
        """
        t0 = time.perf_counter()
        info = dict(info or {})
        index, first, rows = len(self.shards), self.n_rows, prompts.num_rows
        ids = prompts.column("prompt_id").to_numpy()
        if rows == 0 or ids[0] != first or not np.array_equal(ids, np.arange(first, first + rows)):
            raise ValueError(f"shard {index} must hold prompt ids {first}..{first + rows - 1} in order")
        d, layers, dtype = self.manifest["d"], self.manifest["layers"], self.manifest["dtype"]
        granularity = self.manifest.get("quant_granularity")
        if sorted(states) != layers:
            raise ValueError(f"states for layers {sorted(states)}, the store holds {layers}")
        for k in layers:  # rows already encoded (of the storage numpy dtype) are value_width wide
            want = (rows, value_width(dtype, d) if np.asarray(states[k]).dtype == STORAGE[dtype][0] else d)
            if np.shape(states[k]) != want:
                raise ValueError(f"layer {k} states have shape {np.shape(states[k])}, want {want}")
        lengths = prompts.column("n_tokens").to_numpy()
        n_tokens = int(lengths.sum())
        if (positions is not None) != (self.manifest["positions"] == "all"):
            raise ValueError(f"a positions={self.manifest['positions']} store takes "
                             f"{'every position' if positions is None else 'no positions'} with each shard")
        if positions is not None:
            if sorted(positions) != layers or any(np.shape(positions[k]) != (n_tokens, d) for k in layers):
                raise ValueError(f"positions must be {{layer: ({n_tokens}, {d})}} for layers {layers}")
            position_ids = pa.array(np.repeat(ids, lengths))
            position_index = pa.array(np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]))
        options = state_options(dtype)

        def write(rel: str, table: pa.Table, options: dict) -> tuple[str, dict | None, OSError | None]:
            try:
                return rel, self._write_parquet(table, rel, options), None
            except OSError as exc:
                return rel, None, exc

        def state_table(columns: dict, values: np.ndarray) -> pa.Table:
            field = state_field(dtype, d, granularity)
            schema = pa.schema([pa.field(name, column.type) for name, column in columns.items()] + [field])
            flat = pa.array(values.reshape(-1))
            return pa.table([*columns.values(), pa.FixedSizeListArray.from_arrays(flat, field.type.list_size)],
                            schema=schema)

        def write_layer(k: int) -> tuple[str, dict | None, OSError | None, int]:
            values = encode_states(states[k], dtype, granularity)
            bad_rows = int(rows - np.count_nonzero(np.isfinite(decode_states(values, dtype, d=d)).all(axis=1)))
            table = state_table({"prompt_id": prompts.column("prompt_id").combine_chunks()}, values)
            return (*write(f"{layer_dir(k)}/{part_name(index)}", table, options), bad_rows)

        def write_positions(k: int) -> tuple[str, dict | None, OSError | None, int]:
            table = state_table({"prompt_id": position_ids, "position": position_index},
                                encode_states(positions[k], dtype, granularity))
            return (*write(f"{positions_dir(k)}/{part_name(index)}", table, options), 0)

        # Files are independent: encode, hash and fsync them in parallel (pyarrow, hashlib and
        # file I/O release the GIL), so that writing keeps up with a GPU.
        jobs = len(layers) * (2 if positions is not None else 1) + 1
        with ThreadPoolExecutor(max_workers=min(WRITE_THREADS, jobs)) as pool:
            prompt_job = pool.submit(write, f"{PROMPTS_DIR}/{part_name(index)}", prompts, PROMPT_OPTIONS)
            layer_results = list(pool.map(write_layer, layers))
            position_results = list(pool.map(write_positions, layers)) if positions is not None else []
            results = [prompt_job.result() + (0,)] + layer_results + position_results
        failed = [(rel, exc) for rel, _, exc, _ in results if exc is not None]
        if failed:
            for rel, *_ in results:
                (self.path / rel).unlink(missing_ok=True)
            rel, exc = failed[0]
            raise CollideError(os_error_message(self.path / rel, exc)) from exc
        files = {rel: entry for rel, entry, _, _ in results}
        nonfinite = {str(k): bad for k, (_, _, _, bad) in zip(layers, layer_results)}
        shard = dict(index=index, first_prompt_id=int(first), rows=int(rows), n_tokens=n_tokens,
                     nonfinite_rows=nonfinite, files=files, **info)
        return self.record_shard(shard, time.perf_counter() - t0)

    def record_shard(self, shard: dict, write_s: float = 0.0) -> dict:
        """List a shard whose files are written (by ``commit_shard``, or by a cluster worker) in the manifest.

        ``shard``: its manifest entry, which must continue the store (index, first prompt id);
        ``write_s``: seconds spent writing it (summed into the timings). Returns ``shard``.
        """
        index, rows, n_tokens, info, nonfinite = (shard["index"], shard["rows"], shard["n_tokens"], shard,
                                                  shard["nonfinite_rows"])
        if index != len(self.shards) or shard["first_prompt_id"] != self.n_rows:
            raise ValueError(f"shard {index} from prompt id {shard['first_prompt_id']} does not continue the store "
                             f"{self.path} (next: shard {len(self.shards)} from prompt id {self.n_rows})")
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
        m["timings"]["write_s"] += write_s
        self._write_manifest(m)
        self.written.update(self.path / rel for rel in shard["files"])
        log.debug("committed shard %d (%d rows), written in %.2f s", index, rows, write_s)
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


class ShardPipeline:
    """Commits shards on one writer thread while the caller computes the next one.

    ``submit(task, *args)`` first waits for the previous shard's task (re-raising its error), so
    at most one shard is in flight and memory stays bounded; the task runs on the writer thread
    (typically: wait for the states to reach the host, build the prompts table, ``commit_shard``).
    Leaving the ``with`` block waits for the last task; on an exception (Ctrl-C included) the
    shard being written still completes, so the store stays resumable. Used by ``extract_to_store``
    and the exhaustive continuation test (``collide.extract.ShardPipeline`` is this class).
    """

    def __init__(self, thread_name: str = "collide-store-writer"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._pending: Future | None = None

    def submit(self, task: Callable, *args) -> None:
        """Wait for the shard in flight, then queue ``task(*args)`` on the writer thread."""
        if self._pending is not None:
            self._pending.result()
        self._pending = self._pool.submit(task, *args)

    def __enter__(self) -> "ShardPipeline":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self._pending is not None:
                self._pending.result()
        finally:
            self._pool.shutdown(wait=True)
