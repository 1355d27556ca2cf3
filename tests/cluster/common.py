"""Shared helpers of the Ray tests: the synthetic prompt stream, configs, and store/result comparisons."""

from __future__ import annotations

import time

import numpy as np

from collide.config import ClusterConfig, ExtractConfig, SearchConfig, StoreConfig
from collide.corpus import Prompt
from collide.store import MANIFEST

BOS = 256
N = 150  # prompts of the extraction tests: 7 shards of 24 rows, the last one partial
LAYERS = [0, 1, 2]
QUIET = ExtractConfig(batch_tokens=512, max_batch_size=64, progress=False)
SEARCH = SearchConfig(block_rows=32, progress=False)  # small blocks: many tiles on a few hundred rows
CLUSTER = ClusterConfig(kind="ray", address=None, num_workers=2, cpus_per_worker=1, max_retries=3, panel_blocks=2)
STORE = StoreConfig(shard_rows=24)
TINY = dict(name="tiny", source="random:llama", family="llama")  # the conftest's tiny_llama
WAIT_S = 300  # a safety net against a hung test, not a timing assertion


def wait_for(condition, what: str) -> None:
    """Poll ``condition()`` until it holds (AssertionError after WAIT_S)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)


def synthetic(n: int, seed: int = 0):
    """n prompts of mixed lengths (BOS + random bytes), every 7th repeating an earlier one (a duplicate);
    many end in the same byte, so their layer-0 states are equal (collisions)."""
    rng = np.random.default_rng(seed)
    made = []
    for i in range(n):
        if i % 7 == 6:
            ids = made[int(rng.integers(0, len(made)))]
        else:
            ids = (BOS, *rng.integers(0, 256, int(rng.integers(1, 24))).tolist())
            made.append(ids)
        yield Prompt(token_ids=ids, source=f"synthetic:{i}:0", text=f"prompt {i}")


def identity(n_prompts: int) -> dict:
    return {"model": dict(TINY), "corpus": {"name": "synthetic"}, "n_prompts": n_prompts}


def ray_extract(lm, path, cluster=CLUSTER):
    """The Ray extraction of the N-prompt test store."""
    from collide.cluster import extract_to_store_ray

    return extract_to_store_ray(lm, synthetic(N + 40), LAYERS, path, N, identity(N), STORE, QUIET, cluster)


def files_of(store) -> tuple[dict, set]:
    """({relative path: sha256} of every listed file, the set of files actually on disk)."""
    listed = {rel: entry["sha256"] for shard in store.manifest["shards"] for rel, entry in shard["files"].items()}
    on_disk = {str(p.relative_to(store.path)) for p in store.path.rglob("*") if p.is_file()} - {MANIFEST}
    return listed, on_disk


def assert_same_store(local, remote):
    """The same files with the same checksums, the same shard facts and counts, bitwise the same states."""
    (listed_a, _), (listed_b, disk_b) = files_of(local), files_of(remote)
    assert listed_a == listed_b
    assert disk_b == set(listed_b)  # nothing duplicated, nothing left over
    keys = ("index", "first_prompt_id", "rows", "n_tokens", "stream_items", "n_duplicates", "tokens_sha256",
            "batch_tokens")
    assert [{k: s[k] for k in keys} for s in local.manifest["shards"]] == \
        [{k: s[k] for k in keys} for s in remote.manifest["shards"]]
    assert local.manifest["counts"] == remote.manifest["counts"] and remote.complete
    for k in LAYERS:
        ids_a, states_a = local.layer(k)
        ids_b, states_b = remote.layer(k)
        assert np.array_equal(ids_a, ids_b) and states_a.tobytes() == states_b.tobytes()


def assert_same(local, remote):
    """Two LayerResults agree on everything the search certifies, bitwise."""
    a, b = local.result, remote.result
    assert np.array_equal(local.prompt_ids, remote.prompt_ids)
    assert (a.distance, a.pair, a.certified, a.n_pairs, a.invalid_rows) == \
        (b.distance, b.pair, b.certified, b.n_pairs, b.invalid_rows)
    assert a.collisions == b.collisions and a.n_collisions == b.n_collisions
    assert np.array_equal(a.nn_distance, b.nn_distance, equal_nan=True)
    assert np.array_equal(a.nn_index, b.nn_index) and a.nearest == b.nearest
    assert np.array_equal(a.row_norm, b.row_norm, equal_nan=True)
    assert np.array_equal(a.centred_norm, b.centred_norm, equal_nan=True)
