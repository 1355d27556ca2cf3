"""Quantized forwards (collide/quant.py): the quantizers against numpy, the hooks inside load_model, the
store identity, bad settings, and a collision that int4 activations create and the search certifies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from collide.config import ExtractConfig, ModelConfig, QuantConfig, SearchConfig, StoreConfig
from collide.errors import CollideError
from collide.quant import fake_quant, quantize_weight, quantized_linears, validate


def numpy_fake_quant(x: np.ndarray, bits: int, group: int | None = None) -> np.ndarray:
    """The reference: symmetric, scale = max|x| / (2^(bits-1) - 1) per row (or per group of a row), fp32."""
    Q = np.float32(2 ** (bits - 1) - 1)
    x = np.asarray(x, np.float32)
    out = np.empty_like(x)
    n = x.shape[-1]
    size = n if group is None else group
    for lo in range(0, n, size):
        g = x[..., lo:lo + size]
        scale = np.abs(g).max(axis=-1, keepdims=True) / Q
        safe = np.where(scale > 0, scale, np.float32(1))
        out[..., lo:lo + size] = np.clip(np.round(g / safe), -Q, Q) * safe  # np.round: half to even
    return out


def tiny(**quant) -> ModelConfig:
    return ModelConfig(name="tiny", source="random:llama", family="llama", quant=QuantConfig(**quant))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [None, 16, 24, 200])
def test_fake_quant_matches_numpy(bits, group):
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal((3, 5, 64)) * rng.uniform(0.01, 50, (3, 5, 1))).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero token stays zero
    x[1, 2, 7] = 300.0  # an outlier sets its token's (group's) scale
    x[2, 1, :3] = [0.5, 1.5, -2.5]  # exact ties are possible after scaling: round half to even on both sides
    got = fake_quant(torch.from_numpy(x), bits, group).numpy()
    np.testing.assert_array_equal(got, numpy_fake_quant(x, bits, group))
    assert (got[0, 0] == 0).all()


def test_fake_quant_grid_and_dtype():
    x = torch.randn(4, 48, dtype=torch.bfloat16)
    q = fake_quant(x, 4)
    assert q.dtype == torch.bfloat16 and q.shape == x.shape
    xf = torch.randn(6, 48)
    q = fake_quant(xf, 4)
    scale = xf.abs().amax(dim=-1, keepdim=True) / 7
    levels = q / scale
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= 7 + 1e-4


@pytest.mark.parametrize("input_dim", [1, 0])
def test_quantize_weight_groups_along_the_input_dimension(input_dim):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 40)).astype(np.float32)  # (out, in) for nn.Linear
    expect = numpy_fake_quant(w, 4, 16)
    if input_dim == 0:  # GPT-2's Conv1D keeps (in, out)
        got = quantize_weight(torch.from_numpy(w.T.copy()), 4, 16, input_dim=0).numpy().T
    else:
        got = quantize_weight(torch.from_numpy(w), 4, 16).numpy()
    np.testing.assert_array_equal(got, expect)


def test_load_model_quantizes_every_linear_input_and_weight():
    from collide.models import last_token_states, load_model

    lm = load_model(tiny(activations="int4", weights="int8", weight_group=32))
    layers = quantized_linears(lm.blocks)
    assert lm.quant["linear_layers"] == len(layers) == 4 * 7  # q, k, v, o, gate, up, down per block
    seen = []

    def check(module, args):  # registered after the quantizer: sees the quantized input
        x = args[0].float()
        scale = x.abs().amax(dim=-1, keepdim=True) / 7
        levels = x / torch.where(scale > 0, scale, torch.ones_like(scale))
        seen.append(float((levels - levels.round()).abs().max()))

    handles = [m.register_forward_pre_hook(check) for _, m, _ in layers]
    ids = torch.tensor([[256, 72, 105, 33]])
    last_token_states(lm, ids, torch.ones_like(ids), [lm.n_layers])
    for h in handles:
        h.remove()
    assert len(seen) == len(layers) and max(seen) < 1e-4
    for _, module, _ in layers:  # int8 weights: every group of 32 input channels is on its own grid
        w = module.weight.detach().reshape(module.weight.shape[0], -1, 32)
        scale = w.abs().amax(dim=-1, keepdim=True) / 127
        assert torch.allclose(w / scale, (w / scale).round(), atol=1e-3)


def test_quantized_states_do_not_depend_on_the_batch():
    from collide.models import last_token_states, load_model

    lm = load_model(tiny(activations="int8"))
    prompts = [[256, 10, 20, 30, 40, 50], [256, 7], [256, 99, 98, 97]]
    T = max(map(len, prompts))
    ids = torch.tensor([p + [257] * (T - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (T - len(p)) for p in prompts])
    batched = last_token_states(lm, ids, mask, [1, 4])
    for b, p in enumerate(prompts):
        one = torch.tensor([p])
        alone = last_token_states(lm, one, torch.ones_like(one), [1, 4])
        for k in (1, 4):
            torch.testing.assert_close(batched[k][b], alone[k][0], rtol=1e-5, atol=1e-5)


def test_store_identity_changes_with_quant_and_not_for_the_default(compose):
    from collide.store.identity import store_identity

    base = store_identity(compose(["model=tiny-random"]))
    assert "quant" not in base["model"]  # unquantized stores keep the identity they had before model.quant
    assert store_identity(compose(["model=tiny-random", "model.quant.activations=none"])) == base
    seen = [json.dumps(base, sort_keys=True)]
    for override in ("model.quant.activations=int8", "model.quant.activations=int4", "model.quant.weights=int4",
                     "model.quant.weights=int8"):
        identity = store_identity(compose(["model=tiny-random", override]))
        assert identity["model"]["quant"][override.split(".")[2].split("=")[0]] == override.split("=")[1]
        seen.append(json.dumps(identity, sort_keys=True))
    both = compose(["model=tiny-random", "model.quant.activations=int4", "model.quant.activation_granularity=group"])
    seen.append(json.dumps(store_identity(both), sort_keys=True))
    assert len(set(seen)) == len(seen)


@pytest.mark.parametrize("settings, fragment", [
    ({"backend": "bitsandbytes", "weights": "int8"}, "model.quant.backend=bitsandbytes"),
    ({"backend": "bitsandbytes", "activations": "int8", "weights": "int8"}, "model.quant.activations=none"),
    ({"backend": "bitsandbytes"}, "model.quant.weights=int8 or int4"),
    ({"activation_group": 0}, "model.quant.activation_group"),
    ({"weights": "int2"}, "model.quant.weights"),
])
def test_bad_quant_settings_are_one_line(settings, fragment):
    with pytest.raises(CollideError) as err:
        validate({**QuantConfig().__dict__, **settings}, "cpu")
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_bad_quant_value_fails_when_composed(compose):
    with pytest.raises(Exception) as err:
        compose(["model=tiny-random", "model.quant.activations=int3"])
    assert "int3" in str(err.value)


def test_int4_collision_is_reported_as_certified_at_distance_zero(tmp_path):
    """Two prompts that differ only in their second token, whose embedding rows hold the same values (multiples
    of 2^-10, so that every square and partial sum is exact in fp32) with two small ones swapped. Both rows have
    the same norm, hence the same per-token int4 scale, and both swapped values round to the same int4 level:
    every linear input of that position is bitwise identical at block 1, so the last-token states at layer 1
    are bitwise identical with int4 activations. In fp32 the swap is visible (L2 > 1e-6), and at layer 2 the
    residual stream carries it into the next scales."""
    from collide.config import ReportConfig
    from collide.corpus import Prompt
    from collide.extract import extract_to_store
    from collide.models import load_model
    from collide.report import write_report
    from collide.search import search_store

    a, b = 65, 66  # "A" and "B" in the byte tokenizer
    prompts = [(256, a, 104, 105, 33), (256, b, 104, 105, 33), (256, 120, 121, 122), (256, 72, 101, 121)]
    layers = [1, 2]
    distances, reports = {}, {}
    for level in ("none", "int4"):
        lm = load_model(tiny(activations=level))
        emb = lm.model.get_input_embeddings().weight
        with torch.no_grad():
            row = torch.round(emb[a] * 1024) / 1024
            order = torch.argsort(row.abs())
            j = int(order[0])
            k = int(next(i for i in order[1:] if row[i] != row[j]))
            emb[a] = row
            emb[b] = row
            emb[b, j], emb[b, k] = row[k], row[j]
        store = extract_to_store(
            lm, (Prompt(token_ids=p, source=f"t:{i}", text=f"text {i}: {p}") for i, p in enumerate(prompts)),
            layers, tmp_path / level, len(prompts), {"model": {"name": "tiny", "quant": level}},
            StoreConfig(shard_rows=16), ExtractConfig(batch_tokens=256, progress=False))
        results = [search_store(store, k, 1e-6, SearchConfig(progress=False)) for k in layers]
        distances[level] = [r.result.distance for r in results]
        run_info = {"model": {"name": "tiny", "source": "random:llama", "revision": None, "family": "llama",
                              "dtype": "fp32", "final_norm": "post", "n_layers": 4, "d": 64,
                              "quant": {**validate(tiny(activations=level).quant), "description": level}},
                    "corpus": {"name": "constructed"}, "n_prompts": len(prompts), "n_duplicates": 0,
                    "threshold": 1e-6, "layers": layers, "timings": {}, "store": str(store.path), "command": "test"}
        reports[level] = write_report(tmp_path / f"run-{level}", run_info, results, store, ReportConfig(figures=False))
    assert distances["none"][0] > 1e-6  # distinct in fp32: the collision is made by the quantization
    assert distances["int4"][0] == 0.0 and distances["int4"][1] > 1e-6
    first, second = reports["int4"]["layers"]
    assert first["certified"] and first["min_distance"] == 0.0 and first["n_collisions"] == 1
    assert first["collisions"] == [{"a": 0, "b": 1, "distance": 0.0}]
    assert first["diagnostics"]["separation_margin"] == 0.0
    assert first["diagnostics"]["co_lipschitz"]["min"] == 0.0 and first["diagnostics"]["co_lipschitz"]["pair"] == [0, 1]
    assert second["n_collisions"] == 0 and second["diagnostics"]["co_lipschitz"]["min"] > 0
    assert reports["int4"]["verdict"]["status"] == "collisions"
    assert reports["none"]["verdict"]["status"] == "no_collisions"
    assert reports["int4"]["quantization"]["collisions_are"] == "model"
    md = (tmp_path / "run-int4" / "report.md").read_text()
    assert "They are collisions of the model" in md and "text 0:" in md and "text 1:" in md


def test_epsilon_rule_widens_for_quantized_activations():
    from collide.invert.sipit import epsilon_rule

    base = epsilon_rule(100.0, 64, "fp32", "fp32")
    assert epsilon_rule(100.0, 64, "fp32", "fp32", "none") == base
    for level in ("int8", "int4"):
        assert epsilon_rule(100.0, 64, "fp32", "fp32", level) > base + 10.0  # the measured gaps are 0.1-1 x norm


@pytest.mark.parametrize("level", ["int8", "int4"])
def test_invert_recovers_prompts_from_quantized_states_and_reports_ties(level):
    """States written by a padded batched forward with quantized activations, recovered by cached single-token
    steps of the same quantized model (brute force over the tiny vocabulary): every token exact, and each
    position says which other tokens were also within ε (a list, possibly empty)."""
    from collide.invert.config import InvertConfig
    from collide.invert.sipit import Inverter
    from collide.models import all_token_states, load_model

    lm = load_model(tiny(activations=level))
    prompts = [[256, 72, 101, 108, 108, 111], [256, 33]]
    ids = torch.tensor([p + [257] * (6 - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (6 - len(p)) for p in prompts])
    states = all_token_states(lm, ids, mask, [2])[2][0].double().numpy()
    inverter = Inverter(lm, 2, InvertConfig(source="-", policy="random", batch=64), bos=256)
    results = inverter.invert(states)
    assert [r.token for r in results] == prompts[0]
    assert all(r.recovered and isinstance(r.ties, list) and r.token not in r.ties for r in results)
    from collide.invert.sipit import epsilon_rule

    norm = float(np.linalg.norm(states[1]))
    assert results[1].epsilon == pytest.approx(epsilon_rule(norm, 64, "fp32", "fp32", level))


def extract_tiny(lm, path, n: int, shard_rows: int, batch_tokens: int, max_batch_size: int):
    """A store of ``n`` synthetic prompts of 2 to 12 tokens (every layer) extracted by ``lm`` in the given batching."""
    from collide.corpus import Prompt
    from collide.extract import extract_to_store

    rng = np.random.default_rng(0)
    prompts = [[256, *rng.integers(0, 250, rng.integers(1, 12)).tolist()] for _ in range(n)]
    return extract_to_store(lm, (Prompt(token_ids=p, source=f"t:{i}", text=None) for i, p in enumerate(prompts)),
                            list(range(lm.n_layers + 1)), path, n, {"model": {"name": "tiny"}},
                            StoreConfig(shard_rows=shard_rows, keep_text=False),
                            ExtractConfig(batch_tokens=batch_tokens, max_batch_size=max_batch_size, progress=False))


def test_quantized_extraction_stores_each_prompts_own_forward():
    """With quantized activations a stored state is the prompt's forward alone, bitwise, whatever the batching."""
    import tempfile

    from collide.models import last_token_states, load_model

    lm = load_model(tiny(activations="int4"))
    with tempfile.TemporaryDirectory() as tmp:
        wide = extract_tiny(lm, f"{tmp}/wide", 40, 16, 512, 64)
        narrow = extract_tiny(lm, f"{tmp}/narrow", 40, 7, 24, 3)
        tokens = wide.prompts(["token_ids"]).column(0).to_pylist()
        for k in wide.layers:
            assert np.array_equal(wide.layer(k)[1], narrow.layer(k)[1])
        for pid in (0, 17, 39):
            one = torch.tensor([tokens[pid]])
            alone = last_token_states(lm, one, torch.ones_like(one), wide.layers)
            assert all(np.array_equal(wide.layer(k)[1][pid], alone[k][0].numpy()) for k in wide.layers)


