"""collide.experiments.precache: the synthetic task, myopic gradients, the R^2 probes and a shortened run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from collide.cli import main as cli_main
from collide.config import PrecacheConfig
from collide.errors import CollideError
from collide.experiments.precache import Block, TinyGPT, make_batch, run_experiment as run, train
from collide.experiments.precache_train import Plateau, evaluate, lr_factor, r2_probes


REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # benchmarks/ is not installed: imported as the namespace package `benchmarks`
    sys.path.insert(0, str(REPO))


def main(argv: list[str]) -> int:
    """``collide precache ARGV``: the command line the user types."""
    return cli_main(["precache", *argv])


def small(**overrides) -> PrecacheConfig:
    base = dict(d_model=32, n_heads=2, seq_len=24, window=4, max_lag=6, steps=30, batch_size=8,
                eval_sequences=64, lr=3e-3, threads=1, figures=True)
    return PrecacheConfig(**{**base, **overrides})


@pytest.mark.parametrize("freq", [10.0, 3.0])
@pytest.mark.parametrize("task, last", [("paper", -1), ("breadcrumb", 0)])
def test_target_follows_the_definition(task, last, freq):
    """paper: y_n sums sin(freq x_j) for j = n-3 .. n-1; breadcrumb: for j = n-2 .. n (window 3)."""
    cfg = small(seq_len=16, window=3, task=task, p=0.5, freq=freq)
    b = make_batch(5, cfg, torch.Generator().manual_seed(0))
    x, z, y = b["x"], b["z"], b["y"]
    assert 0 < z.sum() < z.numel()
    for i in range(5):
        for n in range(16):
            window = sum(torch.sin(freq * x[i, j]) for j in range(max(0, n + last - 2), n + last + 1))
            want = window if z[i, n] == 1 else x[i, n]
            assert torch.isclose(y[i, n], torch.as_tensor(float(want)), atol=1e-5)
            own = torch.sin(freq * x[i, n]) if task == "breadcrumb" else 0.0
            assert torch.isclose(b["current"][i, n], z[i, n] * own + (1 - z[i, n]) * x[i, n])
    assert torch.equal(b["inputs"][..., 0], x) and torch.equal(b["inputs"][..., 1], z)
    assert torch.equal(b["sin"], torch.sin(freq * x))


def test_paper_task_defaults_to_p_one():
    b = make_batch(4, small(), torch.Generator().manual_seed(0))
    assert torch.all(b["z"] == 1) and torch.all(b["current"] == 0)


def test_plateau_rule_waits_for_min_steps_and_for_leaving_the_trivial_loss():
    """A loss on the trivial plateau (above 0.99 x trivial) never counts toward a plateau, however long;
    nor does a flat loss before min_steps. After both, patience 2 halves then stops (decays 2)."""
    rule = Plateau(patience=2, min_delta=0.01, decays=2, min_steps=600)
    on_trivial = [rule.update(10 * k, 1.0 - 0.001 * (k % 3), trivial=1.0) for k in range(1, 51)]  # steps 10..500
    assert set(on_trivial) == {"go"}
    flat_early = [rule.update(step, 0.5, 1.0) for step in (510, 520, 530, 540, 550, 560)]  # below min_steps
    assert set(flat_early) == {"go"}
    assert [rule.update(step, 0.5, 1.0) for step in (600, 610, 620, 630)] == ["go", "halve", "go", "stop"]


def test_a_run_that_stays_on_the_plateau_is_not_stopped():
    """lr = 0 keeps the model on its initial loss, above the trivial one: the former rule stopped such a run
    after (1 + patience x decays) measurements (step 10); it now runs every step."""
    cfg = small(lr=0.0, steps=60, eval_every=2, patience=2, decays=2, min_steps=0)
    model, curve, stopped = train(cfg, "vanilla")
    assert all(c["val_loss"] > 0.99 * c["val_trivial"] for c in curve)  # the premise: on the trivial plateau
    assert stopped == "steps" and curve[-1]["step"] == 60 and len(curve) == 30
    assert {c["lr"] for c in curve} == {0.0}


def test_a_run_that_leaves_the_plateau_stops_on_the_next_one():
    """The breadcrumb task at a high learning rate leaves the trivial loss within min_steps; the rule then
    stops it (patience 2, decays 1) long before `steps`, never before min_steps."""
    cfg = small(task="breadcrumb", steps=3000, eval_every=10, patience=2, decays=1, min_steps=200, lr=1e-2,
                min_delta=0.05)
    model, curve, stopped = train(cfg, "vanilla")
    assert stopped == "plateau" and 200 <= curve[-1]["step"] < 3000
    assert curve[-1]["val_loss"] < 0.9 * curve[-1]["val_trivial"]


def test_cosine_schedule_warms_up_then_decays_to_zero():
    cfg = small(schedule="cosine", steps=1000)
    assert [lr_factor(s, cfg) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_factor(10, cfg) == 1.0 and abs(lr_factor(505, cfg) - 0.5) < 1e-12 and lr_factor(999, cfg) < 1e-4
    assert lr_factor(500, small(steps=1000)) == 1.0  # plateau: constant after the warm-up


@pytest.mark.parametrize("myopic", ["residual", "full"])
@pytest.mark.parametrize("tau", [1, 5])
def test_myopic_sends_no_gradient_to_earlier_positions(tau, myopic):
    """d loss(t+tau) / d state(t) is exactly 0 at every layer in myopic mode, non-zero in vanilla."""
    cfg = small()
    inputs = make_batch(2, cfg, torch.Generator().manual_seed(1))["inputs"]
    t = 7
    for cut in (None, myopic):
        torch.manual_seed(0)
        model = TinyGPT(cfg, myopic=cut)
        prediction, states = model(inputs)
        for h in states:
            h.retain_grad()
        prediction[:, t + tau].sum().backward()
        for k, h in enumerate(states[:-1]):  # the last layer's state at t feeds only the output at t
            at_t, own = h.grad[:, t], h.grad[:, t + tau]
            assert own.abs().max() > 0, (cut, k)  # the loss does reach its own position
            if cut:
                assert torch.count_nonzero(at_t) == 0, (k, at_t.abs().max())
            else:
                assert at_t.abs().max() > 1e-6, k


def hand_gradients(block: Block, h: torch.Tensor, g: torch.Tensor, past: bool) -> dict[str, torch.Tensor]:
    """The gradients of L = g . attention(h)[0, 1] (one head, two positions), by hand.

    u_j = ln1(h_j); q, k, v = W u_j + b; s_j = q_1 . k_j / sqrt(d); a = softmax(s); o = a_0 v_0 + a_1 v_1;
    L = g . (P o + b_P). ``past``: whether the gradient flows through position 0's key and value (vanilla,
    residual) or not (full). Position 0's query never matters (its output is not in L)."""
    d = h.shape[-1]
    w, b = block.qkv.weight.detach(), block.qkv.bias.detach()
    wq, wk, wv = w[:d], w[d:2 * d], w[2 * d:]
    gamma, beta, eps = block.ln1.weight.detach(), block.ln1.bias.detach(), block.ln1.eps
    x = h.detach()[0]
    mu, sigma = x.mean(-1, keepdim=True), (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    norm = (x - mu) / sigma
    u = gamma * norm + beta
    q, k, v = u @ wq.T + b[:d], u @ wk.T + b[d:2 * d], u @ wv.T + b[2 * d:]
    s = k @ q[1] / math.sqrt(d)
    a = s.softmax(0)
    o = a @ v
    r = block.proj.weight.detach().T @ g  # dL/do
    ds = a * (v @ r - o @ r)  # dL/ds_j
    dq1, dk, dv = ds @ k / math.sqrt(d), ds[:, None] * q[1] / math.sqrt(d), a[:, None] * r
    rows = [0, 1] if past else [1]  # the positions whose key and value carry gradient
    du = torch.zeros_like(u)
    du[1] += wq.T @ dq1
    for j in rows:
        du[j] += wk.T @ dk[j] + wv.T @ dv[j]
    grads = {"wq": torch.outer(dq1, u[1]), "bq": dq1,
             "wk": sum(torch.outer(dk[j], u[j]) for j in rows), "bk": sum(dk[j] for j in rows),
             "wv": sum(torch.outer(dv[j], u[j]) for j in rows), "bv": sum(dv[j] for j in rows),
             "ln1_weight": (du * norm).sum(0), "ln1_bias": du.sum(0), "proj": torch.outer(g, o)}
    delta = du * gamma  # LayerNorm's backward to its input
    grads["h"] = (delta - delta.mean(-1, keepdim=True) - norm * (delta * norm).mean(-1, keepdim=True)) / sigma
    return grads


@pytest.mark.parametrize("mode", [None, "residual", "full"])
def test_parameter_gradients_of_each_myopic_cut_match_the_hand_computed_ones(mode):
    """residual: W_K, W_V, their biases and ln1 still learn from the loss at 1 through position 0's
    recomputed key and value (the same parameter gradients as vanilla); only the residual stream h_0 gets
    none. full: they learn only through position 1's own key and value; W_Q as vanilla."""
    torch.manual_seed(3)
    block = Block(4, 1).double()
    with torch.no_grad():  # a LayerNorm away from its identity initialisation
        block.ln1.weight.uniform_(0.5, 1.5)
        block.ln1.bias.uniform_(-0.5, 0.5)
    h = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, dtype=torch.float64)
    (block.attention(h, mode)[0, 1] @ g).backward()
    want = hand_gradients(block, h, g, past=mode != "full")
    d = 4
    got = {"wq": block.qkv.weight.grad[:d], "bq": block.qkv.bias.grad[:d], "wk": block.qkv.weight.grad[d:2 * d],
           "bk": block.qkv.bias.grad[d:2 * d], "wv": block.qkv.weight.grad[2 * d:], "bv": block.qkv.bias.grad[2 * d:],
           "ln1_weight": block.ln1.weight.grad, "ln1_bias": block.ln1.bias.grad, "proj": block.proj.weight.grad,
           "h": h.grad[0]}
    if mode:  # no gradient into the past position's residual stream
        want["h"][0] = 0.0
    for name, value in want.items():
        assert torch.allclose(got[name], value, atol=1e-12, rtol=1e-10), (name, got[name], value)
    assert want["wk"].abs().min() > 0 and want["h"][1].abs().min() > 0  # nothing vanishes by accident
    if mode == "full":  # what the cut removes is not negligible
        vanilla = hand_gradients(block, h, g, past=True)
        for name in ("wk", "wv", "bk", "bv", "ln1_weight", "ln1_bias"):
            assert (vanilla[name] - want[name]).abs().max() > 1e-3, name


