"""The pieces of ``collide precache``'s training and evaluation (its loop, ``train``, is in
collide.experiments.precache): the loss, the two learning-rate schedules, the plateau rule, the test
loss against its baselines and the R^2 probes.

- **Loss.** ``huber`` (delta 1, the authors' ``nn.HuberLoss()``) or ``mse``, the mean over every
  position of every sequence.
- **Optimiser.** AdamW (weight decay 0.01 on every parameter), the gradient not clipped: the authors'.
- **Schedules** (``schedule``), both after a linear warm-up over WARMUP x ``steps`` steps, the
  learning rate set before each step:
  - ``cosine``: the authors' (HF ``get_cosine_schedule_with_warmup``): from ``lr`` down to 0 at
    step ``steps``; the run lasts ``steps`` steps unless ``max_cpu_seconds`` ends it first.
  - ``plateau``: ``lr`` constant, halved on each plateau of the validation loss (``Plateau``).
- **Validation.** Every ``eval_every`` steps, the loss on VAL_SEQUENCES fixed sequences (their own
  seed) beside their trivial loss (predicting the mean of their y); the curve keeps both, the mean
  training loss since the previous point and the learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from collide.config import PrecacheConfig

LOSSES = {"huber": lambda p, y: F.huber_loss(p, y, delta=1.0), "mse": F.mse_loss}  # name -> loss(prediction, y)
SCHEDULES = ("plateau", "cosine")
WEIGHT_DECAY = 0.01  # AdamW's, on every parameter (the authors' `decay`)
WARMUP = 0.01  # share of the steps with a linear learning-rate warm-up (the authors')
TRIVIAL_MARGIN = 0.01  # the plateau rule waits while the validation loss is within this share of the trivial one
VAL_SEQUENCES = 256  # fixed validation sequences of the curve and the plateau rule (their own seed)
PROBE_RIDGE = 1e-6  # ridge of the R^2 probes, times the mean eigenvalue of their Gram matrix (numerical only)


@dataclass
class Plateau:
    """The plateau rule: halve the learning rate after ``patience`` validation measurements without a
    relative gain of ``min_delta`` on the best loss so far; the ``decays``-th plateau stops training.

    The rule is held (its patience does not run) before step ``min_steps`` and while the validation
    loss is above (1 - TRIVIAL_MARGIN) x the trivial loss: a model that has not yet left the
    trivial solution is never stopped, nor its learning rate lowered, for sitting on it."""

    patience: int
    min_delta: float
    decays: int
    min_steps: int
    best: float = math.inf
    waited: int = 0
    halved: int = 0

    def update(self, step: int, loss: float, trivial: float) -> str:
        """The rule's answer after the measurement at ``step`` (steps done): "go", "halve" or "stop"."""
        if loss < self.best * (1 - self.min_delta):
            self.best, self.waited = loss, 0
            return "go"
        self.best = min(self.best, loss)
        if step < self.min_steps or loss > (1 - TRIVIAL_MARGIN) * trivial:
            return "go"
        self.waited += 1
        if self.waited < self.patience:
            return "go"
        self.waited, self.halved = 0, self.halved + 1
        return "stop" if self.halved >= self.decays else "halve"


def lr_factor(step: int, cfg: PrecacheConfig) -> float:
    """The schedule's multiplier of ``cfg.lr`` for step ``step`` (0-based), before the plateau rule's halvings."""
    warm = max(1, round(WARMUP * cfg.steps))
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))
    return 1.0


def r2_probes(states: torch.Tensor, target: torch.Tensor, max_lag: int) -> list[float]:
    """R^2 of target_{n-i}, i = 0..max_lag, from states (b, n, d) at positions n >= max_lag.

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
    gram += PROBE_RIDGE * gram.diagonal().mean() * torch.eye(d, dtype=gram.dtype, device=gram.device)
    out = []
    for lag in range(max_lag + 1):
        t = target[:, max_lag - lag: n - lag].double()
        t_fit, t_score = t[:half].reshape(-1), t[half:].reshape(-1)
        w = torch.linalg.solve(gram, fit.T @ (t_fit - t_fit.mean()))
        residual = t_score - (score @ w + t_fit.mean())
        out.append(float(1 - residual.pow(2).sum() / (t_score - t_score.mean()).pow(2).sum()))
    return out


def evaluate(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: PrecacheConfig) -> dict:
    """Test loss against the baselines (in ``cfg.loss``), and the R^2 probes of every layer, on held-out
    sequences: the trivial loss predicts the mean of y; the current-input one predicts E[y_n | x_n, z_n]."""
    loss_fn = LOSSES[cfg.loss]
    with torch.no_grad():
        prediction, states = model(batch["inputs"])
    y = batch["y"]
    test = float(loss_fn(prediction, y))
    trivial = float(loss_fn(torch.full_like(y, float(y.mean())), y))
    current = float(loss_fn(batch["current"], y))
    return {"test_loss": test, "trivial_loss": trivial, "current_input_loss": current,
            "normalised_loss": test / trivial, "loss_vs_current_input": test / current,
            "probes": [{"layer": k, "r2": r2_probes(h, batch["sin"], cfg.max_lag)} for k, h in enumerate(states)]}
