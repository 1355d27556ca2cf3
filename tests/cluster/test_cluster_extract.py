"""Extraction on Ray makes the store a local run makes (bitwise on CPU), also when a worker dies mid-shard."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from collide.cluster import extract_to_store_ray
from collide.extract import extract_to_store
from collide.store import MANIFEST, open_store

from .conftest import CLUSTER, QUIET, identity, store_cfg, synthetic

N = 150  # 7 shards of 24 rows, the last one partial; every 7th stream item is a duplicate
LAYERS = [0, 1, 2]


@pytest.fixture(scope="module")
def local_store(tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("local") / "store"
    return extract_to_store(tiny_llama, synthetic(N + 40), LAYERS, path, N, identity(N), store_cfg(), QUIET)


def files_of(store) -> dict:
    """{relative path: sha256} of every listed file, and the set of files actually on disk."""
    listed = {rel: entry["sha256"] for shard in store.manifest["shards"] for rel, entry in shard["files"].items()}
    on_disk = {str(p.relative_to(store.path)) for p in store.path.rglob("*") if p.is_file()} - {MANIFEST}
    return listed, on_disk


def assert_same_store(local, remote):
    (listed_a, _), (listed_b, disk_b) = files_of(local), files_of(remote)
    assert listed_a == listed_b  # the same files, with the same checksums
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


def ray_extract(lm, path, cluster=CLUSTER):
    return extract_to_store_ray(lm, synthetic(N + 40), LAYERS, path, N, identity(N), store_cfg(), QUIET, cluster)


def test_ray_store_is_the_local_store_when_workers_are_killed_mid_shard(ray_local, chaos_dir, tiny_llama,
                                                                        local_store, tmp_path):
    (chaos_dir / "shard-2.kill").touch()
    (chaos_dir / "shard-5.kill").touch()
    store = ray_extract(tiny_llama, tmp_path / "store")
    assert (chaos_dir / "shard-2.killed").exists() and (chaos_dir / "shard-5.killed").exists()
    assert_same_store(local_store, store)


def test_retries_exhausted_is_one_line_and_the_store_resumes(ray_local, chaos_dir, tiny_llama, local_store,
                                                             tmp_path):
    (chaos_dir / "shard-3.kill").touch()
    no_retries = dataclasses.replace(CLUSTER, max_retries=0, num_workers=1)
    with pytest.raises(Exception) as err:
        ray_extract(tiny_llama, tmp_path / "store", no_retries)
    message = str(err.value)
    assert message.startswith("extraction of shard") and "cluster.max_retries=0" in message and "\n" not in message
    partial = open_store(tmp_path / "store")
    assert not partial.complete and len(partial.shards) == 3
    assert_same_store(local_store, ray_extract(tiny_llama, tmp_path / "store"))
