"""``collide precache``: the synthetic pre-caching experiment of "Do Language Models Plan Ahead for
Future Tokens?" (Wu, Morris and Levine, arXiv 2404.00859), vanilla against myopic training.

Tasks, over sequences of ``seq_len`` positions n = 0, 1, ...: x_n ~ N(0, 1), z_n ~ Bernoulli(p), the
input at n is (x_n, z_n) and the target is, with s_j = sin(10 x_j) and terms j < 0 absent,

    task=paper:       y_n = z_n * sum_{j = n-window}^{n-1} s_j + (1 - z_n) * x_n
    task=breadcrumb:  y_n = z_n * sum_{j = n-window+1}^{n} s_j + (1 - z_n) * x_n

``paper`` is the authors' task (``SyntheticSeqDataset(conv=10, shift=1)`` in their code): the sum
stops at n-1, so s_n is useless at n, and a model that computes it at n (to be read by the next
``window`` positions) is pre-caching. ``breadcrumb`` keeps s_n inside its own target: computing it
at n pays at n, and later positions read it for free, so myopic training loses little there.

Model: a GPT-2 block stack (pre-LayerNorm, causal multi-head attention, a 4d ReLU MLP, learned
positions) with a linear input (x_n, z_n) -> d and a linear output d -> y_n, trained with the mean
squared error over every position. **Myopic** training computes the keys and values of past
positions from stop-gradient copies of their hidden states (the current position's own key and
value keep their gradient), so the loss at n sends no gradient into any earlier position's
computation; the weights still learn from every position's own loss.

Training stops on a plateau: every ``eval_every`` steps the MSE on fixed validation sequences is
measured; after ``patience`` measurements without a relative improvement of ``min_delta`` the
learning rate is halved, and the ``decays``-th plateau ends the run (``steps`` and
``max_cpu_seconds`` cap it; ``stopped`` records which ended it).

Reported per mode: the test MSE beside two baselines on the same held-out sequences, the trivial
one (predict the mean of y) and the best predictor from the current input alone,
E[y_n | x_n, z_n] (paper: (1 - z_n) x_n; breadcrumb: z_n sin(10 x_n) + (1 - z_n) x_n), which is
what a model that reads nothing of the past can reach; and, for each layer (0 = the input embedding,
k = output of block k), the R^2 of a linear probe (least squares with an intercept) from the state
at n to sin(10 x_{n-i}) for i = 0..max_lag, fitted on half the held-out sequences and scored on the
other half, over positions n >= max_lag.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict

import torch
from torch import nn

from collide.atomic import write_outputs
from collide.config import PrecacheConfig
from collide.errors import CollideError
from collide.experiments import torch_threads

log = logging.getLogger(__name__)

SCHEMA = "collide-precache/1"
MODES = ("vanilla", "myopic")
TASKS = {"paper": 1.0, "breadcrumb": 0.5}  # task -> its default p (paper: the authors' training notebook)
FREQ = 10.0  # the task's sin(FREQ * x)
WARMUP_STEPS = 100  # linear learning-rate warm-up, in steps
VAL_SEQUENCES = 256  # fixed validation sequences of the plateau test (their own seed)
PROBE_RIDGE = 1e-6  # ridge of the R^2 probes, times the mean eigenvalue of their Gram matrix (numerical only)


def task_p(cfg: PrecacheConfig) -> float:
    """P(z_n = 1): ``cfg.p``, or the task's default when it is None."""
    return TASKS.get(cfg.task, 0.5) if cfg.p is None else cfg.p


