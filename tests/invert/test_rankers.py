"""Ranked policies of collide.invert: a ranker changes the order, never the result; the lens cache's key."""

from __future__ import annotations

import pytest
import torch

from collide.config import ModelConfig
from collide.invert.config import InvertConfig, LensConfig
from collide.invert import lens as lens_mod
from collide.invert import rankers
from collide.invert.sipit import Inverter
from collide.models import load_model


@pytest.fixture(scope="module")
def llama():
    return load_model(ModelConfig(name="tiny-llama", source="random:llama", family="llama"))


def states(lm, ids, layer):
    with torch.no_grad():
        return lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0].numpy()


def small_lens(root, **kw) -> LensConfig:
    return LensConfig(root=str(root), n_prompts=16, n_prefixes=4, progress=False, **kw)


@pytest.mark.parametrize("policy", ["auto", "prior", "lens", "exhaustive"])
def test_ranker_never_changes_the_result(llama, tmp_path, policy):
    ids = [256] + list(b"Rank me")
    target = states(llama, ids, 3)
    ranked = Inverter(llama, 3, InvertConfig(source="-", policy=policy, lens=small_lens(tmp_path)), bos=256).invert(target)
    plain = Inverter(llama, 3, InvertConfig(source="-", policy="random", batch=320), bos=256).invert(target)
    assert [r.token for r in ranked] == [r.token for r in plain] == ids
    assert [r.group for r in ranked] == [r.group for r in plain]
    assert all(r.recovered for r in ranked)
    # the same state of the same token, verified in another batch: equal up to reassociation round-off
    # (both are round-off themselves, about 1e-7 here: a thousandth of ε and less)
    for a, b in zip(ranked, plain):
        assert a.distance == pytest.approx(b.distance, rel=1e-5, abs=1e-3 * a.epsilon)
        assert a.epsilon == b.epsilon
    if policy == "exhaustive":
        assert all(r.tried == 320 and r.certified for r in ranked)
        assert plain[1].tried == 320  # one batch holds the whole tiny vocabulary: its best rejected is Δ
        assert ranked[1].margin == pytest.approx(plain[1].best_rejected, rel=1e-5)
    else:
        assert ranked[1].tried == 1  # the table's position: one lookup, one verification


def test_exhaustive_table_margin_matches_the_full_sweep(llama, tmp_path):
    ids = [256] + list(b"ok")
    target = states(llama, ids, 2)
    cfg = InvertConfig(source="-", policy="exhaustive", lens=small_lens(tmp_path))
    inverter = Inverter(llama, 2, cfg, bos=256)
    fast = inverter.invert(target)
    inverter.lens = None  # no table: every candidate verified through the engine
    slow = inverter.invert(target)
    assert [r.token for r in fast] == [r.token for r in slow] == ids
    assert fast[1].margin == pytest.approx(slow[1].margin, rel=1e-5) and fast[1].certified == slow[1].certified


def test_merge_takes_turns_without_repeats():
    a, b = torch.tensor([3, 1, 0, 2]), torch.tensor([3, 2, 1, 0])
    none = torch.zeros(4, dtype=torch.bool)
    assert list(rankers.merge([a, b], none)) == [3, 2, 1, 0]
    assert list(rankers.merge([a, b], torch.tensor([False, False, True, False]))) == [3, 1, 0]  # tried: skipped
    assert list(rankers.merge([a], none)) == [3, 1, 0, 2]
    assert [len(x) for x in rankers.batches(iter(range(100)), 4, 32)] == [4, 16, 32, 32, 16]


