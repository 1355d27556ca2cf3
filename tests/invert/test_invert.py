"""collide.invert: exact recovery from every layer of tiny models, SOURCE formats, ε, noise, identical rows, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from collide.config import ModelConfig
from collide.invert.config import InvertConfig
from collide.errors import CollideError
from collide.cli import main as cli_main
from collide.invert.driver import invert_source as run
from collide.invert.sipit import Inverter, epsilon_rule
from collide.models import load_model

PROMPTS = [b"Injects", b"A cat.", b"zebra 4"]  # short: each position of a tiny model costs a step


def tiny_cfg(family: str, dtype: str = "fp32") -> ModelConfig:
    return ModelConfig(name=f"tiny-{family}", source=f"random:{family}", family=family, dtype=dtype)


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family: str, dtype: str = "fp32"):
        if (family, dtype) not in cache:
            cache[family, dtype] = load_model(tiny_cfg(family, dtype))
        return cache[family, dtype]

    return get


def token_ids(text: bytes) -> list[int]:
    return [256] + list(text)  # the byte tokenizer's BOS, then one token per byte


def plain_states(lm, ids: list[int]) -> list[np.ndarray]:
    """hidden_states of an unpadded plain-transformers forward, outside collide: [(T, d)] per layer."""
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return [h[0].float().numpy() for h in out.hidden_states]


def invert(lm, states, layer, **kw):
    cfg = InvertConfig(source="-", **{k: v for k, v in kw.items() if k in InvertConfig.__dataclass_fields__})
    extra = {k: v for k, v in kw.items() if k not in InvertConfig.__dataclass_fields__}
    return Inverter(lm, layer, cfg, bos=256, **extra).invert(states)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text"])
def test_every_layer_inverted_exactly(models, family):
    lm = models(family)
    ids = token_ids(PROMPTS[0])
    hidden = plain_states(lm, ids)
    for layer in range(lm.n_layers + 1):
        results = invert(lm, hidden[layer], layer, batch=320)  # one gradient step and one batched step per position
        assert [r.token for r in results] == ids, (family, layer)
        assert all(r.recovered and r.distance <= r.epsilon for r in results)
        assert results[0].known and results[0].tried == 1  # BOS verified, not searched
        # the accepted state is far closer than any other tried one: ratio well under 1e-2
        assert max(r.ratio for r in results if r.ratio is not None) < 1e-2, (family, layer)


def test_gradient_policy_explores_less_than_random(models):
    lm = models("llama")
    ids = token_ids(PROMPTS[1])
    states = plain_states(lm, ids)[lm.n_layers]
    grad = invert(lm, states, lm.n_layers, policy="gradient", batch=8)
    rand = invert(lm, states, lm.n_layers, policy="random", batch=8)
    assert [r.token for r in grad] == [r.token for r in rand] == ids
    assert sum(r.tried for r in grad) < sum(r.tried for r in rand)


def test_exhaustive_certifies_with_the_margin(models):
    lm = models("gpt2")
    ids = token_ids(PROMPTS[2])
    results = invert(lm, plain_states(lm, ids)[2], 2, policy="exhaustive", batch=128)
    assert [r.token for r in results] == ids
    for r in results:
        assert r.tried == 320  # every distinct input row, BOS included
        assert r.margin == r.best_rejected and r.margin > 2 * r.epsilon and r.certified


def test_epsilon_rule_is_relative_and_dtype_aware():
    assert epsilon_rule(100.0, 64, "fp32", "fp32") == pytest.approx(1e-4 * 100 + 2.0 ** -24 * 100 + 8e-6)
    assert epsilon_rule(100.0, 64, "bf16", "bf16") > 100 * epsilon_rule(100.0, 64, "fp32", "fp32")


def test_noise_below_epsilon_recovered_far_above_not_recovered(models):
    lm = models("llama")
    ids = token_ids(PROMPTS[0])
    clean = plain_states(lm, ids)[3]
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(clean.shape)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    eps = np.array([epsilon_rule(float(np.linalg.norm(h)), lm.d, "fp32", "fp32") for h in clean])
    small = (clean + 0.5 * eps[:, None] * direction).astype(np.float32)
    assert [r.token for r in invert(lm, small, 3)] == ids
    noisy = clean.copy()
    noisy[4] += 0.5 * np.linalg.norm(clean[4]) * direction[4]
    stopped = invert(lm, noisy, 3)
    assert len(stopped) == 5 and [r.token for r in stopped[:4]] == ids[:4]
    miss = stopped[4]
    assert not miss.recovered and miss.distance > miss.epsilon and miss.tried == 320  # the whole vocabulary
    went_on = Inverter(lm, 3, InvertConfig(source="-"), bos=256).invert(noisy, stop_on_miss=False)
    assert len(went_on) == len(ids) and not went_on[4].recovered and went_on[4].token == miss.token


def test_bf16_model(models):
    lm = models("llama", "bf16")
    ids = token_ids(PROMPTS[1])
    hidden = plain_states(lm, ids)
    for layer in (1, lm.n_layers):
        results = invert(lm, hidden[layer], layer, stored_dtype="bf16")
        assert [r.token for r in results] == ids, layer
        assert all(r.recovered for r in results)


def test_identical_embedding_rows_reported_as_a_group():
    lm = load_model(tiny_cfg("llama"))
    weight = lm.model.get_input_embeddings().weight
    weight.data[ord("z")] = weight.data[ord("a")]  # "z" is now indistinguishable from "a" (the first of the group)
    ids = token_ids(b"zap")
    results = invert(lm, plain_states(lm, ids)[2], 2)
    assert [r.token for r in results] == token_ids(b"aap")
    assert results[1].group == [ord("a"), ord("z")] and all(r.recovered for r in results)
    assert results[2].group == [ord("a"), ord("z")] and results[3].group == [ord("p")]


# --------------------------------------------------------------------------- the command


def write_states(tmp_path, lm, layer, texts=PROMPTS[:2]):
    """Equal-length prompts' states at ``layer`` as an (N, T, d) .npy, as plain transformers gives them."""
    n = min(len(t) for t in texts)
    ids = [token_ids(t[:n]) for t in texts]
    states = np.stack([plain_states(lm, i)[layer] for i in ids])
    path = tmp_path / "states.npy"
    np.save(path, states)
    return path, ids


