"""SOURCE readers of ``collide.invert``: the per-position hidden states of prompts, and what is known about them.

A SOURCE is one of:

* a collide store made with ``store.positions=all`` (a store directory, or a run directory that
  holds a ``store/`` subdirectory or a ``store.json`` record whose "path" names the store): the
  model config, layers, norm convention, storage dtype and true token ids come from the store;
* states produced by anyone (the auditor's case; nothing here depends on collide having written
  the file). The user names the model (``model=...``, its ``final_norm`` convention) and ``layer``:

  - ``.npy``: one prompt (T, d) or N prompts of equal length (N, T, d);
  - ``.safetensors``: one (T, d) tensor per prompt, in natural order of the tensor names
    ("p2" before "p10");
  - ``.parquet``: one row per prompt with a ``states`` column (list of T lists of d floats), or
    one row per position with columns ``prompt_id``, ``position``, ``state`` (list of d floats);
    an optional ``token_ids`` column (row per prompt) gives the true tokens for scoring.

Row p of a prompt's states is the hidden state at position p (BOS included when the model's
tokenizer adds one) at layer k = HF ``hidden_states[k]``. States are returned as float32
(bf16/fp16 upcast exactly).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from collide.errors import CollideError

AUDITOR_SUFFIXES = (".npy", ".safetensors", ".parquet")
SAFETENSORS_DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "F64": "fp64"}  # header dtype -> ours


@dataclass
class Target:
    """One prompt to invert."""

    key: str  # its name in SOURCE: the store's prompt_id, the tensor name or the row index
    states: np.ndarray  # (T, d) float32: row p = the state at position p
    true_ids: Optional[list[int]] = None  # the prompt's token ids when SOURCE knows them (scoring only)
    text: Optional[str] = None  # the prompt's text when SOURCE keeps it


@dataclass
class Source:
    """A readable SOURCE: its facts, and ``targets()`` in SOURCE order."""

    path: Path  # the file or directory named on the command line
    kind: str  # npy | safetensors | parquet | store
    n_prompts: int  # prompts in SOURCE
    d: int  # width of the states
    dtype: str  # dtype the states were stored in: fp32 | bf16 | fp16 | fp64
    model: Optional[dict] = None  # the model config recorded by a store (None for auditor files)
    layers: list[int] = field(default_factory=list)  # layers a store holds (empty for auditor files)
    layer: Optional[int] = None  # the store layer read (None for auditor files: the user names it)
    _read: object = None  # (indices: sorted list of prompt indices) -> Iterator[Target]
    keys: list = field(default_factory=list)  # each prompt's key (Target.key), in SOURCE order

    def targets(self, indices: Optional[list[int]] = None) -> Iterator[Target]:
        """The prompts at ``indices`` (0-based, in SOURCE order; None = every prompt), in SOURCE order, each checked
        (finite values, at least one position, width d)."""
        wanted = list(range(self.n_prompts)) if indices is None else sorted(set(int(i) for i in indices))
        for target in self._read(wanted):
            bad = ~np.isfinite(target.states).all(axis=1)
            if bad.any():
                raise CollideError(f"{self.path}: prompt {target.key} has NaN or Inf in the states at positions "
                                   f"{np.nonzero(bad)[0][:10].tolist()}; remove or recompute those rows")
            if len(target.states) == 0:
                raise CollideError(f"{self.path}: prompt {target.key} has no positions; drop it from SOURCE")
            if target.states.shape[1] != self.d:
                raise CollideError(f"{self.path}: prompt {target.key} has states of width {target.states.shape[1]}, "
                                   f"the others {self.d}; every prompt must have (T, {self.d}) states")
            yield target

    def check(self, indices: Optional[list[int]] = None, rows: int = 2, keep: int = 4) -> np.ndarray:
        """Read and check every prompt at ``indices`` (see ``targets``) before anything is inverted; returns the
        first ``rows`` rows of the first ``keep`` prompts that have that many ((n, rows, d) float32; fewer rows
        when no prompt is that long)."""
        firsts: list[np.ndarray] = []
        for target in self.targets(indices):
            if len(firsts) < keep:
                firsts.append(target.states[:rows])
        width = min(len(x) for x in firsts)
        return np.stack([x[:width] for x in firsts])


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _float32(x: np.ndarray, path: Path) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.floating):
        raise CollideError(f"{path} holds {x.dtype} values, not floating-point hidden states; pass the states file")
    return np.ascontiguousarray(x, dtype=np.float32)


def _dtype_name(dtype) -> str:
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}.get(
        str(dtype).removeprefix("torch."), str(dtype))


def _empty(path: Path) -> CollideError:
    return CollideError(f"{path} holds no states (empty); pass a file with at least one prompt's states")


def read_npy(path: Path) -> Source:
    """(T, d) = one prompt, (N, T, d) = N prompts."""
    x = np.load(path, mmap_mode="r")
    if x.ndim not in (2, 3):
        raise CollideError(f"{path} has shape {x.shape}; expected (T, d) for one prompt or (N, T, d) for N prompts")
    if x.size == 0:
        raise _empty(path)
    if not np.issubdtype(x.dtype, np.floating):
        raise CollideError(f"{path} holds {x.dtype} values, not floating-point hidden states; pass the states file")
    batch = x[None] if x.ndim == 2 else x
    return Source(path, "npy", len(batch), int(x.shape[-1]), _dtype_name(x.dtype),
                  _read=lambda wanted: (Target(str(i), _float32(batch[i], path)) for i in wanted),
                  keys=[str(i) for i in range(len(batch))])


def read_safetensors(path: Path) -> Source:
    """One (T, d) tensor per prompt, in natural order of the names."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = sorted(f.keys(), key=_natural)
        if not names:
            raise _empty(path)
        header = {name: (f.get_slice(name).get_shape(), f.get_slice(name).get_dtype()) for name in names}
    shape, dtype = header[names[0]]
    for name, (got, kind) in header.items():  # every tensor's shape and dtype, from the header alone
        if len(got) != 2 or got[1] != shape[-1] or len(shape) != 2:
            raise CollideError(f"{path}: tensor {name!r} has shape {list(got)}; every tensor must be one prompt's "
                               f"(T, d) states with the same d ({names[0]!r} is {list(shape)})")
        if kind not in SAFETENSORS_DTYPES:
            raise CollideError(f"{path}: tensor {name!r} holds {kind} values, not floating-point hidden states; "
                               f"store the states as {'/'.join(SAFETENSORS_DTYPES)}")

    def read(wanted: list[int]) -> Iterator[Target]:
        with safe_open(str(path), framework="pt") as f:
            for name in (names[i] for i in wanted):
                yield Target(name, _float32(f.get_tensor(name).float().numpy(), path))

    return Source(path, "safetensors", len(names), int(shape[1]), SAFETENSORS_DTYPES.get(dtype, dtype), _read=read,
                  keys=names)


