"""The certified search on Ray equals the local search: minimum, pair, collisions, every nn distance, certified."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from collide.cluster import search_store_ray
from collide.extract import extract_to_store
from collide.search import search_store
from .conftest import CLUSTER, QUIET, SEARCH, identity, store_cfg, synthetic


@pytest.fixture(scope="module")
def store(tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("search") / "store"
    return extract_to_store(tiny_llama, synthetic(400), [0, 1, 2], path, 300, identity(300), store_cfg(), QUIET)


def assert_same(local, remote):
    a, b = local.result, remote.result
    assert np.array_equal(local.prompt_ids, remote.prompt_ids)
    assert (a.distance, a.pair, a.certified, a.n_pairs, a.invalid_rows) == \
        (b.distance, b.pair, b.certified, b.n_pairs, b.invalid_rows)
    assert a.collisions == b.collisions and a.n_collisions == b.n_collisions
    assert np.array_equal(a.nn_distance, b.nn_distance, equal_nan=True)


@pytest.mark.parametrize("layer", [0, 2])
def test_ray_search_equals_local(ray_local, store, layer):
    local = search_store(store, layer, 1e-6, SEARCH)
    remote = search_store_ray(store, layer, 1e-6, SEARCH, CLUSTER)
    assert_same(local, remote)
    if layer == 0:  # prompts that end in the same byte have equal layer-0 states
        assert local.result.n_collisions > 10 and local.result.distance == 0.0
    else:
        assert local.result.n_collisions == 0 and local.result.distance > 0


def test_ray_search_of_a_view_with_one_panel(ray_local, store):
    view = store.select(100)
    one_panel = dataclasses.replace(CLUSTER, panel_blocks=64)
    assert_same(search_store(view, 1, 1e-6, SEARCH), search_store_ray(view, 1, 1e-6, SEARCH, one_panel))
