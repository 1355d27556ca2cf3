"""``collide precache``: the synthetic pre-caching experiment of "Do Language Models Plan Ahead for
Future Tokens?" (Wu, Morris and Levine, arXiv 2404.00859), vanilla against myopic training.

Tasks, over sequences of ``seq_len`` positions n = 0, 1, ...: x_n ~ N(0, 1), z_n ~ Bernoulli(p), the
input at n is (x_n, z_n) and the target is, with s_j = sin(freq x_j) (the authors' freq = 10) and
terms j < 0 absent,

    task=paper:       y_n = z_n * sum_{j = n-window}^{n-1} s_j + (1 - z_n) * x_n
    task=breadcrumb:  y_n = z_n * sum_{j = n-window+1}^{n} s_j + (1 - z_n) * x_n

``paper`` is the authors' task (``SyntheticSeqDataset(conv=10, shift=1)`` in their code): the sum
stops at n-1, so s_n is useless at n, and a model that computes it at n (to be read by the next
``window`` positions) is pre-caching. ``breadcrumb`` keeps s_n inside its own target: computing it
at n pays at n, and later positions read it for free, so myopic training loses little there.
Batches are drawn fresh for every step on ``device`` (the authors draw one epoch of a fixed set:
every sequence is seen once either way).

Model: a GPT-2 block stack (pre-LayerNorm, causal multi-head attention, a 4d ReLU MLP, learned
positions) with a linear input (x_n, z_n) -> d and a linear output d -> y_n.

**Myopic training** changes only where gradients flow; the forward pass is the vanilla one. In
every attention layer, position n attends to its own key and value as computed live, and to the
past positions j < n through copies of their keys and values, cut in one of two ways (``myopic``):

- ``residual`` (the authors' default, ``to_myopic_gpt2`` with no cache): the past keys and values
  are recomputed from ``h_j.detach()``, the stop-gradient copy of the residual stream entering the
  block, through the live LayerNorm ln1 and the live W_K, W_V (and biases). The loss at n sends no
  gradient into any earlier position's residual stream, hence none into what any earlier
  position computed (embeddings, earlier blocks, their MLPs); but ln1's weight and bias and W_K,
  W_V with their biases do get gradients from the loss at n through the recomputed k_j, v_j, j < n,
  as in vanilla training. (The authors detach after ln_1, so their ln_1 gets none of those.)
- ``full`` (the authors' ``from_kv`` path): the past keys and values are the live k_j, v_j
  detached whole. The loss at n then reaches ln1, W_K and W_V only through position n's own key
  and value; W_Q still learns from the scores q_n . k_j of the past.

In both, every parameter still learns from every position's own loss (the weights are shared).

Training (``train``) uses ``collide.experiments.precache_train``: the loss, the schedules, the plateau
rule, the baselines and the R^2 probes of sin(freq x_{n-i}) from the state at n.
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
from collide.experiments.precache_train import (LOSSES, SCHEDULES, VAL_SEQUENCES, WEIGHT_DECAY, Plateau, evaluate,
                                               lr_factor)

log = logging.getLogger(__name__)

SCHEMA = "collide-precache/2"
MODES = ("vanilla", "myopic")
MYOPIC = ("residual", "full")  # how myopic training cuts the past (module docstring)
TASKS = {"paper": 1.0, "breadcrumb": 0.5}  # task -> its default p (paper: the authors' training notebook)


def task_p(cfg: PrecacheConfig) -> float:
    """P(z_n = 1): ``cfg.p``, or the task's default when it is None."""
    return TASKS.get(cfg.task, 0.5) if cfg.p is None else cfg.p


