"""The store format: directory layout, Parquet schemas, storage dtypes and the manifest.

This module is the one definition of where a shard's files live (``shard_files``), which files a
store may hold (``stray_files``), how states are encoded per storage dtype (``encode_states``,
``decode_states``, ``state_field``) and how a manifest is read (``read_manifest``). The writer,
the reader and ``collide verify`` all use it. ``docs/store-format.md`` is the contract in words.

Needs only numpy and pyarrow.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from collide.atomic import TMP_SUFFIX, sha256_file
from collide.errors import CollideError
from collide.store import quantized

FORMAT = "collide-store"
# 1: last-token float32 states. 2 adds the storage dtype (``dtype``: fp32 | bf16 | fp16) and the
# ``positions`` key (last | all, with positions/layer=K/ files). Version 1 stores read as fp32, last.
# 3 adds the quantized storage dtypes int8 | int4 and ``quant_granularity`` (row | tensor). A store
# is written with the lowest version that describes it (``format_version``): fp32, bf16 and fp16
# stores stay version 2, readable by a collide that predates version 3.
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
PROMPTS_DIR = "prompts"
POSITIONS_DIR = "positions"
POSITIONS = ("last", "all")
# Parquet options: states are written plain (no compression, no dictionary) so that reading them
# is a decode of contiguous values; the prompts table is small and compresses well with zstd.
# bf16 bit patterns are uint16, which Parquet stores as INT32: byte-stream-split puts their two
# zero high bytes in streams of their own that lz4 removes: 1.69 bytes per value on normal data
# (fp32: 4.01, fp16: 2.01); Store.layer of 16384 x 1024 states reads in 0.67 s (fp32: 0.40 s,
# fp16: 0.51 s), measured with pyarrow 26 on 2 shared CPU cores.
PROMPT_OPTIONS = dict(compression="zstd")
BATCHING_KEYS = ("shard_rows", "batch_tokens", "max_batch_size")

# storage dtype -> (numpy dtype of the stored values, Arrow value type)
STORAGE = {"fp32": (np.dtype(np.float32), pa.float32()),
           "fp16": (np.dtype(np.float16), pa.float16()),
           "bf16": (np.dtype(np.uint16), pa.uint16()),  # bfloat16 bit patterns: Arrow has no bfloat16
           "int8": (np.dtype(np.uint8), pa.uint8()),  # a scale byte, then the codes (collide.store.quantized)
           "int4": (np.dtype(np.uint8), pa.uint8())}  # a scale byte, then two codes per byte
DTYPE_KEY = b"collide.dtype"  # field metadata of every state column: its storage dtype
GRANULARITY_KEY = b"collide.quant_granularity"  # field metadata of an int8 / int4 state column: row | tensor


def format_version(dtype: str) -> int:
    """The lowest format version that describes a store of storage ``dtype`` (the version it is written with)."""
    return 3 if dtype in quantized.BITS else 2


def layer_dir(k: int) -> str:
    """Directory (relative to the store) of layer k's last-token shards."""
    return f"layer={k}"


def positions_dir(k: int) -> str:
    """Directory (relative to the store) of layer k's every-position shards (positions=all)."""
    return f"{POSITIONS_DIR}/layer={k}"


def part_name(index: int) -> str:
    """File name of shard ``index`` inside ``prompts/`` and every layer directory."""
    return f"part-{index:05d}.parquet"


def store_dirs(layers: Sequence[int], positions: str) -> list[str]:
    """Every directory a store's shards live in, relative to the store."""
    dirs = [PROMPTS_DIR] + [layer_dir(k) for k in layers]
    return dirs + [positions_dir(k) for k in layers] if positions == "all" else dirs


def shard_files(index: int, layers: Sequence[int], positions: str) -> list[str]:
    """Relative paths of shard ``index``'s files: prompts, then layers, then (all) positions."""
    return [f"{directory}/{part_name(index)}" for directory in store_dirs(layers, positions)]


def state_options(dtype: str) -> dict:
    """Parquet write options of a state file of storage ``dtype`` (see the note on bf16 above)."""
    if dtype == "bf16":
        return dict(compression="lz4", use_dictionary=False, use_byte_stream_split=["state.list.element"],
                    write_statistics=["prompt_id"])
    return dict(compression="none", use_dictionary=False, write_statistics=["prompt_id"])


def value_width(dtype: str, d: int) -> int:
    """Stored values per row of a d-wide state: d, or the bytes of a quantized row (scale byte + codes)."""
    return quantized.width(dtype, d) if dtype in quantized.BITS else d


