"""SIPIT, position by position: propose candidate tokens with a policy, verify them in batches, accept within ε.

The state at position t of layer k depends only on tokens 0..t (causality), so a prompt is
recovered left to right (arXiv 2510.15511, Alg. 1). The recovered prefix's KV cache grows by one
token per position and is never recomputed (``collide.continuations.GrowingPrefix``); the
candidates of a position are verified B at a time in one batched single-token step against it.

Policies (which untried candidates to verify next):

* ``gradient`` (the paper's Alg. 3): a continuous proxy e for the token's input-embedding row
  starts at a random token's row; each iteration takes ``grad_steps`` steps of gradient descent
  (learning rate ``lr``, gradient clipped to L2 norm 1) on ½‖F(e) − ĥ_t‖² (L2 squared, summed
  over coordinates; F = the state at position t of prefix + e), then proposes the ``batch``
  untried tokens whose input-embedding rows are nearest to e (L2). Every ``snap_every`` SGD
  steps (the paper's K proposals: one step per proposal there) e is snapped to the nearest
  untried token's row (no gradient through the snap).
* ``random`` (the paper's Alg. 2, its brute-force baseline): a seeded random permutation of the vocabulary.
* ``exhaustive``: every token, so that the margin Δ (the distance from ĥ_t to the nearest state
  of any *other* token) is known; Δ > 2ε certifies that the recovered token is the only one within ε.
  At the position the lens bundle's table covers, the table holds every token's state: one lookup,
  one verification of the nearest, Δ from the table.
* ``auto`` (the default), ``prior``, ``lens``: rankers (``collide.invert.rankers``) order the
  vocabulary (auto: the model's next-token prior, the own-states lens and the continuation lens,
  merged by turns; prior: the prior alone; lens: the two lenses), and the order is verified in
  escalating batches (``batch_first``, 4x more each step, up to ``batch_max``). At the position the
  table covers, its order alone is used, its nearest token verified first on its own.

Acceptance (``position``): the candidates are verified in the policy's order until one lies within the
noise radius ε_noise of ĥ_t (L2, not squared, fp64: the round-off a verified true token lands in), or
until ``confirm`` more candidates after the first one within the acceptance radius ε (ε_noise plus
the quantized-activation allowance, or a user's wider ε), or until the vocabulary is spent. Every
verified candidate within ε is kept: the nearest is the position's token, the others its
alternatives. Which alternative survives is decided by the later positions
(``collide.invert.context``): a token after which a later position has no candidate within ε is
excluded. Tokens whose input-embedding rows are bitwise identical have bitwise-identical states, so
each such group is verified once, through its first token, and reported whole.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from collide.invert.config import InvertConfig
from collide.continuations import GrowingPrefix, input_groups
from collide.errors import CollideError
from collide.invert import rankers
from collide.invert.lens import Lens, load_or_fit
from collide.invert.results import Alternative, PositionResult
from collide.models import LoadedModel

RANKED = ("auto", "prior", "lens")  # policies that verify a ranked order in escalating batches
# ranked policies with lenses: a linearized ranking (rankers.linearized_order) joins in front once this many
# candidates failed (16 + 64 + 256 with the default batches), and again after 4x as many more each time
LINEARIZE_AFTER, LINEARIZE_MAX = 336, 3

# The ε rule: ε = RTOL[compute dtype] * ‖ĥ_t‖ + STORAGE_RTOL[stored dtype] * ‖ĥ_t‖ + ATOL * sqrt(d).
# fp32: a cached single-token step and the padded batched forward that wrote the states differ
# by reassociation only: measured at most 9e-7 relative (L2) on the tiny GPT-2/Llama/Gemma-3
# models at every layer and 1.5e-6 on SmolLM2 at layers 7 and 15 (docs/inversion.md); 1e-4 leaves a 68x margin
# and stays far below the relative margins between distinct tokens' states (0.2-0.8 on the tiny
# models, see tests/invert/test_invert.py). bf16/fp16: extract.BF16_RTOL, the measured bound between a
# batched and an unpadded forward in bf16, which a cached step obeys too (tests).
RTOL = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 3e-2}
# Rounding of the stored states to their storage dtype (half an ulp, relative, in L2 at most).
STORAGE_RTOL = {"fp64": 0.0, "fp32": 2.0 ** -24, "bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
ATOL = 1e-6  # per-coordinate absolute floor, for states near zero
# Quantized activations (model.quant.activations, collide/quant.py): the cached step and the batched forward
# differ by reassociation before each quantizer, which can move a value across a rounding boundary: one
# level (max|x| / 127 or / 7) at one input, and the jump cascades through the later quantizers. Measured on
# SmolLM2 (benchmarks/quant_cached_vs_batched.py, 65 positions, docs/quantization.md): int8 gaps up to
# 0.135 relative (median 0.04-0.07 at layers 15 and 30); int4 gaps of 1e-6 at 57 of 65 positions and
# 0.67-1.1 at the others, beyond any useful ε. 0.2 covers every int8 gap measured with a 1.5x margin, and
# int4 positions without a flip; an int4 position with one is reported as missed, not accepted wrongly.
# Weight quantization is applied once at load and adds nothing. Several tokens within this wider ε are
# ties, reported (PositionResult.ties), never broken silently.
QUANT_RTOL = {"none": 0.0, "int8": 0.2, "int4": 0.2}
# epsilon=auto: the noise radius is at least NOISE_FACTOR times the relative gap measured on the known rows of
# SOURCE (collide.invert.locate: the BOS state, the table's nearest) between SOURCE and this model's own forward.
# Later positions add attention over more tokens to that gap; measured on SmolLM2 bf16 dumps (docs/inversion.md).
NOISE_FACTOR = 4.0


def radii(norm: float, d: int, compute: str, stored: str, activations: str = "none", fixed: Optional[float] = None,
          noise: Optional[float] = None) -> tuple[float, float]:
    """(ε, ε_noise), L2 not squared, for a target of L2 norm ``norm`` and width d.

    ε_noise = max(RTOL[compute] + STORAGE_RTOL[stored], NOISE_FACTOR * noise) * norm + ATOL * sqrt(d): the
    round-off a verified true token lands in (``noise``: the relative gap measured on SOURCE's known rows, or
    None). ε = ε_noise + QUANT_RTOL[activations] * norm: the acceptance radius. A ``fixed`` ε replaces ε, and
    ε_noise is then min(fixed, ε_noise)."""
    rtol = RTOL[compute] + STORAGE_RTOL.get(stored, STORAGE_RTOL["fp32"])
    if noise is not None:
        rtol = max(rtol, NOISE_FACTOR * float(noise))
    eps_noise = rtol * norm + ATOL * math.sqrt(d)
    eps = eps_noise + QUANT_RTOL.get(str(activations), 0.0) * norm
    if fixed is not None:
        return float(fixed), min(float(fixed), eps_noise)
    return eps, eps_noise


def epsilon_rule(norm: float, d: int, compute: str, stored: str, activations: str = "none") -> float:
    """ε (L2, not squared) for a target of L2 norm ``norm`` and width d, computed by a forward whose linear
    inputs are quantized to ``activations`` (none | int8 | int4); see RTOL and QUANT_RTOL for the numbers."""
    return radii(norm, d, compute, stored, activations)[0]


def epsilon_choice(value) -> tuple[str, Optional[float]]:
    """``epsilon=``: ("auto", None), ("rule", None) or ("fixed", ε > 0)."""
    if value is None or str(value) in ("auto", "rule"):
        return ("rule" if str(value) == "rule" else "auto"), None
    try:
        eps = float(str(value))
    except ValueError:
        eps = float("nan")
    if not eps > 0 or not np.isfinite(eps):
        raise CollideError(f"epsilon={value!r} is not a positive L2 radius; pass epsilon=auto, epsilon=rule or a "
                           "number such as epsilon=0.5")
    return "fixed", eps


@dataclass
class Inverter:
    """Inverts the states of one layer of one model, prompt after prompt."""

    lm: LoadedModel
    layer: int  # HF hidden_states index of the states (0 = embeddings, L = last, see lm.final_norm)
    cfg: InvertConfig  # policy, batches, confirm, backtrack, gradient settings, seed (the other keys are not read here)
    stored_dtype: str = "fp32"  # dtype the targets were stored in (enters ε)
    epsilon: Optional[float] = None  # a fixed ε (L2) instead of the rule; None = cfg.epsilon's
    bos: Optional[int] = None  # the tokenizer's BOS when it prepends one: verified first at position 0
    lens: Optional[Lens] = None  # the lens bundle (auto, prior, lens, exhaustive); None = cached or fit on first use
    noise: Optional[float] = None  # relative gap measured on SOURCE's known rows (epsilon=auto); None = the rule's

    def __post_init__(self):
        if self.epsilon is None:
            self.epsilon = epsilon_choice(self.cfg.epsilon)[1]
        emb = self.lm.model.get_input_embeddings()
        self.rows = emb.weight.detach().float()  # (V, d) input-embedding rows, the proxy's space
        self.embed_scale = float(getattr(emb, "embed_scale", 1.0))  # Gemma multiplies rows by sqrt(d)
        self.sq_norms = (self.rows ** 2).sum(dim=1)
        first, group = input_groups(self.lm, np.arange(len(self.rows)))
        self.group_of = group  # (V,) group number of each token
        self.first_of_group = first  # (g,) first token of each group
        self.duplicate = torch.ones(len(self.rows), dtype=torch.bool, device=self.rows.device)
        self.duplicate[torch.as_tensor(first, device=self.rows.device)] = False  # verified through the first
        self.members: dict[int, list[int]] = {}
        if len(first) < len(group):
            sizes = np.bincount(group)
            for token in np.nonzero(sizes[group] > 1)[0].tolist():
                self.members.setdefault(int(first[group[token]]), []).append(token)
        if self.lens is None and (self.cfg.policy in RANKED or self.cfg.policy == "exhaustive"):
            self.lens = load_or_fit(self.lm, self.layer, self.cfg.lens, [] if self.bos is None else [self.bos])
        self.rows_cpu = self.rows.cpu()
        self.sq_norms_cpu = self.sq_norms.cpu()
        self.largest = rankers.largest_batch(self.lm, self.cfg.batch_max)

    @property
    def vocab(self) -> int:
        return len(self.rows)

    @property
    def n_distinct(self) -> int:
        """Distinct input rows: the candidates a position can have."""
        return len(self.first_of_group)

    def group(self, token: int) -> list[int]:
        return self.members.get(int(self.first_of_group[self.group_of[token]]), [int(token)])

    def radii(self, target: torch.Tensor) -> tuple[float, float]:
        """(ε, ε_noise) for ``target`` (d,): ``radii`` with this model's dtype, quantization and SOURCE's noise."""
        activations = (getattr(self.lm, "quant", None) or {}).get("activations", "none")
        return radii(float(target.norm()), target.shape[0], self.lm.dtype, self.stored_dtype, activations,
                     self.epsilon, self.noise)

    # ----------------------------------------------------------------- verification

    def _distances(self, prefix: GrowingPrefix, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """fp64 L2 distances from ``target`` (d,) fp64 CPU to the states of prefix+t for t in ``tokens``."""
        states = prefix.states(tokens.to(self.lm.device), [self.layer])[self.layer]
        return (states.double().cpu() - target).norm(dim=1)

    # ----------------------------------------------------------------- policies

    def _random_batches(self, tried: torch.Tensor, rng: np.random.Generator):
        order = rng.permutation(np.nonzero(~tried.cpu().numpy())[0])
        for lo in range(0, len(order), self.cfg.batch):
            yield torch.as_tensor(order[lo:lo + self.cfg.batch])

    def _gradient_batches(self, prefix: GrowingPrefix, tried: torch.Tensor, target: torch.Tensor,
                          rng: np.random.Generator):
        cfg, rows = self.cfg, self.rows
        goal = target.to(self.lm.device, torch.float32)
        e = rows[int(self.first_of_group[rng.integers(self.n_distinct)])].clone()
        steps = 0
        while not bool(tried.all()):
            for _ in range(cfg.grad_steps):
                steps += 1
                e.requires_grad_(True)
                state = prefix.embeds_state(e * self.embed_scale, self.layer).float()
                loss = 0.5 * ((state - goal) ** 2).sum()
                (grad,) = torch.autograd.grad(loss, e)
                norm = float(grad.norm())
                if not math.isfinite(norm):
                    break  # a degenerate proxy: propose from where it is
                e = (e - cfg.lr * grad / max(norm, 1.0)).detach()
            e = e.detach()
            scores = self.sq_norms - 2.0 * (rows @ e)  # ‖row − e‖² − ‖e‖²
            scores[tried] = math.inf
            n = min(cfg.batch, int((~tried).sum()))
            batch = torch.topk(scores, n, largest=False).indices
            yield batch
            if steps >= cfg.snap_every and not bool(tried.all()):
                scores[batch] = math.inf
                e = rows[int(scores.argmin())].clone()
                steps = 0

    def _table_applies(self, prefix: GrowingPrefix) -> bool:
        return self.lens is not None and self.lens.table is not None and prefix.ids == self.lens.prefix

    def _ranked_batches(self, prefix: GrowingPrefix, tried: torch.Tensor, target: torch.Tensor, eps: float,
                        best: list):
        """The policy's merged order of the untried tokens, in escalating batches (see the module docstring). At the
        table's position the first batch holds every token whose table state lies within ε (at least the nearest).
        With the lenses (auto, lens), once LINEARIZE_AFTER candidates failed a linearized ranking joins in front
        (around the own lens's prediction), and again around the best verified candidate each time 4x as many
        failed, up to LINEARIZE_MAX times; ``best`` ([(distance, token)]) holds the position's best so far."""
        policy, first = self.cfg.policy, self.cfg.batch_first
        if self._table_applies(prefix):
            order, dist = rankers.table_order(self.lens, target)
            orders, first = [order], max(1, int((dist <= eps).sum()))
        else:
            prior = rankers.prior_order(self.lm, prefix) if policy in ("auto", "prior") else None
            lenses = [rankers.lens_order(r, target, self.rows_cpu, self.sq_norms_cpu, cosine=r is self.lens.own)
                      for r in (self.lens.own, self.lens.cont)] if policy != "prior" or prior is None else []
            orders = ([] if prior is None else [prior[prior < self.vocab]]) + lenses
        if len(orders) > 1:  # tokens no order lists (an LM head narrower than the input rows): never, but last
            rest = torch.ones(self.vocab, dtype=torch.bool)
            for order in orders:
                rest[order] = False
            orders.append(torch.nonzero(rest).flatten())
        linearize = policy in ("auto", "lens") and not self._table_applies(prefix)
        stream, done, lines = rankers.batches(rankers.merge(orders, tried.cpu().clone()), first, self.largest), 0, []
        while True:
            for batch in stream:
                yield batch
                done += len(batch)
                if linearize and len(lines) < LINEARIZE_MAX and done >= LINEARIZE_AFTER * 4 ** len(lines):
                    break
            else:
                return
            e0 = self.lens.own.predict(target) if not lines else self.rows[best[0][1]]
            lines.insert(0, rankers.linearized_order(prefix, self.layer, e0, target, self.rows, self.embed_scale))
            stream = rankers.batches(rankers.merge(lines + orders, tried.cpu().clone()), 4 * first, self.largest)

    def _batches(self, prefix: GrowingPrefix, tried: torch.Tensor, target: torch.Tensor, eps: float,
                 rng: np.random.Generator, best: list):
        policy = self.cfg.policy
        if policy == "gradient":
            return self._gradient_batches(prefix, tried, target, rng)
        if policy in RANKED or (policy == "exhaustive" and self._table_applies(prefix)):
            return self._ranked_batches(prefix, tried, target, eps, best)
        return self._random_batches(tried, rng)

    # ----------------------------------------------------------------- one position

    def position(self, prefix: GrowingPrefix, t: int, target_np: np.ndarray, rng: np.random.Generator
                 ) -> PositionResult:
        """Recover the token at position ``t`` = len(prefix.ids) from its target state (d,).

        Verifies candidates until one lies within ε_noise, or ``confirm`` candidates after the first within ε,
        or every token (policy exhaustive, or no candidate within ε); see the module docstring."""
        t0 = time.perf_counter()
        target = torch.from_numpy(np.asarray(target_np, dtype=np.float64))
        eps, eps_noise = self.radii(target)
        exhaustive = self.cfg.policy == "exhaustive"
        tried = self.duplicate.clone()
        seen: dict[int, float] = {}  # verified tokens within ε -> distance
        best, second = (math.inf, -1), math.inf  # the closest candidate so far; the smallest distance among the others
        known = False
        if t == 0 and self.bos is not None:
            first = int(self.first_of_group[self.group_of[self.bos]])
            dist = float(self._distances(prefix, torch.tensor([self.bos]), target)[0])
            tried[first] = True
            best = (dist, first)
            known = dist <= eps
        table = self._table_applies(prefix)
        left = None  # candidates still to verify after the first within ε (``confirm``)
        margin = None
        if (not known or exhaustive) and not bool(tried.all()):
            box = [best]  # the ranked policies re-linearize around the best candidate so far
            for batch in self._batches(prefix, tried, target, eps, rng, box):
                tried[batch] = True
                dist = self._distances(prefix, batch, target)
                seen.update((int(tok), float(d)) for tok, d in zip(batch.tolist(), dist.tolist()) if d <= eps)
                i = int(dist.argmin())
                if float(dist[i]) < best[0]:
                    second = min(second, best[0])
                    best = box[0] = (float(dist[i]), int(batch[i]))
                    dist[i] = math.inf
                second = min(second, float(dist.min())) if len(dist) else second
                if exhaustive and table and best[0] <= eps:  # every other token's state is in the table: Δ from it
                    second = margin = self._table_margin(target, tried, None if math.isinf(second) else second)
                    tried[:] = True
                    break
                if exhaustive:
                    continue
                if best[0] <= eps_noise:
                    break
                if best[0] <= eps:
                    left = (math.inf if self.cfg.confirm is None else self.cfg.confirm) if left is None \
                        else left - len(batch)
                    if left <= 0:
                        break
        n_tried = int((~self.duplicate & tried).sum())
        token, recovered = best[1], best[0] <= eps
        alternatives = sorted((Alternative(tok, d) for tok, d in seen.items() if tok != token),
                              key=lambda a: a.distance) if recovered else []
        result = PositionResult(position=t, token=token, group=self.group(token), recovered=recovered,
                                distance=best[0], epsilon=eps, tried=n_tried,
                                best_rejected=None if math.isinf(second) else second, known=known,
                                epsilon_noise=eps_noise, alternatives=alternatives)
        if exhaustive:
            result.margin = result.best_rejected if margin is None else margin
            result.certified = result.recovered and result.margin is not None and result.margin > 2 * eps
        result.seconds = time.perf_counter() - t0
        return result

    def _table_margin(self, target: torch.Tensor, tried: torch.Tensor, best_rejected: Optional[float]) -> float:
        """Δ at the table's position: the nearest untried table state, or the best rejected verified one."""
        tokens, dist = rankers.table_order(self.lens, target)
        untried = ~tried.cpu()[tokens]
        rest = float(dist[untried][0]) if bool(untried.any()) else math.inf
        return min(rest, math.inf if best_rejected is None else best_rejected)

    # ----------------------------------------------------------------- one prompt

    def invert(self, states: np.ndarray, stop_on_miss: bool = True, progress=None) -> list[PositionResult]:
        """Recover a prompt from its (T, d) states, left to right, alternatives decided by the later positions
        (``collide.invert.context.invert_prompt``).

        A position with no candidate within ε is returned with ``recovered=False`` and its best candidate;
        then the prompt stops there (``stop_on_miss``) or continues with that candidate.
        """
        from collide.invert.context import invert_prompt

        return invert_prompt(self, states, stop_on_miss, progress)