def test_lens_cache_is_keyed_by_model_layer_and_norm(llama, tmp_path):
    cfg = small_lens(tmp_path)
    first = lens_mod.load_or_fit(llama, 2, cfg, [256])
    assert first.path is not None and (first.path / lens_mod.META).is_file()
    again = lens_mod.load_or_fit(llama, 2, cfg, [256])
    assert again.path == first.path and torch.equal(again.table, first.table)  # read back, not refit
    other_layer = lens_mod.load_or_fit(llama, 3, cfg, [256])
    assert other_layer.path != first.path and not torch.equal(other_layer.table, first.table)
    other = load_model(ModelConfig(name="tiny-llama", source="random:llama", family="llama", seed=1))
    other_model = lens_mod.load_or_fit(other, 2, cfg, [256])  # same name, other weights: refit
    assert other_model.path != first.path and not torch.equal(other_model.table, first.table)
    llama.final_norm = "pre"
    try:
        assert lens_mod.lens_location(lens_mod.lens_identity(llama, 2, cfg, [256]), cfg) != first.path
    finally:
        llama.final_norm = "post"
    assert len(list(tmp_path.iterdir())) == 3 and not list(tmp_path.rglob("*.tmp"))  # whole bundles only


def test_lens_path_of_another_identity_is_refused(llama, tmp_path):
    from collide.errors import CollideError

    lens_mod.load_or_fit(llama, 2, small_lens(tmp_path, path=str(tmp_path / "mine")), [256])
    with pytest.raises(CollideError, match="another model, layer"):
        lens_mod.load_or_fit(llama, 1, small_lens(tmp_path, path=str(tmp_path / "mine")), [256])


@pytest.mark.slow
def test_real_smollm2_prose_inverted_at_half_depth(compose):
    """The embedded SmolLM2 at L/2, default policy (auto), two 20-token prose prompts no lens was fit on
    (stdlib module docstrings, benchmarks/suite/invert_texts.py). Fits the lens on first use (minutes)."""
    from benchmarks.suite.invert_texts import prose_prompts

    lm = load_model(compose(["model=smollm2"]).model)
    layer = lm.n_layers // 2
    inverter = Inverter(lm, layer, InvertConfig(source="-"))
    for ids, _ in prose_prompts(lm.tokenizer, 2):
        results = inverter.invert(states(lm, ids, layer))
        assert len(results) == len(ids) and all(r.recovered and t in r.group for r, t in zip(results, ids))
        assert sum(r.tried for r in results) / len(results) < 1000  # about 8% of the vocabulary before


def test_linearized_order_ranks_the_token_whose_state_it_linearizes_at(llama):
    """Around a token's own row the first-order prediction is exact there: that token comes first. Around a point
    a quarter of the way to another row it still ranks the true token near the top of 320."""
    from collide.continuations import GrowingPrefix

    prefix = GrowingPrefix(llama)
    for token in [256] + list(b"Line"):
        prefix.append(token)
    rows = llama.model.get_input_embeddings().weight.detach().float()
    target = llama_state(llama, [256] + list(b"Linea"), 2)
    assert int(rankers.linearized_order(prefix, 2, rows[ord("a")], target, rows)[0]) == ord("a")
    moved = rows[ord("a")] + 0.25 * (rows[ord("q")] - rows[ord("a")])
    order = rankers.linearized_order(prefix, 2, moved, target, rows)
    assert int((order == ord("a")).nonzero()[0]) < 5


def llama_state(lm, ids, layer) -> torch.Tensor:
    return torch.from_numpy(states(lm, ids, layer)[-1]).double()


def test_auto_policy_linearizes_after_the_first_candidates_fail(llama, tmp_path, monkeypatch):
    """With the threshold lowered under the tiny vocabulary, positions the first batch misses call the linearized
    ranking; the result is the same tokens."""
    from collide.invert import sipit

    calls = []
    real = rankers.linearized_order
    monkeypatch.setattr(sipit, "LINEARIZE_AFTER", 2)
    monkeypatch.setattr(rankers, "linearized_order", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = [256] + list(b"Rank me")
    cfg = InvertConfig(source="-", batch_first=2, lens=small_lens(tmp_path))
    results = Inverter(llama, 3, cfg, bos=256).invert(states(llama, ids, 3))
    assert [r.token for r in results] == ids and calls