def read_parquet(path: Path) -> Source:
    """One row per prompt (``states`` [, ``token_ids``, ``text``]) or per position (``prompt_id``, ``position``,
    ``state``)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if table.num_rows == 0:
        raise _empty(path)
    names = table.column_names
    if "states" in names:
        def prompt(i: int) -> Target:
            x = np.asarray(table.column("states")[i].as_py(), dtype=np.float64)
            ids = table.column("token_ids")[i].as_py() if "token_ids" in names else None
            text = table.column("text")[i].as_py() if "text" in names else None
            return Target(str(i), _float32(x.reshape(len(x), -1) if x.size else x.reshape(0, 0), path), ids, text)
        first = next((row for row in table.column("states").to_pylist() if row), None)  # a prompt with a position
        if first is None:
            raise _empty(path)
        d = len(first[0])
        return Source(path, "parquet", table.num_rows, d, "fp32", _read=lambda wanted: (prompt(i) for i in wanted),
                      keys=[str(i) for i in range(table.num_rows)])
    if not {"prompt_id", "position", "state"} <= set(names):
        raise CollideError(f"{path} has columns {names}; expected `states` (one row per prompt) or `prompt_id`, "
                           "`position`, `state` (one row per position)")
    table = table.sort_by([("prompt_id", "ascending"), ("position", "ascending")])
    pids = table.column("prompt_id").to_numpy()
    keys, starts = np.unique(pids, return_index=True)
    bounds = list(starts) + [len(pids)]

    def read(wanted: list[int]) -> Iterator[Target]:
        for i in wanted:
            key = keys[i]
            rows = table.slice(bounds[i], bounds[i + 1] - bounds[i])
            positions = rows.column("position").to_numpy()
            if not np.array_equal(positions, np.arange(len(positions))):
                raise CollideError(f"{path}: prompt {key} has positions {positions[:10].tolist()}...; every position "
                                   "0..T-1 must be present exactly once")
            yield Target(str(key), _float32(np.asarray(rows.column("state").to_pylist(), dtype=np.float64), path))

    d = len(table.column("state")[0].as_py())
    return Source(path, "parquet", len(keys), d, "fp32", _read=read, keys=[str(k) for k in keys])


def read_store(path: Path, layer: Optional[int]) -> Source:
    """A collide store made with ``store.positions=all``, or the run that used one; ``layer`` None = the deepest
    stored layer."""
    from collide.store.reader import open_run_store

    store = open_run_store(path, every_position=True)
    k = store.layers[-1] if layer is None else layer
    if k not in store.layers:
        raise CollideError(f"layer={k} is not in the store {path} (it holds layers {store.layers}); pick one of those")
    table = store.prompts(["prompt_id", "token_ids"]).to_pydict()
    if not table["prompt_id"]:
        raise _empty(path)
    pids = list(table["prompt_id"])
    true_ids = dict(zip(pids, table["token_ids"]))

    def read(wanted: list[int]) -> Iterator[Target]:
        chosen = [pids[i] for i in wanted]
        texts = store.texts(chosen)
        for pid, states in store.position_states(k, chosen):
            yield Target(str(pid), states, list(true_ids[pid]), texts.get(pid))

    return Source(path, "store", len(true_ids), store.d, store.dtype, model=store.manifest["identity"]["model"],
                  layers=list(store.layers), layer=k, _read=read, keys=[str(pid) for pid in pids])


def open_source(spec: str, layer: Optional[int]) -> Source:
    """Open SOURCE ``spec`` (see the module docstring); errors are one line naming it and the fix."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise CollideError(f"SOURCE {spec} does not exist; pass a store or run directory, or a .npy, .safetensors "
                           "or .parquet file of per-position states")
    if path.is_dir():
        return read_store(path, layer)
    if path.stat().st_size == 0:
        raise _empty(path)
    readers = {".npy": read_npy, ".safetensors": read_safetensors, ".parquet": read_parquet}
    if path.suffix not in readers:
        raise CollideError(f"SOURCE {path} has suffix {path.suffix!r}; collide reads {list(AUDITOR_SUFFIXES)} files "
                           "or store directories")
    try:
        return readers[path.suffix](path)
    except (ValueError, OSError) as exc:
        raise CollideError(f"cannot read {path} as {path.suffix} ({exc}); check that the file is whole") from exc
