"""collide.experiments.precache: the synthetic task, myopic gradients, the R^2 probes and a shortened run."""

from __future__ import annotations

import json

import pytest
import torch

from collide.cli import main as cli_main
from collide.config import PrecacheConfig
from collide.errors import CollideError
from collide.experiments.precache import TinyGPT, make_batch, r2_probes, run_experiment as run, train


def main(argv: list[str]) -> int:
    """``collide precache ARGV``: the command line the user types."""
    return cli_main(["precache", *argv])


def small(**overrides) -> PrecacheConfig:
    base = dict(d_model=32, n_heads=2, seq_len=24, window=4, max_lag=6, steps=30, batch_size=8,
                eval_sequences=64, lr=3e-3, threads=1, figures=True)
    return PrecacheConfig(**{**base, **overrides})


@pytest.mark.parametrize("task, last", [("paper", -1), ("breadcrumb", 0)])
def test_target_follows_the_definition(task, last):
    """paper: y_n sums sin(10 x_j) for j = n-3 .. n-1; breadcrumb: for j = n-2 .. n (window 3)."""
    cfg = small(seq_len=16, window=3, task=task, p=0.5)
    b = make_batch(5, cfg, torch.Generator().manual_seed(0))
    x, z, y = b["x"], b["z"], b["y"]
    assert 0 < z.sum() < z.numel()
    for i in range(5):
        for n in range(16):
            window = sum(torch.sin(10 * x[i, j]) for j in range(max(0, n + last - 2), n + last + 1))
            want = window if z[i, n] == 1 else x[i, n]
            assert torch.isclose(y[i, n], torch.as_tensor(float(want)), atol=1e-5)
            own = torch.sin(10 * x[i, n]) if task == "breadcrumb" else 0.0
            assert torch.isclose(b["current"][i, n], z[i, n] * own + (1 - z[i, n]) * x[i, n])
    assert torch.equal(b["inputs"][..., 0], x) and torch.equal(b["inputs"][..., 1], z)


def test_paper_task_defaults_to_p_one():
    b = make_batch(4, small(), torch.Generator().manual_seed(0))
    assert torch.all(b["z"] == 1) and torch.all(b["current"] == 0)


def test_training_stops_on_a_plateau():
    """With a zero learning rate the validation MSE never improves: each plateau comes after `patience`
    measurements, and the `decays`-th ends training long before `steps`."""
    model, curve, stopped = train(small(lr=0.0, steps=1000, eval_every=2, patience=2, decays=2), "vanilla")
    assert stopped == "plateau" and curve[-1]["step"] == 2 * (1 + 2 * 2)
    assert [c["lr"] for c in curve] == [0.0] * len(curve)


@pytest.mark.parametrize("tau", [1, 5])
def test_myopic_sends_no_gradient_to_earlier_positions(tau):
    """d loss(t+tau) / d state(t) is exactly 0 at every layer in myopic mode, non-zero in vanilla."""
    cfg = small()
    inputs = make_batch(2, cfg, torch.Generator().manual_seed(1))["inputs"]
    t = 7
    for mode in ("vanilla", "myopic"):
        torch.manual_seed(0)
        model = TinyGPT(cfg, myopic=mode == "myopic")
        prediction, states = model(inputs)
        for h in states:
            h.retain_grad()
        prediction[:, t + tau].sum().backward()
        for k, h in enumerate(states[:-1]):  # the last layer's state at t feeds only the output at t
            at_t, own = h.grad[:, t], h.grad[:, t + tau]
            assert own.abs().max() > 0, (mode, k)  # the loss does reach its own position
            if mode == "myopic":
                assert torch.count_nonzero(at_t) == 0, (k, at_t.abs().max())
            else:
                assert at_t.abs().max() > 1e-6, k


def test_myopic_and_vanilla_compute_the_same_forward():
    cfg = small()
    inputs = make_batch(3, cfg, torch.Generator().manual_seed(2))["inputs"]
    torch.manual_seed(0)
    vanilla = TinyGPT(cfg, myopic=False)
    myopic = TinyGPT(cfg, myopic=True)
    myopic.load_state_dict(vanilla.state_dict())
    assert torch.allclose(vanilla(inputs)[0], myopic(inputs)[0], atol=1e-6)


def test_r2_probe_recovers_a_planted_lag():
    """States that hold sin(10 x_{n-3}) in one dimension: R^2 = 1 at lag 3, about 0 elsewhere."""
    g = torch.Generator().manual_seed(0)
    s = torch.sin(10 * torch.randn(200, 30, generator=g))
    states = torch.randn(200, 30, 8, generator=g)
    states[:, 3:, 0] = s[:, :-3]
    r2 = r2_probes(states, s, max_lag=6)
    assert r2[3] > 0.999
    assert all(abs(r) < 0.02 for i, r in enumerate(r2) if i != 3)


def test_shortened_run_writes_results(tmp_path):
    result = run(small(out=str(tmp_path), task="breadcrumb"))
    assert [m["mode"] for m in result["models"]] == ["vanilla", "myopic"]
    for m in result["models"]:
        # p=0.5, window 4: Var(y) ~ 0.5 * 4 * 0.5 + 0.5 * 1 = 1.5 (positions n < 3 sum fewer terms)
        assert 1.2 < m["trivial_mse"] < 1.7
        assert 0.5 < m["current_input_mse"] < 0.9  # the 3 past sin terms when z = 1: 0.5 * 3 * 0.5
        assert [p["layer"] for p in m["probes"]] == [0, 1, 2] and all(len(p["r2"]) == 7 for p in m["probes"])
        # the input embedding is linear in (x, z): sin(10 x_n) is out of a linear probe's reach
        assert abs(m["probes"][0]["r2"][0]) < 0.05
        assert m["stopped"] == "steps" and m["steps"] == 30 and m["curve"][-1]["step"] == 30
    saved = json.loads((tmp_path / "precache.json").read_text())
    assert saved["models"][1]["test_mse"] == result["models"][1]["test_mse"]
    assert "| myopic | 2 |" in (tmp_path / "precache.md").read_text()
    assert (tmp_path / "figures" / "precache_r2.png").stat().st_size > 10_000


def test_bad_values_are_one_line(capsys):
    assert main(["modes=[greedy]"]) == 2
    assert "choose among ['vanilla', 'myopic']" in capsys.readouterr().err
    assert main(["task=shifted"]) == 2
    assert "choose among ['paper', 'breadcrumb']" in capsys.readouterr().err
    with pytest.raises(CollideError, match="not a multiple of n_heads"):
        TinyGPT(small(d_model=33), myopic=False)