def test_npy_source_inverted_and_written(models, tmp_path):
    lm = models("gpt2")
    path, ids = write_states(tmp_path, lm, 3)
    doc = run(InvertConfig(source=str(path), model=tiny_cfg("gpt2"), layer=3, out=str(tmp_path / "out"),
                           progress=False))
    assert [p["recovered_ids"] for p in doc["prompts"]] == ids
    assert [p["key"] for p in doc["prompts"]] == ["0", "1"]
    assert doc["summary"]["n_recovered"] == sum(len(i) for i in ids) and doc["summary"]["token_accuracy"] is None
    on_disk = json.loads((tmp_path / "out" / "inversion.json").read_text())
    assert on_disk["prompts"] == doc["prompts"] and on_disk["layer"] == 3 and "epsilon_rule" in on_disk
    assert "every position verified" in (tmp_path / "out" / "inversion.md").read_text()


def test_safetensors_and_parquet_sources_match_npy(models, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.numpy import save_file

    from collide.invert.sources import open_source

    lm = models("llama")
    path, _ = write_states(tmp_path, lm, 2)
    states = np.load(path)
    save_file({f"p{i}": s for i, s in enumerate(states)} | {"p10": states[0]}, str(tmp_path / "s.safetensors"))
    pq.write_table(pa.table({"states": [s.tolist() for s in states]}), tmp_path / "rows.parquet")
    pq.write_table(pa.table({"prompt_id": np.repeat([7, 3], states.shape[1]),
                             "position": np.tile(np.arange(states.shape[1]), 2),
                             "state": [r.tolist() for r in states.reshape(-1, lm.d)]}), tmp_path / "pos.parquet")
    got = [t.states for t in open_source(str(tmp_path / "s.safetensors"), None).targets()]
    assert len(got) == 3 and all(np.array_equal(a, b) for a, b in zip(got, [states[0], states[1], states[0]]))
    keys = [t.key for t in open_source(str(tmp_path / "s.safetensors"), None).targets()]
    assert keys == ["p0", "p1", "p10"]  # natural order of the names
    rows = [t.states for t in open_source(str(tmp_path / "rows.parquet"), None).targets()]
    assert all(np.array_equal(a, b) for a, b in zip(rows, states))
    by_position = list(open_source(str(tmp_path / "pos.parquet"), None).targets())
    assert [t.key for t in by_position] == ["3", "7"] and np.array_equal(by_position[0].states, states[1])


def test_resume_keeps_finished_prompts(models, tmp_path):
    lm = models("llama")
    path, ids = write_states(tmp_path, lm, 4, PROMPTS)
    out = tmp_path / "out"
    cfg = dict(source=str(path), model=tiny_cfg("llama"), layer=4, out=str(out), progress=False)
    first = run(InvertConfig(**cfg, n_prompts=1))  # an inversion stopped after its first prompt
    assert first["summary"]["n_done"] == 1 and first["summary"]["n_prompts"] == 1
    resumed = run(InvertConfig(**cfg))
    assert resumed["prompts"][0] == first["prompts"][0]  # kept as written, timings included
    assert [p["recovered_ids"] for p in resumed["prompts"]] == ids
    with pytest.raises(CollideError, match="different"):
        run(InvertConfig(**cfg | {"layer": 3}))


@pytest.mark.parametrize("bad, match", [
    ("width", "width 48 but model"), ("layer", "out of range"), ("nan", "NaN or Inf"), ("empty", "empty"),
    ("nomatch", "match no layer"), ("nomodel", "model=<name>")])
def test_bad_input_is_one_line(models, tmp_path, bad, match):
    lm = models("llama")
    states = plain_states(models("gpt2") if bad == "nomatch" else lm, token_ids(b"abc"))[1]  # nomatch: another model's
    layer = {"layer": 99}.get(bad, 1)
    if bad == "width":
        states = states[:, :48]
    if bad == "nan":
        states[2, 5] = np.nan
    path = tmp_path / "s.npy"
    if bad == "empty":
        path.write_bytes(b"")
    else:
        np.save(path, states)
    cfg = InvertConfig(source=str(path), model=None if bad == "nomodel" else tiny_cfg("llama"),
                       layer="auto" if bad == "nomatch" else layer, out=str(tmp_path / "out"), progress=False)
    with pytest.raises(CollideError, match=match) as info:
        run(cfg)
    assert "\n" not in str(info.value)


def test_main_prints_one_line_errors(tmp_path, capsys):
    assert cli_main(["invert", str(tmp_path / "missing.npy"), "model=tiny-random", "layer=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("collide: error: SOURCE") and err.count("\n") == 1


def test_paper_baseline_recovers_the_same_prefix(models):
    from benchmarks.suite.paper_sipit import invert_prompt

    lm = models("gpt2")
    ids = token_ids(b"ab")
    results = invert_prompt(lm, plain_states(lm, ids)[4], 4)
    assert [r.token for r in results] == ids and all(1 <= r.proposals <= 320 for r in results)


def write_store(path, lm, texts, layers, positions="all"):
    """A complete collide store of ``texts`` (byte-tokenized) with the tiny model's states at ``layers``."""
    from dataclasses import asdict

    from collide.store import StoreWriter, prompt_table

    ids = [token_ids(t) for t in texts]
    every = {k: [plain_states(lm, i)[k] for i in ids] for k in layers}
    model = asdict(tiny_cfg("llama"))
    header = dict(model=model, dtype="fp32", positions=positions, final_norm="post", layer_convention="t",
                  layers=layers, d=lm.d, keep_text=False, n_prompts=len(ids), n_layers=lm.n_layers,
                  shard_rows=128, batch_tokens=64, max_batch_size=8)
    writer = StoreWriter.open(path, {"model": model}, header)
    last = {k: np.stack([s[-1] for s in every[k]]) for k in layers}
    full = {k: np.concatenate(every[k]) for k in layers} if positions == "all" else None
    writer.commit_shard(prompt_table(0, ids, ["s"] * len(ids)), last, positions=full)
    writer.finish()
    return ids


def test_store_source_scored_against_its_true_tokens(models, tmp_path):
    lm = models("llama")
    ids = write_store(tmp_path / "store", lm, [b"abc", b"Zq!"], [1, 4])
    doc = run(InvertConfig(source=str(tmp_path / "store"), out=str(tmp_path / "out"), progress=False))
    assert doc["layer"] == 4 and doc["model"]["source"] == "random:llama"  # the store's deepest layer and model
    assert [p["recovered_ids"] for p in doc["prompts"]] == ids and all(p["exact"] for p in doc["prompts"])
    assert doc["summary"]["token_accuracy"] == 1.0 and doc["summary"]["exact_prompts"] == 2
    assert "2 of 2 recovered exactly" in (tmp_path / "out" / "inversion.md").read_text()
    write_store(tmp_path / "last", lm, [b"abc"], [1], positions="last")
    with pytest.raises(CollideError, match="positions=all"):
        run(InvertConfig(source=str(tmp_path / "last"), out=str(tmp_path / "out2"), progress=False))


@pytest.mark.slow
def test_real_smollm2_prompts_inverted_exactly(compose):
    """The embedded SmolLM2 (Q4_1 rows: 11 duplicates), two stdlib-docs windows cut to 3 tokens, layer L/4.

    The random policy with large batches (about half the vocabulary per position): the brute-force
    baseline, so this test depends on no ranker. The default policy: test_rankers.py."""
    from collide.corpus import iter_prompts, load_corpus_config

    lm = load_model(compose(["model=smollm2"]).model)
    corpus = load_corpus_config("stdlib-docs")
    prompts = [list(p.token_ids)[:3] for _, p in zip(range(2), iter_prompts(corpus, lm.tokenizer))]
    layer = lm.n_layers // 4
    for ids in prompts:
        results = Inverter(lm, layer, InvertConfig(source="-", policy="random", batch=1024)).invert(
            plain_states(lm, ids)[layer])
        assert all(r.recovered and t in r.group for r, t in zip(results, ids)) and len(results) == len(ids)