@pytest.mark.parametrize("myopic", ["residual", "full"])
def test_myopic_and_vanilla_compute_the_same_forward(myopic):
    cfg = small()
    inputs = make_batch(3, cfg, torch.Generator().manual_seed(2))["inputs"]
    torch.manual_seed(0)
    vanilla = TinyGPT(cfg, myopic=None)
    cut = TinyGPT(cfg, myopic=myopic)
    cut.load_state_dict(vanilla.state_dict())
    assert torch.allclose(vanilla(inputs)[0], cut(inputs)[0], atol=1e-6)


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
    result = run(small(out=str(tmp_path), task="breadcrumb", loss="mse"))
    assert [m["mode"] for m in result["models"]] == ["vanilla", "myopic"]
    for m in result["models"]:
        # p=0.5, window 4: Var(y) ~ 0.5 * 4 * 0.5 + 0.5 * 1 = 1.5 (positions n < 3 sum fewer terms)
        assert 1.2 < m["trivial_loss"] < 1.7
        assert 0.5 < m["current_input_loss"] < 0.9  # the 3 past sin terms when z = 1: 0.5 * 3 * 0.5
        assert [p["layer"] for p in m["probes"]] == [0, 1, 2] and all(len(p["r2"]) == 7 for p in m["probes"])
        # the input embedding is linear in (x, z): sin(10 x_n) is out of a linear probe's reach
        assert abs(m["probes"][0]["r2"][0]) < 0.05
        assert m["stopped"] == "steps" and m["steps"] == 30 and m["curve"][-1]["step"] == 30
        assert m["sequences"] == 30 * 8
    # FLOPs per sequence: 3 x (24 d^2 + 4 n d [+ 4 d^2 myopic]) x layers x n, d = 32, n = 24
    assert result["models"][0]["train_flops"] == 240 * 3 * (24 * 32 ** 2 + 4 * 24 * 32) * 2 * 24
    assert result["models"][1]["train_flops"] == 240 * 3 * (28 * 32 ** 2 + 4 * 24 * 32) * 2 * 24
    saved = json.loads((tmp_path / "precache.json").read_text())
    assert saved["models"][1]["test_loss"] == result["models"][1]["test_loss"]
    assert "| myopic | 2 |" in (tmp_path / "precache.md").read_text()
    assert (tmp_path / "figures" / "precache_r2.png").stat().st_size > 10_000
    assert (tmp_path / "figures" / "precache_curves.png").stat().st_size > 10_000


