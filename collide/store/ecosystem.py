"""A store layer through the tools people already use: pyarrow.dataset, Hugging Face datasets, torch.

``Store.dataset``, ``Store.hf_dataset`` and ``Store.torch_dataset`` call these; each covers the
Store's rows (a view from ``select`` covers its own). ``docs/store-format.md`` shows each in use.

* ``layer_dataset``: the layer's Parquet shards as a ``pyarrow.dataset.Dataset``, columns as
  stored (``state`` in the storage dtype: bf16 as uint16 bit patterns, see the docs).
* ``hf_dataset``: a ``datasets.Dataset`` memory-mapped from Arrow IPC files: ``prompt_id``,
  ``token_ids``, ``text`` (when kept) and ``state`` (float32). Parquet cannot be memory-mapped, so
  the first call writes one Arrow file per shard under ``STORE/arrow/layer=K/`` (named by the
  shard file's sha256, so a stale copy is never read; delete the directory to reclaim the space);
  later calls map those files and copy nothing.
* ``torch_dataset`` (``collide.store.torch_dataset``): a ``torch.utils.data.Dataset`` over the
  same memory-mapped files.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from collide.atomic import atomic_write
from collide.errors import CollideError
from collide.store.layout import PROMPTS_DIR, part_name

ARROW_DIR = "arrow"  # memory-mappable copies for hf_dataset / torch_dataset (not part of the store format)


def layer_dataset(store, k: int):
    """Layer k of ``store`` (a Store or view) as a ``pyarrow.dataset.Dataset`` (prompt_id, state)."""
    import pyarrow.dataset as ds

    files = [str(store.layer_file(shard, k)) for shard in store.shards]
    dataset = ds.dataset(files, format="parquet")
    field = ds.field("prompt_id")
    return dataset.filter((field >= store.first_id) & (field < store.stop_id))


def _arrow_file(store, shard: dict, k: int) -> Path:
    """The memory-mappable Arrow IPC copy of one shard (prompts columns + float32 state), made once."""
    layer_file = store.layer_file(shard, k)
    sha = shard["files"][f"{layer_file.parent.name}/{layer_file.name}"]["sha256"][:16]
    path = store.path / ARROW_DIR / f"layer={k}" / f"part-{shard['index']:05d}-{sha}.arrow"
    if path.is_file():
        return path
    import pyarrow.parquet as pq

    columns = ["prompt_id", "token_ids"] + (["text"] if store.keep_text else [])
    prompts = pq.read_table(store._checked(shard, f"{PROMPTS_DIR}/{part_name(shard['index'])}"), columns=columns)
    states = store._decode(pq.read_table(layer_file, columns=["state"]).column("state").combine_chunks())
    table = prompts.append_column("state", pa.FixedSizeListArray.from_arrays(pa.array(states.reshape(-1)), store.d))

    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
    except OSError as exc:
        raise CollideError(f"cannot write the memory-mappable copy {path} ({exc.strerror or exc}); hf_dataset and "
                           f"torch_dataset need write access to {store.path / ARROW_DIR} and room for the layer") from exc
    return path


def hf_dataset(store, k: int):
    """Layer k of ``store`` as a memory-mapped ``datasets.Dataset`` (prompt_id, token_ids[, text], state float32)."""
    import datasets

    store._check_layer(k)
    if not store.shards:
        raise CollideError(f"the store {store.path} has no complete shard yet; extract first")
    parts = [datasets.Dataset.from_file(str(_arrow_file(store, shard, k)), in_memory=False) for shard in store.shards]
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    lo = store._rows(store.shards[0])[0]
    if lo or len(dataset) != store.n_rows:
        dataset = dataset.select(range(lo, lo + store.n_rows))
    return dataset
