"""Lens bundles are checked before use: a damaged or non-finite bundle is refused in one line and refit only with
lens.refit=true; the location is checked before a fit; the quantized forward is part of the identity."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from collide import digests
from collide.config import ModelConfig, QuantConfig
from collide.invert.config import LensConfig
from collide.errors import CollideError
from collide.invert import lens as lens_mod
from collide.models import load_model


@pytest.fixture(scope="module")
def llama():
    return load_model(ModelConfig(name="tiny-llama", source="random:llama", family="llama"))


def small_lens(root, **kw) -> LensConfig:
    return LensConfig(root=str(root), n_prompts=16, n_prefixes=4, progress=False, **kw)


def tensors_of(lens) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lens_mod._tensors(lens).items()}


def damage(path, how: str) -> None:
    weights, meta = path / lens_mod.TENSORS, path / lens_mod.META
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "flipped":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    elif how == "bad json":
        meta.write_text(meta.read_text()[:50])
    else:  # NaN weights, recorded as written: a bundle an older collide saved without checking
        t = {k: v.clone() for k, v in load_file(str(weights)).items()}
        t["own.weight"][3, 5] = float("nan")
        save_file(t, str(weights))
        doc = json.loads(meta.read_text())
        doc[lens_mod.TENSORS] = {"sha256": digests.sha256_file(weights), "bytes": weights.stat().st_size}
        meta.write_text(json.dumps(doc))


@pytest.mark.parametrize("how, why", [("truncated", "lens.safetensors has 1000 bytes where"),
                                      ("flipped", "lens.safetensors does not match its recorded sha256"),
                                      ("bad json", "lens.json is not valid JSON"),
                                      ("nan", "own.weight hold NaN or Inf")])
def test_a_damaged_bundle_is_refused_in_one_line_and_refit_on_request(llama, tmp_path, how, why):
    cfg = small_lens(tmp_path)
    fitted = lens_mod.load_or_fit(llama, 2, cfg, [256])
    want = tensors_of(fitted)
    damage(fitted.path, how)
    with pytest.raises(CollideError) as refused:
        lens_mod.load_or_fit(llama, 2, cfg, [256])
    message = str(refused.value)
    assert why in message and "lens.refit=true" in message and str(fitted.path) in message and "\n" not in message
    refit = lens_mod.load_or_fit(llama, 2, small_lens(tmp_path, refit=True), [256])
    assert refit.path == fitted.path
    again = lens_mod.load_or_fit(llama, 2, cfg, [256])  # the replaced bundle is read back
    for lens in (refit, again):
        assert all(torch.equal(lens_mod._tensors(lens)[name], tensor) for name, tensor in want.items())


def test_a_bundle_is_read_back_whole_and_hashed_once(llama, tmp_path, monkeypatch):
    cfg = small_lens(tmp_path)
    want = tensors_of(lens_mod.load_or_fit(llama, 3, cfg, [256]))
    reads = []
    monkeypatch.setattr(digests, "sha256_file", lambda path: reads.append(path))
    for _ in range(2):
        loaded = lens_mod.load_or_fit(llama, 3, cfg, [256])
        assert sorted(lens_mod._tensors(loaded)) == sorted(want)
        assert all(torch.equal(lens_mod._tensors(loaded)[k], v) for k, v in want.items())
    assert reads == []  # its digest was taken as it was written
    assert loaded.table.shape == (320, llama.d) and loaded.table_tokens.tolist() == list(range(320))


def test_weights_that_are_not_finite_are_never_written(llama, tmp_path):
    fitted = lens_mod.fit(llama, 1, small_lens(tmp_path), [256])
    fitted.cont.mean_y[0] = float("inf")
    with pytest.raises(CollideError, match=r"not finite \(cont.mean_y\); nothing was written"):
        lens_mod.save(fitted, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("where", ["root", "under root", "path"])
def test_a_location_that_is_a_file_is_refused_before_the_fit(llama, tmp_path, monkeypatch, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    cfg = {"root": small_lens(blocker), "under root": small_lens(blocker / "lenses"),
           "path": small_lens(tmp_path, path=str(blocker))}[where]
    monkeypatch.setattr(lens_mod, "fit", lambda *a, **k: pytest.fail("the fit started"))
    setting = "lens.path" if where == "path" else "lens.root"
    with pytest.raises(CollideError, match=f"{setting}=.* cannot hold lens bundles: .*a-file is a file, not a "
                                           f"directory; set {setting} to a directory"):
        lens_mod.load_or_fit(llama, 2, cfg, [256])


def test_the_quantized_forward_is_part_of_the_identity_only_when_it_quantizes(llama, tmp_path):
    cfg = small_lens(tmp_path)
    plain = lens_mod.lens_identity(llama, 2, cfg, [256])
    assert set(plain["model"]) == {"name", "source", "revision", "dtype", "weights"}  # as before quantization
    base = dict(name="tiny-llama", source="random:llama", family="llama")
    default_quant = load_model(ModelConfig(**base, quant=QuantConfig()))
    assert lens_mod.lens_identity(default_quant, 2, cfg, [256]) == plain
    int8 = lens_mod.lens_identity(load_model(ModelConfig(**base, quant=QuantConfig(activations="int8"))), 2, cfg, [256])
    assert int8["model"]["weights"] == plain["model"]["weights"]  # same weights: only the quant key tells them apart
    assert int8["model"]["quant"]["activations"] == "int8" and int8["model"]["quant"]["weights"] == "none"
    int4 = lens_mod.lens_identity(load_model(ModelConfig(**base, quant=QuantConfig(activations="int4"))), 2, cfg, [256])
    locations = {lens_mod.lens_location(i, cfg) for i in (plain, int8, int4)}
    assert len(locations) == 3