def make_batch(n: int, cfg: PrecacheConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """n sequences on the generator's device: inputs (n, seq_len, 2) = (x, z), target y (n, seq_len), x, z,
    sin(freq x) (n, seq_len) and ``current``, E[y_n | x_n, z_n] (the best prediction from the current input)."""
    device = generator.device
    x = torch.randn(n, cfg.seq_len, generator=generator, device=device)
    z = (torch.rand(n, cfg.seq_len, generator=generator, device=device) < task_p(cfg)).float()
    s = torch.sin(cfg.freq * x)
    c = s.cumsum(1)
    window_sum = c.clone()  # window_sum[n] = sum of s_j, j = n-window+1 .. n
    window_sum[:, cfg.window:] -= c[:, :-cfg.window]
    if cfg.task == "paper":  # j = n-window .. n-1: the same window shifted by one position
        window_sum = torch.cat([torch.zeros(n, 1, device=device), window_sum[:, :-1]], 1)
        current = (1 - z) * x
    else:
        current = z * s + (1 - z) * x
    y = z * window_sum + (1 - z) * x
    return {"inputs": torch.stack([x, z], -1), "y": y, "x": x, "z": z, "sin": s, "current": current}


class Block(nn.Module):
    """A pre-LayerNorm GPT-2 block with ReLU. ``forward(h, myopic)``: myopic None = vanilla, "residual" or
    "full" = the past's keys and values cut as the module docstring says."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)  # (b, heads, n, d_head)

    def attention(self, h: torch.Tensor, myopic: str | None = None) -> torch.Tensor:
        q, k, v = map(self._heads, self.qkv(self.ln1(h)).chunk(3, dim=-1))
        b, n = h.shape[:2]
        scale = 1.0 / math.sqrt(q.shape[-1])
        causal = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()
        if not myopic:
            weights = (q @ k.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf")).softmax(-1)
            out = weights @ v
        else:
            if myopic == "full":
                k_past, v_past = k.detach(), v.detach()
            else:  # residual: k and v of the past recomputed from the residual stream's stop-gradient copy
                d = h.shape[-1]
                kv = nn.functional.linear(self.ln1(h.detach()), self.qkv.weight[d:], self.qkv.bias[d:])
                k_past, v_past = map(self._heads, kv.chunk(2, dim=-1))
            eye = torch.eye(n, dtype=torch.bool, device=h.device)
            scores = q @ k_past.transpose(-1, -2) * scale  # scores[i, j] = q_i . k_j, k_j the past copy
            scores = torch.where(eye, ((q * k).sum(-1) * scale).unsqueeze(-1), scores)  # j = i: the live key
            weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            out = weights.masked_fill(eye, 0.0) @ v_past + weights.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * v
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))

    def forward(self, h: torch.Tensor, myopic: str | None = None) -> torch.Tensor:
        h = h + self.attention(h, myopic)
        return h + self.mlp(self.ln2(h))


class TinyGPT(nn.Module):
    """(x_n, z_n) -> y_n through ``n_layers`` GPT-2 blocks; ``forward`` also returns every layer's states.
    ``myopic``: None (vanilla training) or how the past is cut, "residual" or "full"."""

    def __init__(self, cfg: PrecacheConfig, myopic: str | None):
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


def train(cfg: PrecacheConfig, mode: str) -> tuple[torch.nn.Module, list[dict], str]:
    """One model trained on fresh seeded batches (module docstring); ``mode``: vanilla or myopic.

    Returns the model, its curve (per ``eval_every`` steps: step, mean training loss, validation loss,
    the validation sequences' trivial loss, learning rate) and why training stopped: "plateau",
    "steps" or "cpu_seconds"."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = TinyGPT(cfg, myopic=cfg.myopic if mode == "myopic" else None).to(device)
    generator = torch.Generator(device).manual_seed(cfg.seed + 1)
    val = make_batch(VAL_SEQUENCES, cfg, torch.Generator(device).manual_seed(cfg.seed + 3))
    loss_fn = LOSSES[cfg.loss]
    val_trivial = float(loss_fn(torch.full_like(val["y"], float(val["y"].mean())), val["y"]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=WEIGHT_DECAY)
    rule = Plateau(cfg.patience, cfg.min_delta, cfg.decays, cfg.min_steps)
    curve, running, since, halving, stopped = [], torch.zeros((), device=device), 0, 1.0, "steps"
    c0 = time.process_time()
    for step in range(cfg.steps):
        lr = cfg.lr * lr_factor(step, cfg) * halving
        for group in opt.param_groups:
            group["lr"] = lr
        batch = make_batch(cfg.batch_size, cfg, generator)
        loss = loss_fn(model(batch["inputs"])[0], batch["y"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running, since = running + loss.detach(), since + 1  # summed on the device: no sync per step
        if (step + 1) % cfg.eval_every and step + 1 < cfg.steps:
            continue
        with torch.no_grad():
            val_loss = float(loss_fn(model(val["inputs"])[0], val["y"]))
        curve.append({"step": step + 1, "train_loss": float(running) / since, "val_loss": val_loss,
                      "val_trivial": val_trivial, "lr": lr})
        running, since = torch.zeros((), device=device), 0
        if len(curve) % 10 == 0:
            log.info("%s: step %d, train loss %.4f, validation loss %.4f (trivial %.4f), lr %.2g", mode, step + 1,
                     curve[-1]["train_loss"], val_loss, val_trivial, lr)
        if cfg.schedule == "plateau":
            answer = rule.update(step + 1, val_loss, val_trivial)
            if answer == "stop":
                stopped = "plateau"
                break
            halving *= 0.5 if answer == "halve" else 1.0
        if time.process_time() - c0 > cfg.max_cpu_seconds:
            stopped = "cpu_seconds"
            break
    return model, curve, stopped


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
    for key, choices in (("myopic", MYOPIC), ("loss", tuple(LOSSES)), ("schedule", SCHEDULES)):
        if getattr(cfg, key) not in choices:
            raise CollideError(f"{key}={getattr(cfg, key)}: choose among {list(choices)}, e.g. {key}={choices[0]}")
    require(cfg, {
        "freq": (math.isfinite(cfg.freq) and cfg.freq > 0, "a positive frequency, e.g. freq=10"),
        "d_model": (cfg.d_model >= 1, ">= 1, e.g. d_model=128"),
        "n_layers": (cfg.n_layers >= 1, ">= 1, e.g. n_layers=2"),
        "n_heads": (cfg.n_heads >= 1 and cfg.d_model % cfg.n_heads == 0,
                    f">= 1 and divide d_model={cfg.d_model}, e.g. d_model=128 n_heads=2"),
        "lr": (math.isfinite(cfg.lr) and cfg.lr > 0, "a positive learning rate, e.g. lr=1e-3"),
        "max_cpu_seconds": (cfg.max_cpu_seconds > 0, "positive CPU seconds, e.g. max_cpu_seconds=600"),
        "min_delta": (math.isfinite(cfg.min_delta) and cfg.min_delta >= 0, "a relative improvement >= 0, e.g. "
                      "min_delta=0.01"),
        "min_steps": (cfg.min_steps >= 0, ">= 0 steps, e.g. min_steps=2000"),
        "threads": (cfg.threads >= 0, ">= 0 (0 = torch's default), e.g. threads=1"),
        "seed": (cfg.seed >= 0, ">= 0, e.g. seed=0"),
        "device": (device_ok(cfg.device), "a torch device this machine has, e.g. device=cpu (or cuda with a GPU)"),
    })


def device_ok(name: str) -> bool:
    """Whether torch can run on device ``name`` here (cpu, or cuda[:i] with that GPU present)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    return device.type == "cpu"


def require(cfg, rules: dict[str, tuple[bool, str]]) -> None:
    """CollideError naming the first key of ``cfg`` whose rule fails; ``rules``: {key: (holds, "what it must be")}."""
    for key, (holds, rule) in rules.items():
        if not holds:
            raise CollideError(f"{key}={getattr(cfg, key)} must be {rule}")


def run_experiment(cfg: PrecacheConfig, command: str | None = None) -> dict:
    """Train every mode, evaluate and probe it; write precache.json, precache.md and the figure.

    ``cfg.threads`` applies for the call only (torch's thread count is restored after it);
    ``command``, the command line that asked for it, is recorded in precache.json.
    """
    check(cfg)
    with torch_threads(cfg.threads):
        return _run(cfg, command)


def train_flops(cfg: PrecacheConfig, mode: str) -> float:
    """Training FLOPs per sequence: 3 x the forward pass's matrix products (backward = 2 x forward).

    Per position and block, forward FLOPs (2 per multiply-add): 24 d^2 (qkv 6 d^2, output projection
    2 d^2, MLP 16 d^2) and 4 seq_len d (scores and mixing over the full seq_len x seq_len square); myopic
    ``residual`` adds 4 d^2 (the past's keys and values recomputed). The input and output layers (6 d)
    are left out. The authors' run: 30M sequences x 1.6e8 = 4.9e15 FLOPs."""
    d, n = cfg.d_model, cfg.seq_len
    per_block = 24 * d * d + 4 * n * d + (4 * d * d if mode == "myopic" and cfg.myopic == "residual" else 0)
    return 3.0 * per_block * cfg.n_layers * n


def _run(cfg: PrecacheConfig, command: str | None) -> dict:
    from collide.experiments.precache_report import curves_figure, markdown, r2_figure

    t0, c0 = time.perf_counter(), time.process_time()
    held_out = make_batch(cfg.eval_sequences, cfg, torch.Generator(cfg.device).manual_seed(cfg.seed + 2))
    result = {"schema": SCHEMA, "command": command, "config": json.loads(json.dumps(asdict(cfg))), "p": task_p(cfg),
              "models": []}
    for mode in cfg.modes:
        t1, c1 = time.perf_counter(), time.process_time()
        model, curve, stopped = train(cfg, mode)
        steps = curve[-1]["step"]
        entry = {"mode": mode, **evaluate(model, held_out, cfg), "steps": steps, "stopped": stopped,
                 "sequences": steps * cfg.batch_size, "train_flops": steps * cfg.batch_size * train_flops(cfg, mode),
                 "curve": curve, "seconds": time.perf_counter() - t1, "cpu_seconds": time.process_time() - c1}
        result["models"].append(entry)
        log.info("%s: test loss %.4f (trivial %.4f, current input only %.4f), best R^2 at layer 1: %.2f (%.0f s)",
                 mode, entry["test_loss"], entry["trivial_loss"], entry["current_input_loss"],
                 max(entry["probes"][min(1, cfg.n_layers)]["r2"]), entry["seconds"])
    result["seconds"], result["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    figures = {"figures/precache_r2.png": lambda path: r2_figure([result], path),
               "figures/precache_curves.png": lambda path: curves_figure([result], path)} if cfg.figures else {}
    written = write_outputs(cfg.out, "precache", result, markdown(result), figures)
    log.info("wrote %s (%.0f s)", written, result["seconds"])
    return result
