"""Ray tests: run only inside a loopback-only network namespace (tests/test_cluster.py starts them).

A session-scoped local Ray instance (num_cpus=2, bound to 127.0.0.1, no dashboard) is started on
first use; a test that builds its own cluster shuts it down and the next test starts it again.
``COLLIDE_CHAOS`` (see collide.cluster.session) is set before Ray starts, so every worker sees it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from collide.config import ClusterConfig, ExtractConfig, SearchConfig, StoreConfig
from collide.corpus import Prompt

if os.environ.get("COLLIDE_RAY_NETNS") != "1":
    pytest.skip("Ray tests run only inside a loopback-only network namespace; tests/test_cluster.py starts them",
                allow_module_level=True)
ray = pytest.importorskip("ray")

BOS = 256
QUIET = ExtractConfig(batch_tokens=512, max_batch_size=64, progress=False)
SEARCH = SearchConfig(block_rows=32, progress=False)  # small blocks: many tiles on a few hundred rows
CLUSTER = ClusterConfig(kind="ray", address=None, num_workers=2, cpus_per_worker=1, max_retries=3, panel_blocks=2)


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
    return {"model": {"name": "tiny", "source": "random:llama", "family": "llama"}, "corpus": {"name": "synthetic"},
            "n_prompts": n_prompts}


def store_cfg(shard_rows: int = 24) -> StoreConfig:
    return StoreConfig(shard_rows=shard_rows)


@pytest.fixture(scope="session")
def chaos_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chaos")
    os.environ["COLLIDE_CHAOS"] = str(path)
    return path


@pytest.fixture
def ray_local(chaos_dir):
    """The session's local Ray instance (started again if a test shut it down)."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray


def pytest_sessionfinish(session, exitstatus):
    if "ray" in globals() and ray.is_initialized():
        ray.shutdown()
