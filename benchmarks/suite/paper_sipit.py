"""The paper's SIPIT as its authors' code runs it, kept as the baseline that ``collide.invert`` is timed against.

Re-implemented from the description in ``docs/inversion.md`` (arXiv 2510.15511 Alg. 1 and 3,
the authors' ``SIPIT.py``): at each position, a continuous proxy starts at a random token's
embedding row; each iteration is one SGD step (lr 1.0, gradient clipped at norm 1) on the
coordinate-mean squared error between the proxy's state and the target, computed by a forward
and a backward pass over the *whole* prefix with no KV cache; it proposes the one untried token
whose row is nearest to the proxy (tried rows masked with +inf), checks it with a third forward
pass over the whole prefix and ``torch.allclose(pred, target, rtol=1e-5, atol=1e-5)``; every
K proposals (50·(1 + |V| // 25000) at the first position, 50 after) the proxy snaps to the
nearest untried row. At most |V| proposals per position.

Nothing of collide's engine is used (no cache, no batching, no ε rule, no identical-row
groups): it is the reference for speed, not a tool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from collide.models import LoadedModel, capture_layers, last_token_states


@dataclass
class PaperPosition:
    """One position of the baseline: the accepted token (None if |V| proposals failed) and its cost."""

    token: int | None  # the first proposal that passed allclose, or None
    proposals: int  # candidates proposed (each: forward + backward + forward over the whole prefix)
    seconds: float  # wall time


def _state(lm: LoadedModel, embeds: torch.Tensor, layer: int) -> torch.Tensor:
    """(d,) state at ``layer`` of the last position of ``embeds`` (1, T, d) run from scratch, with grad."""
    return capture_layers(lm, [layer], lambda hidden: hidden[0, -1],
                          lambda: lm.decoder(inputs_embeds=embeds, use_cache=False))[layer]


def invert_position(lm: LoadedModel, prefix: list[int], target: np.ndarray, layer: int,
                    rng: np.random.Generator, max_proposals: int | None = None) -> PaperPosition:
    """The paper's gradient policy and verifier at one position (``max_proposals`` caps it for benchmarks)."""
    t0 = time.perf_counter()
    emb = lm.model.get_input_embeddings()
    rows = emb.weight.detach().float()
    scale = float(getattr(emb, "embed_scale", 1.0))
    vocab = len(rows)
    masked = rows.clone()  # tried rows become +inf, as the authors' code does
    goal = torch.as_tensor(target, dtype=torch.float32)
    head = (rows[torch.tensor(prefix, dtype=torch.long)] * scale)[None] if prefix else rows[:0][None]
    e = rows[int(rng.integers(vocab))].clone().requires_grad_(True)
    opt = torch.optim.SGD([e], lr=1.0)
    snap = 50 * (1 + vocab // 25000) if not prefix else 50
    limit = vocab if max_proposals is None else min(vocab, max_proposals)
    for n in range(1, limit + 1):
        with torch.enable_grad():
            opt.zero_grad()
            state = _state(lm, torch.cat([head, (e * scale)[None, None]], dim=1), layer).float()
            loss = torch.nn.functional.mse_loss(state, goal)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([e], 1.0)
            opt.step()
        with torch.no_grad():
            token = int(((masked - e) ** 2).sum(dim=1).argmin())
            ids = torch.tensor([prefix + [token]], dtype=torch.long, device=lm.device)
            pred = last_token_states(lm, ids, torch.ones_like(ids), [layer])[layer][0].float()
            if torch.allclose(pred, goal, rtol=1e-5, atol=1e-5):
                return PaperPosition(token, n, time.perf_counter() - t0)
            masked[token] = float("inf")
            if n % snap == 0:
                e.data.copy_(rows[int(((masked - e) ** 2).sum(dim=1).argmin())])
    return PaperPosition(None, limit, time.perf_counter() - t0)


def invert_prompt(lm: LoadedModel, states: np.ndarray, layer: int, seed: int = 0, n_positions: int | None = None,
                  max_proposals: int | None = None) -> list[PaperPosition]:
    """The baseline over the first ``n_positions`` positions of a (T, d) prompt (the true prefix is not given:
    each accepted token extends it, as in the paper). Stops at a position that fails."""
    rng, prefix, out = np.random.default_rng(seed), [], []
    for t in range(len(states) if n_positions is None else min(n_positions, len(states))):
        res = invert_position(lm, prefix, states[t], layer, rng, max_proposals)
        out.append(res)
        if res.token is None:
            break
        prefix.append(res.token)
    return out
