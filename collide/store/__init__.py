"""Store stage: a sharded, checksummed, resumable Parquet store of hidden states.

Layout (the contract, with a pyarrow-only reading recipe, is ``docs/store-format.md``)::

    STORE/manifest.json                          identity, model facts, counts, shards
    STORE/prompts/part-NNNNN.parquet             prompt_id, token_ids, n_tokens, source[, text][, extra]
    STORE/layer=K/part-NNNNN.parquet             prompt_id int64, state fixed_size_list<dtype, d>
    STORE/positions/layer=K/part-NNNNN.parquet   (positions=all) prompt_id, position int32, state

Modules: ``layout`` (format, schemas, storage dtypes, manifest), ``reader`` (``Store``,
``open_store``), ``writer`` (``StoreWriter``, ``ShardPipeline``), ``ecosystem`` and
``torch_dataset`` (pyarrow.dataset, Hugging Face and torch views). Everything here needs only
numpy and pyarrow until an ecosystem reader is called.
"""

from collide.atomic import os_error_message
from collide.store.layout import (BATCHING_KEYS, FORMAT, FORMAT_VERSION, MANIFEST, POSITIONS_DIR, PROMPTS_DIR,
                                  STORAGE, decode_states, encode_states, file_problem, identity_diff, layer_dir,
                                  part_name, positions_dir, prompt_table, read_manifest, shard_files, state_array,
                                  stray_files)
from collide.store.reader import RUN_RECORD, Store, open_run_store, open_store
from collide.store.writer import ShardPipeline, StoreWriter, lock_store

__all__ = ["BATCHING_KEYS", "FORMAT", "FORMAT_VERSION", "MANIFEST", "POSITIONS_DIR", "PROMPTS_DIR", "RUN_RECORD", "STORAGE",
           "ShardPipeline", "Store", "StoreWriter", "decode_states", "encode_states", "file_problem",
           "identity_diff", "layer_dir", "lock_store", "open_run_store", "open_store", "os_error_message", "part_name", "positions_dir",
           "prompt_table", "read_manifest", "shard_files", "state_array", "stray_files"]
