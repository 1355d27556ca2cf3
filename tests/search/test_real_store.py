"""On real SmolLM2 states (the shape benchmarks/real_store_search.py measures at 20,000 and 100,000 prompts):
the pruned search and the sampled nearest neighbours equal the brute force at every layer of the store."""

from __future__ import annotations

import numpy as np
import pytest

from collide.config import SearchConfig
from collide.search import prune as prune_mod, search_store


@pytest.fixture(scope="module")
def smollm2_states(tmp_path_factory):
    """800 distinct stdlib-docs prompts through SmolLM2, the last-token states of layers 2, 4 and 8."""
    from benchmarks.suite.common import smollm2, stdlib_prompts
    from collide.config import ExtractConfig, StoreConfig
    from collide.extract import extract_to_store

    lm = smollm2()
    return extract_to_store(lm, stdlib_prompts(lm, 1000), [2, 4, 8], tmp_path_factory.mktemp("smollm2") / "store",
                            800, {"test": "real_store"}, StoreConfig(shard_rows=256),
                            ExtractConfig(batch_tokens=2048, progress=False))


@pytest.mark.slow
@pytest.mark.parametrize("layer", [2, 4, 8])
def test_pruned_and_sampled_equal_brute_force_on_real_states(smollm2_states, layer, monkeypatch):
    monkeypatch.setattr(prune_mod, "TILE_ROWS", {"cpu": 64, "cuda": 64})  # many tile pairs at this size
    store = smollm2_states
    brute = search_store(store, layer, 1e-6, SearchConfig(progress=False, prune="off", nearest=True)).result
    pruned = search_store(store, layer, 1e-6, SearchConfig(progress=False, prune="pca", nearest=True)).result
    sampled = search_store(store, layer, 1e-6, SearchConfig(progress=False, prune="pca", nearest="auto",
                                                            nearest_cutoff=300, nearest_sample=200)).result
    minimum = search_store(store, layer, 1e-6, SearchConfig(progress=False, prune="pca", nearest=False)).result
    assert brute.certified and pruned.certified and sampled.certified and minimum.certified
    for r in (pruned, sampled, minimum):
        assert (r.distance, r.pair, r.n_collisions) == (brute.distance, brute.pair, brute.n_collisions)
        assert r.collisions == brute.collisions
    assert minimum.prune["tile_pairs_evaluated_fraction"] < 0.8  # tile pairs skipped whole
    np.testing.assert_array_equal(pruned.nn_distance, brute.nn_distance)
    np.testing.assert_array_equal(pruned.nn_index, brute.nn_index)
    rows = np.flatnonzero(sampled.nn_index >= 0)
    assert sampled.nearest["rows"] == "sample" and len(rows) == 200
    np.testing.assert_array_equal(sampled.nn_distance[rows], brute.nn_distance[rows])
    np.testing.assert_array_equal(sampled.nn_index[rows], brute.nn_index[rows])
    assert brute.distance > 1e-3  # distinct prompts stay apart in these contextual layers
