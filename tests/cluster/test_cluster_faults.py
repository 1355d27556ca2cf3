"""What a cluster does to a run: a search worker killed mid-tile, a node removed, the driver killed.

Each run must end as a clean run ends: the store a local run makes, the search result a local
search gives. Units are hung or killed through collide.cluster.session's chaos switch.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from collide.cluster import search_store_ray
from collide.cluster.pool import close_pool
from collide.search import search_store
from collide.store import open_store

from .common import CLUSTER, SEARCH, WAIT_S, assert_same, assert_same_store, ray_extract, wait_for

ROOT = Path(__file__).resolve().parents[2]


def in_thread(fn, *args):
    """Run fn(*args) in a thread; returns (thread, result dict with 'value' or 'error')."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def test_search_worker_killed_mid_tile_is_retried(ray_local, chaos_dir, search_store_300):
    for tag in ("tile-0-0", "tile-1-3"):
        (chaos_dir / f"{tag}.kill").touch()
    remote = search_store_ray(search_store_300, 0, 1e-6, SEARCH, CLUSTER)
    assert (chaos_dir / "tile-0-0.killed").exists() and (chaos_dir / "tile-1-3.killed").exists()
    assert_same(search_store(search_store_300, 0, 1e-6, SEARCH), remote)


def remove_hung_node(cluster: Cluster, chaos_dir: Path, tag: str) -> None:
    """Wait until a worker hangs at unit ``tag``, then remove the node it runs on (its processes die)."""
    hung = chaos_dir / f"{tag}.hung"
    wait_for(hung.exists, f"a worker to reach {tag}")
    node_id = hung.read_text()
    node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
    cluster.remove_node(node, allow_graceful=False)


def test_a_node_removed_mid_shard_and_mid_tile(chaos_dir, tiny_llama, local_store, search_store_300, tmp_path):
    if ray.is_initialized():
        ray.shutdown()  # this test makes its own cluster: a CPU-less head and two 2-CPU worker nodes
    local = dict(node_ip_address="127.0.0.1")
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=False, **local))
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2, **local)
        ray.init(address=cluster.address, log_to_driver=False)
        (chaos_dir / "shard-2.hang").touch()
        thread, out = in_thread(ray_extract, tiny_llama, tmp_path / "store")
        remove_hung_node(cluster, chaos_dir, "shard-2")
        thread.join(WAIT_S)
        assert "error" not in out, out.get("error")
        assert_same_store(local_store, out["value"])

        cluster.add_node(num_cpus=2, **local)  # a replacement node joins
        (chaos_dir / "tile-1-2.hang").touch()
        thread, out = in_thread(search_store_ray, search_store_300, 0, 1e-6, SEARCH, CLUSTER)
        remove_hung_node(cluster, chaos_dir, "tile-1-2")
        thread.join(WAIT_S)
        assert "error" not in out, out.get("error")
        assert_same(search_store(search_store_300, 0, 1e-6, SEARCH), out["value"])
    finally:
        ray.shutdown()
        cluster.shutdown()


DRIVER = """
import dataclasses, sys
sys.path.insert(0, {root!r})
from collide.config import ModelConfig
from collide.models import load_model
from tests.cluster.common import CLUSTER, TINY, ray_extract
ray_extract(load_model(ModelConfig(**TINY)), {path!r}, dataclasses.replace(CLUSTER, address={address!r}, num_workers=1))
"""


def test_the_driver_killed_then_the_same_command_resumes(ray_local, chaos_dir, tiny_llama, local_store, tmp_path):
    close_pool()  # this process's warm workers would hold every CPU the driver's worker needs
    store_dir = tmp_path / "store"
    (chaos_dir / "shard-3.hang").touch()  # shards 0-2 finish, shard 3 never does: the driver is mid-run
    code = DRIVER.format(root=str(ROOT), path=str(store_dir), address=ray.get_runtime_context().gcs_address)
    driver = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: (chaos_dir / "shard-3.hung").exists() and (store_dir / "manifest.json").exists()
                 and len(open_store(store_dir).shards) == 3, "the driver to list shards 0-2")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert driver.returncode == -signal.SIGKILL, driver.stderr.read().decode()[-3000:]
    killed = open_store(store_dir)
    assert not killed.complete and len(killed.shards) == 3
    one_worker = dataclasses.replace(CLUSTER, num_workers=1)
    assert_same_store(local_store, ray_extract(tiny_llama, store_dir, one_worker))  # the same command, again