def state_field(dtype: str, d: int, granularity: str | None = None) -> pa.Field:
    """The ``state`` field: fixed_size_list<value, width> tagged with ``collide.dtype`` metadata (and, for
    int8 / int4, ``collide.quant_granularity``)."""
    metadata = {DTYPE_KEY: dtype.encode()}
    if dtype in quantized.BITS:
        metadata[GRANULARITY_KEY] = str(granularity).encode()
    return pa.field("state", pa.list_(STORAGE[dtype][1], value_width(dtype, d)), metadata=metadata)


def encode_states(states: np.ndarray, dtype: str, granularity: str | None = None) -> np.ndarray:
    """(n, d) states -> C-contiguous values of storage ``dtype`` (float32, float16, bf16 as uint16 bits, or
    int8 / int4 rows of ``collide.store.quantized`` with scales per ``granularity``: row | tensor).

    An array already of the storage numpy dtype is taken as it is (for bf16: uint16 bit patterns; for
    int8 / int4: quantized rows); anything else is converted from float32, rounding to nearest even
    (NaN stays NaN).
    """
    storage = STORAGE[dtype][0]
    states = np.asarray(states)
    if states.dtype == storage:
        return np.ascontiguousarray(states)
    x = np.ascontiguousarray(states, dtype=np.float32)
    if dtype in quantized.BITS:
        return quantized.quantize(x, dtype, granularity)
    if dtype != "bf16":
        with np.errstate(over="ignore"):  # fp16 overflow is Inf, counted in nonfinite_rows
            return x.astype(storage)
    u = x.view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), ((u >> 16) | np.uint32(0x40)).astype(np.uint16), rounded)


def decode_states(values: np.ndarray, dtype: str, out: np.ndarray | None = None, d: int | None = None) -> np.ndarray:
    """Stored values of ``dtype`` -> float32, exactly (every bf16 and fp16 value is a float32, and so is
    every int8 / int4 code times its power-of-two scale).

    ``out``: a float32 array of the decoded shape to decode into (no temporary); without it, fp32
    values are returned as they are (no copy) and the others in a new array. ``d``: the state width,
    needed for int8 / int4 rows without ``out`` (an int4 row holds two codes per byte).
    """
    if dtype in quantized.BITS:
        return quantized.dequantize(values, dtype, out.shape[1] if out is not None else d, out)
    if out is None:
        if dtype == "fp32":
            return values.astype(np.float32, copy=False)
        out = np.empty(values.shape, np.float32)
    if dtype == "bf16":
        np.left_shift(values, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        out[...] = values
    return out


def state_array(states: np.ndarray, dtype: str = "fp32", granularity: str | None = None) -> pa.FixedSizeListArray:
    """(n, d) states -> fixed_size_list<value, width> of storage ``dtype`` (zero-copy when no conversion)."""
    values = encode_states(states, dtype, granularity)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


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
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_manifest(path: str | os.PathLike) -> dict:
    """The parsed ``manifest.json`` of the store at ``path``; CollideError if it is not a store.

    A version-1 manifest is returned with ``positions="last"`` and ``dtype="fp32"`` (its states are
    float32; its ``dtype`` key held the compute dtype, which ``model.dtype`` also records).
    """
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
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
            not isinstance(manifest.get("format_version"), int):
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CollideError(f"{file} is not a collide store manifest (format={found!r})")
    if manifest["format_version"] > FORMAT_VERSION:
        raise CollideError(f"{path} has store format version {manifest['format_version']}, newer than this "
                           f"collide reads ({FORMAT_VERSION}); upgrade collide")
    if manifest["format_version"] == 1:
        manifest["dtype"] = "fp32"
    manifest.setdefault("positions", "last")
    return manifest


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


def stray_files(path: Path, manifest: dict) -> list[Path]:
    """Files in the store's shard directories (and a manifest.json.tmp) that no listed shard owns,
    sorted: what a killed writer leaves behind."""
    listed = {f for shard in manifest["shards"] for f in shard["files"]}
    strays = []
    for directory in store_dirs([int(k) for k in manifest["layers"]], manifest["positions"]):
        if (path / directory).is_dir():
            strays += [f for f in (path / directory).iterdir()
                       if f.is_file() and f"{directory}/{f.name}" not in listed]
    if (path / (MANIFEST + TMP_SUFFIX)).exists():
        strays.append(path / (MANIFEST + TMP_SUFFIX))
    return sorted(strays)


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