@pytest.mark.slow
def test_smollm2_int8_states_are_equal_across_batchings(tmp_path, compose):
    """SmolLM2 with int8 activations: 48 real prompts extracted in wide and narrow batchings give bitwise-equal
    stores (a padded batch of them would not: docs/quantization.md, benchmarks/quant_batch_invariance.py)."""
    from collide.corpus import iter_prompts
    from collide.extract import extract_to_store
    from collide.models import load_model

    cfg = compose(["model=smollm2", "model.quant.activations=int8"])
    lm = load_model(cfg.model)
    stores = [extract_to_store(lm, iter_prompts(cfg.corpus, lm.tokenizer), [1, 15, 30], tmp_path / str(rows), 48,
                               {"model": {"name": "smollm2"}}, StoreConfig(shard_rows=rows, keep_text=False),
                               ExtractConfig(batch_tokens=budget, max_batch_size=size, progress=False))
              for rows, budget, size in ((48, 4096, 64), (5, 40, 2))]
    for k in (1, 15, 30):
        assert np.array_equal(stores[0].layer(k)[1], stores[1].layer(k)[1])


def test_noise_control_adds_a_seeded_gaussian_of_the_given_rms(tmp_path):
    from collide.models import load_model
    from collide.quant import noise_vector

    scales = [0.0, 0.5, 1.0, 2.0, 4.0]  # tiny-random llama: layers 0..4
    plain = extract_tiny(load_model(tiny()), tmp_path / "plain", 40, 16, 512, 64)
    noisy_lm = load_model(ModelConfig(name="tiny", source="random:llama", family="llama", noise="gaussian",
                                      noise_scale=scales))
    assert noisy_lm.noise == {"noise": "gaussian", "noise_scale": scales}
    noisy = extract_tiny(noisy_lm, tmp_path / "noisy", 40, 16, 512, 64)
    again = extract_tiny(noisy_lm, tmp_path / "again", 40, 7, 24, 3)  # another batching: the same noise per prompt
    tokens = plain.prompts(["token_ids"]).column(0).to_pylist()
    d = plain.d
    for k, scale in enumerate(scales):
        h, got = plain.layer(k)[1], noisy.layer(k)[1]
        z = np.stack([noise_vector(t, k, d) for t in tokens])
        assert np.array_equal(got, (h.astype(np.float64) + scale / np.sqrt(d) * z).astype(np.float32))
        rms = np.sqrt(np.mean(np.sum((got.astype(np.float64) - h) ** 2, axis=1)))
        assert rms == 0.0 if scale == 0 else abs(rms / scale - 1) < 0.1
        np.testing.assert_allclose(again.layer(k)[1], got, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(noise_vector(tokens[0], 1, d), noise_vector(tokens[0], 2, d))


@pytest.mark.parametrize("noise, scale, fragment", [
    ("gaussian", -1.0, "model.noise_scale=-1.0 must be finite numbers >= 0"),
    ("gaussian", 0.0, "not all 0"),
    ("gaussian", float("inf"), "must be finite"),
    ("gaussian", [1.0, 2.0], "model.noise_scale has 2 entries; this model has layers 0..4: give 5"),
    ("gaussian", "big", "must be finite numbers"),
    ("uniform", 1.0, "model.noise='uniform' is not supported"),
])
def test_bad_noise_settings_are_one_line(noise, scale, fragment):
    from collide.quant import noise_record

    with pytest.raises(CollideError) as err:
        noise_record(ModelConfig(name="tiny", noise=noise, noise_scale=scale), n_layers=4)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_noise_is_in_the_identity_only_when_set_and_every_position_is_refused(compose):
    from collide.store.identity import store_identity

    base = store_identity(compose(["model=tiny-random"]))
    assert "noise" not in base["model"] and "noise_scale" not in base["model"]
    assert store_identity(compose(["model=tiny-random", "model.noise_scale=3"])) == base  # ignored without noise
    one = store_identity(compose(["model=tiny-random", "model.noise=gaussian", "model.noise_scale=3"]))
    many = store_identity(compose(["model=tiny-random", "model.noise=gaussian", "model.noise_scale=[0,1,2,3,4]"]))
    assert one["model"]["noise_scale"] == 3 and many["model"]["noise_scale"] == [0, 1, 2, 3, 4] and one != many != base
    with pytest.raises(CollideError, match="not store.positions=all; set store.positions=last"):
        store_identity(compose(["model=tiny-random", "model.noise=gaussian", "model.noise_scale=1",
                                "store.positions=all"]))
