"""collide audit: which layers give back the text; and invert's bad inputs refused before the model loads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from collide.cli import main as cli_main
from collide.invert.config import InvertConfig, LensConfig
from collide.errors import CollideError
from collide.invert import driver
from collide.invert.audit import audit_source, choose_layers, sample
from collide.invert.config import AuditConfig
from collide.models import load_model
from tests.invert.test_invert import plain_states, tiny_cfg, token_ids, write_store

TEXTS = [b"abc", b"Zq!", b"hello", b"world", b"xyz"]


@pytest.fixture(scope="module")
def llama():
    return load_model(tiny_cfg("llama"))


@pytest.fixture(scope="module")
def store(llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("audit") / "store"
    write_store(path, llama, TEXTS, [0, 1, 2, 3, 4])
    return path


def audit_cfg(store, tmp_path, **kw) -> AuditConfig:
    lens = LensConfig(root=str(tmp_path / "lenses"), n_prompts=16, n_prefixes=4, progress=False)
    return AuditConfig(source=str(store), out=str(tmp_path / "audit"), n_prompts=3, lens=lens, **kw)


def test_auto_layers_spread_over_the_stored_ones():
    assert choose_layers("auto", list(range(31))) == [1, 8, 15, 23, 30]
    assert choose_layers("auto", [0, 2, 4]) == [2, 4] and choose_layers("auto", [0]) == [0]
    assert choose_layers("1:3", [0, 1, 2, 3, 4]) == [1, 2, 3]
    assert sample(5, 3, 0) == sorted(sample(5, 3, 0)) and len(set(sample(5, 3, 0))) == 3
    with pytest.raises(CollideError, match="n_prompts=0"):
        sample(5, 0, 0)


def test_audit_of_a_store(store, tmp_path):
    doc = audit_source(audit_cfg(store, tmp_path), "collide audit")
    assert [e["layer"] for e in doc["layers"]] == [1, 2, 3, 4] and len(doc["prompt_keys"]) == 3
    for e in doc["layers"]:
        assert e["status"] == "done" and e["exact_prompts"] == 3 and e["missed_positions"] == 0
        assert e["recovered_positions"] == e["n_positions"] and e["wrong_recovered"] == 0
        assert e["examples"][0]["recovered_text"] == e["examples"][0]["true_text"]
    assert doc["verdict"].startswith("Layers 1–4 give back the exact text of 3/3 sampled prompts in")
    out = tmp_path / "audit"
    assert json.loads((out / "audit.json").read_text())["verdict"] == doc["verdict"]
    assert "| 1 | done | 3 / 3 of 3 |" in (out / "audit.md").read_text() and (out / "figures" / "audit.png").is_file()
    first = json.loads((out / "L2" / "inversion.json").read_text())
    again = audit_source(audit_cfg(store, tmp_path), "collide audit")  # resumes: nothing inverted again
    assert json.loads((out / "L2" / "inversion.json").read_text())["prompts"] == first["prompts"]
    assert again["verdict"] == doc["verdict"]


def test_budget_reports_unfinished_layers(store, tmp_path):
    audit_source(audit_cfg(store, tmp_path, layers=[1]))
    doc = audit_source(audit_cfg(store, tmp_path, layers=[1, 3], budget_s=0.0))
    assert [(e["layer"], e["status"]) for e in doc["layers"]] == [(1, "done"), (3, "not started")]
    assert "layer 3 was not started within the 0 s budget" in doc["verdict"]
    assert doc["verdict"].startswith("Layer 1 gives back the exact text of 3/3")


def test_audit_of_a_dump_finds_its_layer(llama, tmp_path):
    n = min(len(t) for t in TEXTS)
    np.save(tmp_path / "dump.npy", np.stack([plain_states(llama, token_ids(t[:n]))[3] for t in TEXTS]))
    cfg = audit_cfg(tmp_path / "dump.npy", tmp_path, model=tiny_cfg("llama"), policy="random")
    doc = audit_source(cfg)
    assert [e["layer"] for e in doc["layers"]] == [3] and doc["layers"][0]["location"]["layer"] == 3
    assert doc["layers"][0]["complete_prompts"] == 3 and doc["layers"][0]["exact_prompts"] is None
    assert doc["verdict"].startswith("Layer 3 gives back a complete text (every position within ε) of 3/3")


def test_audit_command(store, tmp_path, capsys):
    assert cli_main(["audit", str(store), "n_prompts=2", "layers=[2]", f"out={tmp_path / 'a'}",
                     f"lens.root={tmp_path / 'lenses'}", "lens.n_prompts=16", "lens.n_prefixes=4"]) == 0
    assert "Layer 2 gives back the exact text of 2/2" in capsys.readouterr().out


# --------------------------------------------------------------------------- bad inputs of invert, before any load


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*_):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(driver, "load", refuse)


def test_bad_inputs_refused_before_the_model_loads(llama, tmp_path, no_model):
    from safetensors.numpy import save_file

    states = plain_states(llama, token_ids(b"abcd"))[1]
    np.save(tmp_path / "ok.npy", states)
    base = dict(model=tiny_cfg("llama"), layer=1, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CollideError, match="existing file, not a directory"):
        driver.invert_source(InvertConfig(source=str(tmp_path / "ok.npy"), out=str(tmp_path / "file"), **base))
    with pytest.raises(CollideError, match="n_prompts=0 inverts nothing"):
        driver.invert_source(InvertConfig(source=str(tmp_path / "ok.npy"), n_prompts=0, **base))
    save_file({"p0": states, "p1": states, "p2": states[:, :40]}, str(tmp_path / "s.safetensors"))
    with pytest.raises(CollideError, match="'p2' has shape \\[5, 40\\]"):
        driver.invert_source(InvertConfig(source=str(tmp_path / "s.safetensors"), **base))
    nan = np.stack([states, states])
    nan[1, 3, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(CollideError, match="prompt 1 has NaN or Inf in the states at positions \\[3\\]"):
        driver.invert_source(InvertConfig(source=str(tmp_path / "nan.npy"), **base))
    with pytest.raises(CollideError, match="epsilon='wide' is not a positive L2 radius"):
        driver.invert_source(InvertConfig(source=str(tmp_path / "ok.npy"), epsilon="wide", **base))
    np.save(tmp_path / "ints.npy", np.zeros((3, 4), dtype=np.int32))
    with pytest.raises(CollideError, match="int32 values, not floating-point"):
        driver.invert_source(InvertConfig(source=str(tmp_path / "ints.npy"), **base))


def test_invert_command_errors_are_one_line(tmp_path, capsys):
    np.save(tmp_path / "s.npy", np.zeros((3, 64), dtype=np.float32))
    (tmp_path / "file").write_text("x")
    for args, says in ((["model=nosuch"], "unknown model 'nosuch'"), (["n_prompts=0", "model=tiny-random"], "n_prompts=0"),
                       ([f"out={tmp_path / 'file'}", "model=tiny-random"], "existing file")):
        assert cli_main(["invert", str(tmp_path / "s.npy"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("collide: error:") and says in err and err.count("\n") == 1, err