def make_batch(n: int, cfg: PrecacheConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """n sequences: inputs (n, seq_len, 2) = (x, z), target y (n, seq_len), x, z, sin(10 x) (n, seq_len) and
    ``current``, E[y_n | x_n, z_n] (the best prediction from the current input alone)."""
    x = torch.randn(n, cfg.seq_len, generator=generator)
    z = (torch.rand(n, cfg.seq_len, generator=generator) < task_p(cfg)).float()
    s = torch.sin(FREQ * x)
    c = s.cumsum(1)
    window_sum = c.clone()  # window_sum[n] = sum of s_j, j = n-window+1 .. n
    window_sum[:, cfg.window:] -= c[:, :-cfg.window]
    if cfg.task == "paper":  # j = n-window .. n-1: the same window shifted by one position
        window_sum = torch.cat([torch.zeros(n, 1), window_sum[:, :-1]], 1)
        current = (1 - z) * x
    else:
        current = z * s + (1 - z) * x
    y = z * window_sum + (1 - z) * x
    return {"inputs": torch.stack([x, z], -1), "y": y, "x": x, "z": z, "sin": s, "current": current}


class Block(nn.Module):
    """A pre-LayerNorm GPT-2 block with ReLU; ``myopic`` attends to stop-gradient copies of the past."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)  # (b, heads, n, d_head)

    def attention(self, h: torch.Tensor, myopic: bool) -> torch.Tensor:
        q, k, v = map(self._heads, self.qkv(self.ln1(h)).chunk(3, dim=-1))
        if myopic:  # the past's keys and values, from hidden states that pass no gradient back
            _, k_past, v_past = map(self._heads, self.qkv(self.ln1(h.detach())).chunk(3, dim=-1))
        else:
            k_past, v_past = k, v
        n = h.shape[1]
        scale = 1.0 / math.sqrt(q.shape[-1])
        eye = torch.eye(n, dtype=torch.bool)
        scores = (q @ k_past.transpose(-1, -2)) * scale  # scores[i, j] = q_i . k_j, j from the past copy
        scores = torch.where(eye, ((q * k).sum(-1) * scale).unsqueeze(-1), scores)  # j = i: the live key
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        weights = scores.softmax(-1)
        out = weights.masked_fill(eye, 0.0) @ v_past + weights.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * v
        b, _, _, dh = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, self.n_heads * dh))

    def forward(self, h: torch.Tensor, myopic: bool) -> torch.Tensor:
        h = h + self.attention(h, myopic)
        return h + self.mlp(self.ln2(h))


class TinyGPT(nn.Module):
    """(x_n, z_n) -> y_n through ``n_layers`` GPT-2 blocks; ``forward`` also returns every layer's states."""

    def __init__(self, cfg: PrecacheConfig, myopic: bool):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise CollideError(f"d_model={cfg.d_model} is not a multiple of n_heads={cfg.n_heads}; e.g. d_model=128 "
                               "n_heads=2")
        self.myopic = myopic
        self.embed = nn.Linear(2, cfg.d_model)
        self.position = nn.Parameter(torch.randn(cfg.seq_len, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads) for _ in range(cfg.n_layers))
        self.ln_f, self.head = nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, 1)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(predictions (b, n), [states (b, n, d) of layer 0 = embedding, 1..n_layers = block outputs])."""
        h = self.embed(inputs) + self.position[: inputs.shape[1]]
        states = [h]
        for block in self.blocks:
            h = block(h, self.myopic)
            states.append(h)
        return self.head(self.ln_f(h)).squeeze(-1), states


def train(cfg: PrecacheConfig, mode: str) -> tuple[TinyGPT, list[dict], str]:
    """One model trained on fresh batches (seeded) with AdamW until a plateau (module docstring).

    Returns the model, its curve (per ``eval_every`` steps: mean train MSE, validation MSE,
    learning rate) and why training stopped: "plateau", "steps" or "cpu_seconds"."""
    torch.manual_seed(cfg.seed)
    model = TinyGPT(cfg, myopic=mode == "myopic")
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    val = make_batch(VAL_SEQUENCES, cfg, torch.Generator().manual_seed(cfg.seed + 3))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    curve, running, best, waited, decays, stopped = [], [], math.inf, 0, 0, "steps"
    lr, c0 = cfg.lr, time.process_time()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / WARMUP_STEPS)
        batch = make_batch(cfg.batch_size, cfg, generator)
        loss = ((model(batch["inputs"])[0] - batch["y"]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % cfg.eval_every and step + 1 < cfg.steps:
            continue
        with torch.no_grad():
            val_mse = float(((model(val["inputs"])[0] - val["y"]) ** 2).mean())
        curve.append({"step": step + 1, "train_mse": sum(running) / len(running), "val_mse": val_mse, "lr": lr})
        running = []
        if val_mse < best * (1 - cfg.min_delta):
            best, waited = val_mse, 0
        else:
            waited += 1
        if waited >= cfg.patience:  # a plateau: halve the learning rate, or stop at the last one
            decays, waited = decays + 1, 0
            if decays >= cfg.decays:
                stopped = "plateau"
                break
            lr *= 0.5
        if len(curve) % 10 == 0:
            log.info("%s: step %d, train MSE %.4f, validation MSE %.4f, lr %.2g", mode, step + 1,
                     curve[-1]["train_mse"], val_mse, lr)
        if time.process_time() - c0 > cfg.max_cpu_seconds:
            stopped = "cpu_seconds"
            break
    return model, curve, stopped


def r2_probes(states: torch.Tensor, sin: torch.Tensor, max_lag: int) -> list[float]:
    """R^2 of sin(10 x_{n-i}), i = 0..max_lag, from states (b, n, d) at positions n >= max_lag.

    Least squares with an intercept (and a negligible ridge) fitted on the first half of the
    sequences, scored on the second half; R^2 = 1 - SSE / SST around the scored half's own mean.
    """
    b, n, d = states.shape
    half = b // 2
    x = states[:, max_lag:].double()
    mean = x[:half].reshape(-1, d).mean(0)
    x = x - mean
    fit, score = x[:half].reshape(-1, d), x[half:].reshape(-1, d)
    gram = fit.T @ fit
    gram += PROBE_RIDGE * gram.diagonal().mean() * torch.eye(d, dtype=gram.dtype)
    out = []
    for lag in range(max_lag + 1):
        target = sin[:, max_lag - lag: n - lag].double()
        t_fit, t_score = target[:half].reshape(-1), target[half:].reshape(-1)
        w = torch.linalg.solve(gram, fit.T @ (t_fit - t_fit.mean()))
        residual = t_score - (score @ w + t_fit.mean())
        out.append(float(1 - residual.pow(2).sum() / (t_score - t_score.mean()).pow(2).sum()))
    return out


def evaluate(model: TinyGPT, batch: dict[str, torch.Tensor], max_lag: int) -> dict:
    """Test MSE against the baselines, and the R^2 probes of every layer, on held-out sequences."""
    with torch.no_grad():
        prediction, states = model(batch["inputs"])
    y, s = batch["y"], batch["sin"]
    mse = float(((prediction - y) ** 2).mean())
    trivial = float(((y - y.mean()) ** 2).mean())
    current_only = float(((batch["current"] - y) ** 2).mean())
    return {"test_mse": mse, "trivial_mse": trivial, "current_input_mse": current_only,
            "normalised_loss": mse / trivial, "loss_vs_current_input": mse / current_only,
            "probes": [{"layer": k, "r2": r2_probes(h, s, max_lag)} for k, h in enumerate(states)]}


def check(cfg: PrecacheConfig) -> None:
    """One-line errors for values the experiment cannot run with, before any work: every number in range."""
    if cfg.task not in TASKS:
        raise CollideError(f"task={cfg.task}: choose among {list(TASKS)}, e.g. task=paper")
    bad = [m for m in cfg.modes if m not in MODES]
    if bad or not cfg.modes:
        raise CollideError(f"modes={cfg.modes}: choose among {list(MODES)}, e.g. modes=[vanilla,myopic]")
    if not 0 < task_p(cfg) <= 1:
        raise CollideError(f"p={cfg.p}: the Bernoulli probability must be in (0, 1], e.g. p=1 (or p=null: the task's)")
    if not 1 <= cfg.window <= cfg.seq_len or not 0 <= cfg.max_lag < cfg.seq_len - 1:
        raise CollideError(f"window={cfg.window}, max_lag={cfg.max_lag}, seq_len={cfg.seq_len}: need 1 <= window <= "
                           "seq_len and max_lag < seq_len - 1, e.g. window=10 max_lag=20 seq_len=64")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.eval_sequences < 4 or cfg.eval_every < 1 or cfg.patience < 1 \
            or cfg.decays < 1:
        raise CollideError(f"steps={cfg.steps}, batch_size={cfg.batch_size}, eval_sequences={cfg.eval_sequences}, "
                           f"eval_every={cfg.eval_every}, patience={cfg.patience}, decays={cfg.decays}: need each "
                           ">= 1 and eval_sequences >= 4")
    require(cfg, {
        "d_model": (cfg.d_model >= 1, ">= 1, e.g. d_model=128"),
        "n_layers": (cfg.n_layers >= 1, ">= 1, e.g. n_layers=2"),
        "n_heads": (cfg.n_heads >= 1 and cfg.d_model % cfg.n_heads == 0,
                    f">= 1 and divide d_model={cfg.d_model}, e.g. d_model=128 n_heads=2"),
        "lr": (math.isfinite(cfg.lr) and cfg.lr > 0, "a positive learning rate, e.g. lr=1e-3"),
        "max_cpu_seconds": (cfg.max_cpu_seconds > 0, "positive CPU seconds, e.g. max_cpu_seconds=600"),
        "min_delta": (math.isfinite(cfg.min_delta) and cfg.min_delta >= 0, "a relative improvement >= 0, e.g. "
                      "min_delta=0.01"),
        "threads": (cfg.threads >= 0, ">= 0 (0 = torch's default), e.g. threads=1"),
        "seed": (cfg.seed >= 0, ">= 0, e.g. seed=0"),
    })


def require(cfg, rules: dict[str, tuple[bool, str]]) -> None:
    """CollideError naming the first key of ``cfg`` whose rule fails; ``rules``: {key: (holds, "what it must be")}."""
    for key, (holds, rule) in rules.items():
        if not holds:
            raise CollideError(f"{key}={getattr(cfg, key)} must be {rule}")


def markdown(result: dict) -> str:
    """precache.md: losses against the baselines and the R^2 table of every mode and layer."""
    c = result["config"]
    lines = [f"# Pre-caching on the synthetic task (arXiv 2404.00859), task={c['task']}", "",
             f"{c['n_layers']}-layer GPT-2 (d={c['d_model']}, {c['n_heads']} heads, ReLU), batches of "
             f"{c['batch_size']} fresh sequences of {c['seq_len']}, p={result['p']}, window={c['window']}, lr "
             f"{c['lr']} halved on each plateau (patience {c['patience']} x {c['eval_every']} steps, "
             f"{c['decays']} plateaus end it), seed {c['seed']}; evaluated on {c['eval_sequences']} held-out "
             "sequences.", "",
             "| mode | steps | stopped | test MSE | trivial MSE (mean of y) | current-input-only MSE | test / trivial | "
             "test / current-input | wall s | CPU s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        lines.append(f"| {m['mode']} | {m['steps']} | {m['stopped']} | {m['test_mse']:.4f} | {m['trivial_mse']:.4f} | "
                     f"{m['current_input_mse']:.4f} | {m['normalised_loss']:.3f} | {m['loss_vs_current_input']:.3f} | "
                     f"{m['seconds']:.0f} | {m['cpu_seconds']:.0f} |")
    lags = range(c["max_lag"] + 1)
    lines += ["", "R^2 of a linear probe from the state at n to sin(10 x_{n-i}) (held-out sequences; layer 0 = "
              "the input embedding):", "", "| mode | layer | " + " | ".join(f"i={i}" for i in lags) + " |",
              "|---|---|" + "---|" * len(lags)]
    for m in result["models"]:
        for p in m["probes"]:
            lines.append(f"| {m['mode']} | {p['layer']} | " + " | ".join(f"{r:.2f}" for r in p["r2"]) + " |")
    return "\n".join(lines) + "\n"


def run_experiment(cfg: PrecacheConfig, command: str | None = None) -> dict:
    """Train every mode, evaluate and probe it; write precache.json, precache.md and the figure.

    ``cfg.threads`` applies for the call only (torch's thread count is restored after it);
    ``command``, the command line that asked for it, is recorded in precache.json.
    """
    check(cfg)
    with torch_threads(cfg.threads):
        return _run(cfg, command)


def _run(cfg: PrecacheConfig, command: str | None) -> dict:
    from collide.report.figures import precache_figure

    t0, c0 = time.perf_counter(), time.process_time()
    held_out = make_batch(cfg.eval_sequences, cfg, torch.Generator().manual_seed(cfg.seed + 2))
    result = {"schema": SCHEMA, "command": command, "config": json.loads(json.dumps(asdict(cfg))), "p": task_p(cfg),
              "models": []}
    for mode in cfg.modes:
        t1, c1 = time.perf_counter(), time.process_time()
        model, curve, stopped = train(cfg, mode)
        entry = {"mode": mode, **evaluate(model, held_out, cfg.max_lag), "steps": curve[-1]["step"],
                 "stopped": stopped, "curve": curve, "seconds": time.perf_counter() - t1,
                 "cpu_seconds": time.process_time() - c1}
        result["models"].append(entry)
        log.info("%s: test MSE %.4f (trivial %.4f, current input only %.4f), best R^2 at layer 1: %.2f (%.0f s)",
                 mode, entry["test_mse"], entry["trivial_mse"], entry["current_input_mse"],
                 max(entry["probes"][min(1, cfg.n_layers)]["r2"]), entry["seconds"])
    result["seconds"], result["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    figures = {"figures/precache_r2.png": lambda path: precache_figure(result, path)} if cfg.figures else {}
    written = write_outputs(cfg.out, "precache", result, markdown(result), figures)
    log.info("wrote %s (%.0f s)", written, result["seconds"])
    return result
