"""Ray tests: run only inside a loopback-only network namespace (tests/test_cluster.py starts them).

A session-scoped local Ray instance (num_cpus=2, bound to 127.0.0.1, no dashboard) is started on
first use; a test that builds its own cluster shuts it down and the next test starts it again.
``COLLIDE_CHAOS`` (see collide.cluster.session) is set before Ray starts, so every worker sees it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("COLLIDE_RAY_NETNS") != "1":
    pytest.skip("Ray tests run only inside a loopback-only network namespace; tests/test_cluster.py starts them",
                allow_module_level=True)
ray = pytest.importorskip("ray")

from .common import LAYERS, N, QUIET, STORE, identity, synthetic  # noqa: E402


@pytest.fixture(scope="session")
def chaos_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chaos")
    os.environ["COLLIDE_CHAOS"] = str(path)
    return path


@pytest.fixture
def ray_local(chaos_dir):
    """The session's local Ray instance (started again if a test shut it down)."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
    yield ray


@pytest.fixture(scope="session")
def local_store(tiny_llama, tmp_path_factory):
    """The N-prompt store made locally (extract_to_store): what every Ray extraction must reproduce."""
    from collide.extract import extract_to_store

    path = tmp_path_factory.mktemp("local") / "store"
    return extract_to_store(tiny_llama, synthetic(N + 40), LAYERS, path, N, identity(N), STORE, QUIET)


@pytest.fixture(scope="session")
def search_store_300(tiny_llama, tmp_path_factory):
    """300 prompts, layers 0-2, extracted locally: 10 blocks of 32 rows, 5 panels, 15 tiles with CLUSTER."""
    from collide.extract import extract_to_store

    path = tmp_path_factory.mktemp("search") / "store"
    return extract_to_store(tiny_llama, synthetic(400), LAYERS, path, 300, identity(300), STORE, QUIET)


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.ray)


def pytest_sessionfinish(session, exitstatus):
    if "ray" in globals() and ray.is_initialized():
        ray.shutdown()
