"""Reading a store: ``open_store(path)`` -> ``Store``, float32 states by layer, block or prompt id.

Every reader returns float32 whatever the storage dtype (bf16 and fp16 values widen exactly; int8
and int4 codes times their power-of-two scales are float32 exactly, ``collide.store.quantized``),
so the search never sees the storage format. A ``Store`` may be a view of a contiguous range of
prompt ids (``select``, ``select_range``); every reader honours it.

Needs only numpy and pyarrow (the ecosystem readers import pyarrow.dataset, datasets or torch
when called).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from collide.errors import CollideError
from collide.store.layout import (MANIFEST, PROMPTS_DIR, decode_states, file_problem, layer_dir, part_name, positions_dir,
                                  prompt_table, read_manifest, value_width)


class Store:
    """Read access to a store: ids, (n, d) float32 state matrices per layer, and the prompts.

    Only the shards listed in the manifest are read, so an ``in-progress`` store reads as the
    prompts of its complete shards. Rows are in prompt_id order: ``first_id .. stop_id - 1``
    (0 .. n_rows - 1 unless the Store is a view).
    """

    def __init__(self, path: str | os.PathLike, verified: Iterable[Path] = ()):
        self.path = Path(path)  # store directory
        self.manifest: dict = read_manifest(self.path)  # the parsed manifest.json
        self.layers: list[int] = [int(k) for k in self.manifest["layers"]]  # stored layers, ascending
        self.d: int = int(self.manifest["d"])  # width of each state vector
        self.dtype: str = self.manifest["dtype"]  # storage dtype: fp32 | bf16 | fp16 | int8 | int4 (readers: float32)
        # int8 / int4: one power-of-two scale per row ("row") or per layer file of a shard ("tensor"); else None
        self.quant_granularity: str | None = self.manifest.get("quant_granularity")
        self.positions: str = self.manifest["positions"]  # "last", or "all": every position is kept too
        self.shards: list[dict] = self.manifest["shards"]  # complete shards (of this view), in prompt_id order
        self.n_rows: int = sum(int(s["rows"]) for s in self.shards)  # prompts in this view
        self.first_id: int = 0  # first prompt id of this view
        self.complete: bool = self.manifest["status"] == "complete"  # False while extraction is unfinished
        self.keep_text: bool = bool(self.manifest.get("keep_text", True))  # prompts carry a text column
        # files whose sha256 matched the manifest since this Store was opened: ``verified`` are files the caller
        # hashed itself (a StoreWriter, from the bytes on disk, as it listed them)
        self._verified: set[Path] = set(verified)

    @property
    def stop_id(self) -> int:
        """One past the last prompt id of this view."""
        return self.first_id + self.n_rows

    def __repr__(self) -> str:
        status = "complete" if self.complete else "in-progress"
        view = f", ids {self.first_id}..{self.stop_id - 1}" if self.first_id else ""
        dtype = f"{self.dtype} per {self.quant_granularity}" if self.quant_granularity else self.dtype
        return (f"Store({str(self.path)!r}, {status}, n_rows={self.n_rows}{view}, d={self.d}, layers={self.layers}, "
                f"dtype={dtype}, positions={self.positions})")

    # ----------------------------------------------------------------- views

    def select(self, n_rows: int) -> "Store":
        """A view of this Store's first ``n_rows`` prompts (a run asking for fewer than the store holds)."""
        return self.select_range(self.first_id, self.first_id + int(n_rows))

    def select_range(self, first_id: int, stop_id: int) -> "Store":
        """A view of prompt ids ``first_id .. stop_id - 1``, which must lie within this Store's rows."""
        first_id, stop_id = int(first_id), int(stop_id)
        if not self.first_id <= first_id < stop_id <= self.stop_id:
            raise CollideError(f"prompt ids {first_id}..{stop_id - 1} are not within the {self.n_rows} complete "
                               f"prompts (ids {self.first_id}..{self.stop_id - 1}) of the store {self.path}; ask "
                               "for fewer prompts or finish the extraction first")
        view = copy.copy(self)
        view.shards = [s for s in self.shards if int(s["first_prompt_id"]) < stop_id
                       and int(s["first_prompt_id"]) + int(s["rows"]) > first_id]
        view.first_id, view.n_rows = first_id, stop_id - first_id
        return view

    def _rows(self, shard: dict) -> tuple[int, int]:
        """(lo, hi): the rows of ``shard``'s layer files that lie in this view."""
        start = int(shard["first_prompt_id"])
        return max(self.first_id - start, 0), min(self.stop_id - start, int(shard["rows"]))

    def _by_shard(self, prompt_ids: np.ndarray) -> dict[int, np.ndarray]:
        """{index into ``self.shards``: positions in ``prompt_ids`` of the ids that shard holds}, indices
        ascending; CollideError naming the first id that is not in this view."""
        outside = (prompt_ids < self.first_id) | (prompt_ids >= self.stop_id)
        if outside.any():
            raise CollideError(f"prompt_id {int(prompt_ids[outside][0])} is not in the store {self.path} "
                               f"(ids {self.first_id}..{self.stop_id - 1})")
        starts = np.array([int(s["first_prompt_id"]) for s in self.shards], np.int64)
        shard = np.searchsorted(starts, prompt_ids, side="right") - 1
        order = np.argsort(shard, kind="stable")
        indices, cuts = np.unique(shard[order], return_index=True)
        return dict(zip(indices.tolist(), np.split(order, cuts[1:])))

    # ----------------------------------------------------------------- files

    def _checked(self, shard: dict, rel: str) -> Path:
        """The path of a listed file, after checking its size and sha256 (once per Store).

        Hashing runs at several hundred MB/s, far faster than the search that reads the states,
        and it is what keeps a damaged file from being compared as numbers.
        """
        path = self.path / rel
        if path not in self._verified:
            problem = file_problem(path, shard["files"][rel])
            if problem:
                raise CollideError(f"{problem}. Run `collide verify {self.path}` to list every bad "
                                   "file, then restore them from a copy or extract again into a new store.path")
            self._verified.add(path)
        return path

    def _check_layer(self, k: int) -> None:
        if k not in self.layers:
            raise CollideError(f"layer {k} is not in the store {self.path} (it holds layers {self.layers}); "
                               "pick one of those or extract again with that layer selected")

    def layer_file(self, shard: dict, k: int) -> Path:
        """The checked path of ``shard``'s last-token file of layer k."""
        self._check_layer(k)
        return self._checked(shard, f"{layer_dir(k)}/{part_name(shard['index'])}")

    def _decode(self, chunk: pa.FixedSizeListArray, out: np.ndarray | None = None) -> np.ndarray:
        """fixed_size_list chunk -> (rows, d) float32, into ``out`` if given (else, for fp32, a
        read-only view of the Arrow buffer)."""
        values = chunk.flatten().to_numpy().reshape(-1, value_width(self.dtype, self.d))
        return decode_states(values, self.dtype, out, self.d)

    # ----------------------------------------------------------------- last-token states

    def layer(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 (n,), states float32 (n, d)) of layer k, rows in prompt_id order.

        An fp32 one-shard store is returned zero-copy from the Arrow buffers (read-only arrays:
        copy before writing into them); otherwise shards are decoded one by one into one
        preallocated matrix (one copy, no concatenation of tables).
        """
        self._check_layer(k)
        tables = []
        for shard in self.shards:
            lo, hi = self._rows(shard)
            tables.append(pq.read_table(self.layer_file(shard, k), columns=["prompt_id", "state"]).slice(lo, hi - lo))
        if len(tables) == 1 and tables[0].column("state").num_chunks == 1:
            return tables[0].column("prompt_id").chunk(0).to_numpy(), self._decode(tables[0].column("state").chunk(0))
        ids = np.empty(self.n_rows, np.int64)
        states = np.empty((self.n_rows, self.d), np.float32)
        row = 0
        for table in tables:
            for id_chunk, state_chunk in zip(table.column("prompt_id").chunks, table.column("state").chunks):
                n = len(id_chunk)
                ids[row:row + n] = id_chunk.to_numpy()
                self._decode(state_chunk, states[row:row + n])
                row += n
        if row != self.n_rows:
            raise CollideError(f"layer {k} of {self.path} has {row} rows, the manifest says {self.n_rows}; "
                               f"run `collide verify {self.path}`")
        return ids, states

    def iter_blocks(self, k: int, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Blocks (ids int64 (m,), states float32 (m, d)) of layer k in prompt_id order.

        Every block has exactly ``rows`` rows except the last (m <= rows); together they cover all
        n_rows rows once. Memory is bounded by about two blocks plus one Parquet batch, whatever
        the size of the layer. Each block is a fresh array the caller may keep.
        """
        if rows < 1:
            raise CollideError(f"iter_blocks rows={rows} must be >= 1")
        self._check_layer(k)
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        n_pending = 0
        for shard in self.shards:
            lo, hi = self._rows(shard)
            offset = 0  # row of the shard file where the next batch starts
            for batch in pq.ParquetFile(self.layer_file(shard, k)).iter_batches(batch_size=rows,
                                                                                  columns=["prompt_id", "state"]):
                a, b = max(lo - offset, 0), min(hi - offset, batch.num_rows)
                offset += batch.num_rows
                if a >= b:
                    continue
                batch = batch.slice(a, b - a)
                pending.append((batch.column(0).to_numpy(), self._decode(batch.column(1))))
                n_pending += batch.num_rows
                while n_pending >= rows:
                    block, pending, n_pending = _take(pending, rows), _drop(pending, rows), n_pending - rows
                    yield block
        if n_pending:
            yield _take(pending, n_pending)

    def states(self, k: int, prompt_ids: Sequence[int]) -> np.ndarray:
        """float32 (len(prompt_ids), d): the last-token states of layer k for ``prompt_ids``, in that order."""
        self._check_layer(k)
        wanted = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        out = np.empty((len(wanted), self.d), np.float32)
        for index, slots in self._by_shard(wanted).items():
            shard = self.shards[index]
            column = pq.read_table(self.layer_file(shard, k), columns=["state"]).column("state").combine_chunks()
            rows = wanted[slots] - int(shard["first_prompt_id"])
            out[slots] = self._decode(column.take(pa.array(rows)))
        return out

    # ----------------------------------------------------------------- every position

    def position_states(self, k: int, prompt_ids: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(prompt_id, float32 (n_tokens, d)) for each prompt, in prompt_id order: row p is the state of
        token p of its ``token_ids`` (BOS included) at layer k. ``prompt_ids=None``: every prompt of
        this Store. Needs a store made with ``store.positions=all``."""
        if self.positions != "all":
            raise CollideError(f"the store {self.path} keeps only last-token states (positions=last); inversion "
                               "and probes need the state at every position: extract a store with "
                               "`python -m collide store.positions=all ...` (same model, corpus and layers)")
        self._check_layer(k)
        ids = np.arange(self.first_id, self.stop_id) if prompt_ids is None else \
            np.unique(np.asarray(prompt_ids, dtype=np.int64))
        for index, slots in self._by_shard(ids).items():
            shard = self.shards[index]
            table = pq.read_table(self._checked(shard, f"{positions_dir(k)}/{part_name(shard['index'])}"),
                                  columns=["prompt_id", "state"])
            file_ids = table.column("prompt_id").to_numpy()
            states = table.column("state").combine_chunks()
            for pid in ids[slots].tolist():
                a, b = np.searchsorted(file_ids, pid, "left"), np.searchsorted(file_ids, pid, "right")
                x = self._decode(states.slice(a, b - a))
                yield pid, x if x.flags.writeable else x.copy()

    # ----------------------------------------------------------------- ecosystem readers

    def dataset(self, k: int):
        """Layer k as a ``pyarrow.dataset.Dataset`` (prompt_id, state as stored; see ``collide.store.ecosystem``)."""
        from collide.store.ecosystem import layer_dataset

        return layer_dataset(self, k)

    def hf_dataset(self, k: int):
        """Layer k as a memory-mapped Hugging Face ``datasets.Dataset``: prompt_id, token_ids[, text], state
        (float32). The first call writes memory-mappable copies under STORE/arrow/ (see ``collide.store.ecosystem``)."""
        from collide.store.ecosystem import hf_dataset

        return hf_dataset(self, k)

    def torch_dataset(self, k: int):
        """Layer k as a ``torch.utils.data.Dataset`` of {"prompt_id", "state", "token_ids"} (``hf_dataset``'s files)."""
        from collide.store.torch_dataset import LayerDataset

        return LayerDataset(self, k)

    # ----------------------------------------------------------------- prompts

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
        if not files:
            empty = prompt_table(0, [], [], [] if self.keep_text else None)
            return empty if columns is None else empty.select(list(columns))
        # the view's shards hold consecutive prompts: read them together (threaded), keep the view's rows
        table = pq.read_table([str(f) for f in files], columns=None if columns is None else list(columns))
        return table.slice(self._rows(self.shards[0])[0], self.n_rows)

    def texts(self, prompt_ids: Sequence[int]) -> dict[int, str]:
        """{prompt_id: text} for the given ids; empty when the store keeps no text."""
        if not self.keep_text:
            return {}
        wanted = np.unique(np.asarray(list(prompt_ids), dtype=np.int64))
        out: dict[int, str] = {}
        for index, slots in self._by_shard(wanted).items():
            shard, ids = self.shards[index], set(wanted[slots].tolist())
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


RUN_RECORD = "store.json"  # the record a `collide run` leaves in its run directory: the store it used


def open_run_store(path: str | os.PathLike, every_position: bool = False) -> Store:
    """The store that ``path`` is, or that the run directory ``path`` used: the one way every command
    that reads states (search, exhaustive, invert, probe) opens its argument.

    A store directory (it holds manifest.json) opens as it is. A run directory is read through its
    ``store.json`` record (path and n_prompts: a view of the first n_prompts when a larger store
    served the run); runs made before stores were keyed by content hold their store in ``store/``.
    ``every_position``: the caller reads every position, so a store that keeps only the last one
    (``store.positions=last``) is refused in one line naming the fix.
    """
    store = _open_run_store(Path(path))
    if every_position and store.positions != "all":
        raise CollideError(f"the store {store.path} keeps only each prompt's last-token state (positions=last); "
                           "this command needs the state at every position: extract one with store.positions=all "
                           "(e.g. `collide run model=smollm2 n_prompts=2000 store.positions=all layers=[0,8,16,24,30]`)"
                           " and pass that store or its run directory")
    return store


def _open_run_store(path: Path) -> Store:
    if (path / MANIFEST).is_file():
        return open_store(path)
    record_file = path / RUN_RECORD
    if record_file.is_file():
        try:
            record = json.loads(record_file.read_text())
            store_dir, n_prompts = Path(record["path"]), record.get("n_prompts")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CollideError(f"cannot read {record_file} ({exc!r}); rerun the run's own `collide run` command "
                               "to rewrite it (a complete store is only searched again)") from None
        if not (store_dir / MANIFEST).is_file():
            raise CollideError(f"{record_file} names the store {store_dir}, which holds no {MANIFEST} (moved or "
                               "deleted?): pass the store directory itself, or rerun the run's command to rebuild it")
        store = open_store(store_dir)
        return store.select(int(n_prompts)) if n_prompts is not None and store.n_rows > n_prompts else store
    if (path / "store" / MANIFEST).is_file():
        return open_store(path / "store")
    raise CollideError(f"{path} is neither a collide store (no {MANIFEST}) nor a run directory (no {RUN_RECORD}); "
                       "pass a run directory or a store directory")
