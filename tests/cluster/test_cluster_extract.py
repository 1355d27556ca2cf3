"""Extraction on Ray makes the store a local run makes (bitwise on CPU), also when a worker dies mid-shard."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from collide.errors import CollideError
from collide.store import open_store

from .common import CLUSTER, assert_same_store, ray_extract, wait_for


def test_ray_store_is_the_local_store_when_workers_are_killed_mid_shard(ray_local, chaos_dir, tiny_llama,
                                                                        local_store, tmp_path):
    (chaos_dir / "shard-4.kill").touch()
    store = ray_extract(tiny_llama, tmp_path / "store")
    assert (chaos_dir / "shard-4.killed").exists()
    assert_same_store(local_store, store)


def test_retries_exhausted_is_one_line_and_the_store_resumes(ray_local, chaos_dir, tiny_llama, local_store,
                                                             tmp_path):
    (chaos_dir / "shard-3.kill").touch()
    one_worker = dataclasses.replace(CLUSTER, num_workers=1)
    with pytest.raises(CollideError) as err:
        ray_extract(tiny_llama, tmp_path / "store", dataclasses.replace(one_worker, max_retries=0))
    message = str(err.value)
    assert message.startswith("extraction of shard") and "cluster.max_retries=0" in message and "\n" not in message
    partial = open_store(tmp_path / "store")  # the shards before the lost one (the write of shard 2 may be lost too)
    assert not partial.complete and len(partial.shards) <= 3
    assert [s["files"] for s in partial.shards] == [s["files"] for s in local_store.shards[:len(partial.shards)]]
    assert_same_store(local_store, ray_extract(tiny_llama, tmp_path / "store", one_worker))


def alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node["Alive"])


def test_a_store_some_node_cannot_reach_is_one_line_before_any_work(ray_local, tiny_llama, tmp_path):
    """A second node joins from its own mount namespace, where a tmpfs hides the store's directory."""
    shared = tmp_path / "shared"
    shared.mkdir()
    script = ('mount -t tmpfs tmpfs "$0" && exec "$1" start --address="$2" --node-ip-address=127.0.0.1 '
              '--num-cpus=0 --block')
    ray_cli = str(Path(sys.executable).with_name("ray"))
    node = subprocess.Popen(["unshare", "-m", "sh", "-c", script, str(shared), ray_cli,
                             ray.get_runtime_context().gcs_address], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: alive_nodes() == 2, "the second node to join")
        with pytest.raises(CollideError) as err:
            ray_extract(tiny_llama, shared / "store")
        message = str(err.value)
        assert f"the store {shared / 'store'} is not reachable from Ray node 127.0.0.1" in message
        assert "does not hold the probe file" in message and "\n" not in message
        assert open_store(shared / "store").shards == []  # no work started
        assert not list(shared.glob("store/.collide-probe-*"))
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait()
        wait_for(lambda: alive_nodes() == 1, "the second node to leave")
