"""The certified search on Ray equals the local search: minimum, pair, collisions, every nn distance, certified."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from collide.cluster import search_store_ray
from collide.search import search_store

from .common import CLUSTER, SEARCH, assert_same


@pytest.mark.parametrize("layer", [0, 2])
def test_ray_search_equals_local(ray_local, search_store_300, layer):
    local = search_store(search_store_300, layer, 1e-6, SEARCH)
    remote = search_store_ray(search_store_300, layer, 1e-6, SEARCH, CLUSTER)
    assert_same(local, remote)
    if layer == 0:  # prompts that end in the same byte have equal layer-0 states
        assert local.result.n_collisions > 10 and local.result.distance == 0.0
    else:
        assert local.result.n_collisions == 0 and local.result.distance > 0


def test_ray_search_of_a_view_with_one_panel(ray_local, search_store_300):
    view = search_store_300.select(100)
    one_panel = dataclasses.replace(CLUSTER, panel_blocks=64)
    assert_same(search_store(view, 1, 1e-6, SEARCH), search_store_ray(view, 1, 1e-6, SEARCH, one_panel))


def test_ray_search_without_nearest_equals_local(ray_local, search_store_300):
    no_nn = dataclasses.replace(SEARCH, nearest=False)
    local = search_store(search_store_300, 1, 1e-6, no_nn)
    assert_same(local, search_store_ray(search_store_300, 1, 1e-6, no_nn, CLUSTER))
    assert np.isnan(local.result.nn_distance).all() and local.result.distance > 0


def test_address_auto_starts_a_local_instance_when_no_cluster_runs(chaos_dir, caplog):
    """cluster.address=auto: no `ray start` cluster runs in the namespace, so a local instance is started."""
    import ray

    from collide.cluster.session import join

    if ray.is_initialized():
        ray.shutdown()
    with caplog.at_level("INFO", logger="collide.cluster.session"):
        join(dataclasses.replace(CLUSTER, address="auto"))
    try:
        assert ray.is_initialized()
        assert "no running Ray cluster found, started a local Ray instance" in caplog.text
    finally:
        ray.shutdown()