def test_huber_baselines_at_p_one():
    """task=paper, p = 1, window 10: y_n is a sum of 10 terms of variance 1/2 (fewer before n = 10), and the
    trivial Huber loss of y ~ N(0, 5) is about 1.3 (the authors' checkpoints: myopic 1.24)."""
    torch.manual_seed(0)
    cfg = PrecacheConfig(max_lag=20, eval_sequences=2048)
    batch = make_batch(2048, cfg, torch.Generator().manual_seed(2))
    out = evaluate(TinyGPT(cfg, myopic=None), batch, cfg)
    assert 1.2 < out["trivial_loss"] < 1.3 and out["current_input_loss"] == pytest.approx(out["trivial_loss"], 1e-3)
    assert abs(float(batch["y"][:, 10:].var()) - 5.0) < 0.1


def test_gpu_section_runs_its_code_path_on_cpu(tmp_path):
    """benchmarks/precache_gpu.py at toy sizes on the CPU: both modes timed, planned, trained and reported."""
    from benchmarks.precache_gpu import PAPER_STEPS, precache_check
    from collide.experiments.precache_report import main as report

    out = precache_check(device="cpu", train_s=30.0, max_steps=8, out=tmp_path, d_model=16, seq_len=12, window=3, max_lag=4,
                         batch_size=4, eval_sequences=32, eval_every=4, threads=1)
    assert out["paper_steps"] == PAPER_STEPS and out["config"]["loss"] == "huber"
    for mode in ("vanilla", "myopic"):
        m = out[mode]
        assert m["steps"] == 8 and m["stopped"] == "steps" and [p["step"] for p in m["curve"]] == [4, 8]
        assert m["timed_s_per_step"] > 0 and m["train_flops"] == 8 * m["flops_per_step"]
        assert 0 < m["test_over_trivial"] < 5 and m["paper_over_trivial"] == pytest.approx(
            m["paper_training_huber"] / m["trivial_huber"])
        assert [p["layer"] for p in m["probes"]] == [0, 1, 2]
    assert torch.get_float32_matmul_precision() == "highest"  # restored
    runs = [str(tmp_path / mode / "precache.json") for mode in ("vanilla", "myopic")]
    for kind in ("curves", "r2"):
        assert report([kind, str(tmp_path / f"{kind}.png"), *runs]).stat().st_size > 10_000


def test_bad_values_are_one_line(capsys):
    assert main(["modes=[greedy]"]) == 2
    assert "choose among ['vanilla', 'myopic']" in capsys.readouterr().err
    assert main(["task=shifted"]) == 2
    assert "choose among ['paper', 'breadcrumb']" in capsys.readouterr().err
    for arg, message in (("myopic=half", "choose among ['residual', 'full']"), ("loss=l1", "choose among ['huber'"),
                         ("schedule=linear", "choose among ['plateau', 'cosine']"), ("freq=0", "freq=0.0 must be"),
                         ("min_steps=-1", "min_steps=-1 must be"), ("device=cuda:7", "device=cuda:7 must be"),
                         ("device=tpu", "device=tpu must be")):
        assert main([arg]) == 2, arg
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (arg, err)
    with pytest.raises(CollideError, match="not a multiple of n_heads"):
        TinyGPT(small(d_model=33), myopic=None)
