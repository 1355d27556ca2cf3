"""layer=auto, model.final_norm=auto and epsilon=auto: a dump's layer, norm convention and noise from its first rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from collide.config import ModelConfig
from collide.invert.config import InvertConfig
from collide.errors import CollideError
from collide.invert.driver import invert_source
from collide.invert.locate import locate
from collide.models import load_model

BOS = 256
PROMPTS = [b"Where?", b"Here.!"]  # equal lengths: one (N, T, d) .npy


def tiny(family: str = "llama", final_norm: str = "post") -> ModelConfig:
    return ModelConfig(name=f"tiny-{family}", source=f"random:{family}", family=family, final_norm=final_norm)


@pytest.fixture(scope="module")
def llama():
    return load_model(tiny())


def hidden(lm, text: bytes) -> list[np.ndarray]:
    """HF hidden_states of an unpadded forward of BOS + text: [(T, d)] for layers 0..L (L after the final norm),
    and the last block's output before the final norm appended as entry L + 1."""
    ids = torch.tensor([[BOS] + list(text)])
    with torch.no_grad():
        out = lm.model(input_ids=ids, output_hidden_states=True)
        lm.final_norm = "pre"
        from collide.models import all_token_states

        pre = all_token_states(lm, ids, torch.ones_like(ids), [lm.n_layers])[lm.n_layers]
        lm.final_norm = "post"
    return [h[0].float().numpy() for h in out.hidden_states] + [pre[0].float().numpy()]


@pytest.mark.parametrize("layer", [0, 1, 3, 4, 5])  # 5: layer 4 = L read before the final norm
def test_locate_finds_the_layer_and_norm_from_the_bos_row(llama, layer):
    rows = np.stack([hidden(llama, t)[layer][:2] for t in PROMPTS])
    found = locate(llama, rows, BOS)
    assert (found.layer, found.final_norm) == (min(layer, 4), "pre" if layer == 5 else "post")
    assert found.position == 0 and found.tokens == [BOS, BOS] and found.noise < 1e-5
    assert found.runner_up["relative"] > 0.01


def test_locate_without_a_bos_scans_the_first_token(llama):
    """States that start at the first text token (no BOS row): every token's state at position 0 is computed."""
    rows = np.stack([hidden(llama, t)[2][1:3] for t in PROMPTS])  # rows of BOS + text, BOS row dropped: not row 0
    with pytest.raises(CollideError, match="match no layer"):
        locate(llama, rows, BOS)  # their row 0 is no BOS state, and row 1 is not after a BOS
    single = np.stack([hidden_alone(llama, t)[3][:2] for t in PROMPTS])
    found = locate(llama, single, None)
    assert found.layer == 3 and found.tokens == [PROMPTS[0][0], PROMPTS[1][0]] and found.scanned == 320


def hidden_alone(lm, text: bytes) -> list[np.ndarray]:
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([list(text)]), output_hidden_states=True)
    return [h[0].float().numpy() for h in out.hidden_states]


def test_layer_and_norm_auto_invert_a_dump(llama, tmp_path):
    """A .npy of the pre-norm last layer, inverted with layer=auto model.final_norm=auto: found, recorded, exact."""
    states = np.stack([hidden(llama, t)[5] for t in PROMPTS])
    np.save(tmp_path / "dump.npy", states)
    doc = invert_source(InvertConfig(source=str(tmp_path / "dump.npy"), model=tiny(final_norm="auto"), layer="auto",
                                     out=str(tmp_path / "out"), progress=False, policy="random", batch=320))
    assert doc["layer"] == 4 and doc["final_norm"] == "pre" and doc["location"]["final_norm"] == "pre"
    assert [p["recovered_ids"] for p in doc["prompts"]] == [[BOS] + list(t) for t in PROMPTS]
    assert doc["noise"]["relative"] < 1e-5 and "measured" in doc["epsilon_rule"]


def test_epsilon_auto_widens_to_the_measured_noise(llama, tmp_path):
    """States rounded to bf16 and written as fp32 (the dtype does not say so): epsilon=auto measures the rounding
    on the BOS row and widens the noise radius to 4x it; epsilon=rule keeps the fp32 rule, which it exceeds."""
    states = np.stack([hidden(llama, t)[2] for t in PROMPTS])
    rounded = torch.from_numpy(states).bfloat16().float().numpy()
    np.save(tmp_path / "bf16.npy", rounded)
    cfg = dict(source=str(tmp_path / "bf16.npy"), model=tiny(), layer=2, progress=False, policy="random", batch=320)
    auto = invert_source(InvertConfig(**cfg, out=str(tmp_path / "auto")))
    noise = auto["noise"]["relative"]
    assert 1e-4 < noise < 2 ** -8 and auto["noise"]["rows"][0]["token"] == BOS
    assert all(p["exact"] if "exact" in p else p["complete"] for p in auto["prompts"])
    eps = auto["prompts"][0]["positions"][1]
    assert eps["epsilon_noise"] == pytest.approx(4 * noise * np.linalg.norm(rounded[0, 1]) + 1e-6 * 8, rel=1e-6)
    rule = invert_source(InvertConfig(**cfg, out=str(tmp_path / "rule"), epsilon="rule"))
    first = rule["prompts"][0]["positions"][0]
    assert rule["noise"]["relative"] == noise and first["epsilon"] < auto["prompts"][0]["positions"][0]["epsilon"]
    assert not first["recovered"] and not rule["prompts"][0]["complete"]  # bf16 rounding: outside the fp32 rule
