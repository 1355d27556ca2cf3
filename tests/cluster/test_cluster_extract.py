"""Extraction on Ray makes the store a local run makes (bitwise on CPU), also when a worker dies mid-shard."""

from __future__ import annotations

import dataclasses

import pytest

from collide.errors import CollideError
from collide.store import open_store

from .common import CLUSTER, assert_same_store, ray_extract


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
    one_worker = dataclasses.replace(CLUSTER, num_workers=1)
    with pytest.raises(CollideError) as err:
        ray_extract(tiny_llama, tmp_path / "store", dataclasses.replace(one_worker, max_retries=0))
    message = str(err.value)
    assert message.startswith("extraction of shard") and "cluster.max_retries=0" in message and "\n" not in message
    partial = open_store(tmp_path / "store")
    assert not partial.complete and len(partial.shards) == 3
    assert_same_store(local_store, ray_extract(tiny_llama, tmp_path / "store", one_worker))
