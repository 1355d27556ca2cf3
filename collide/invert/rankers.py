"""Rankers of ``collide invert``: orders of the vocabulary, best candidate first, merged into one.

A ranker only orders the candidates; every candidate is still verified exactly (``collide.invert.sipit``),
so a ranker changes how many candidates are verified before the accepted one, never which is accepted.

* ``prior``: the model's own next-token distribution given the recovered prefix (the LM head
  applied to the decoder's output at the prefix's last token, which ``GrowingPrefix.append``
  computes anyway), most probable first. None at position 0 (no prefix).
* ``lens`` / ``cont``: a ridge lens (``collide.invert.lens``) predicts the input-embedding row of
  the token from the target state ĥ_t; the own-states lens ranks rows by cosine similarity to the
  prediction, the continuation lens by L2 distance (the better of the two measured for each, see
  ``benchmarks/results/2026-12-03-invert.md``).
* ``table``: at the position the lens bundle's table covers, the exact state of every token is
  known: rows whose table state is nearest (L2) to ĥ_t first. The true token comes first, at a
  distance of round-off.

* ``linearized``: the state at the layer as a function of the input-embedding row e, to first order around
  a point e0: s(e) ≈ s(e0) + J (e − e0), J = ∂s/∂e at e0 (forward-mode, one batched pass of d tangents
  through ``GrowingPrefix.embeds_state``); tokens by the L2 distance from ĥ_t to their predicted state,
  nearest first. It ranks the rare tokens the other rankers miss (names, identifiers): on SmolLM2 at L/2,
  positions the others put past rank 150 had the true token at median rank 5 (from the own lens's
  prediction). It costs about one batch of d candidates, so the ranked policies call it only after the
  first candidates failed (``collide.invert.sipit``).

``merge`` interleaves rankers: they take turns, each contributing its next best token not
already contributed or tried (a round robin without repeats), lazily. ``batches`` cuts the
merged stream into escalating batches (first, 4·first, 16·first, ... up to ``largest``).
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from collide.continuations import GrowingPrefix
from collide.invert.lens import Lens, Ridge
from collide.models import LoadedModel

CPU_BATCH, GPU_BATCH = 1024, 8192  # largest verification batch by device: the cost per candidate flattens there


def largest_batch(lm: LoadedModel, configured: Optional[int]) -> int:
    """``configured``, or the step size for the device: 1024 candidates per step on a CPU, 8192 on a GPU."""
    if configured is not None:
        return int(configured)
    return CPU_BATCH if lm.device.type == "cpu" else GPU_BATCH


def prior_order(lm: LoadedModel, prefix: GrowingPrefix) -> Optional[torch.Tensor]:
    """(V,) token ids by the model's next-token logit after ``prefix``, highest first; None for an empty prefix."""
    if not prefix.ids or prefix.last_hidden is None:
        return None
    head = lm.model.get_output_embeddings()
    with torch.no_grad():
        logits = head(prefix.last_hidden[None].to(head.weight.dtype))[0].float().cpu()
    return torch.argsort(logits, descending=True)


def nearest_rows(rows: torch.Tensor, sq_norms: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """(V,) token ids by L2 distance from ``point`` (d,) to their input-embedding ``rows`` (V, d), nearest first."""
    return torch.argsort(sq_norms - 2.0 * (rows @ point.float()))


def lens_order(ridge: Ridge, target: torch.Tensor, rows: torch.Tensor, sq_norms: torch.Tensor,
               cosine: bool = False) -> torch.Tensor:
    """(V,) token ids by L2 distance of their rows to the lens's prediction from ``target`` (d,), nearest first;
    ``cosine``: by cosine similarity instead, highest first (blind to the rows' norms)."""
    pred = ridge.predict(target)
    if cosine:
        return torch.argsort((rows @ pred) / sq_norms.sqrt().clamp(min=1e-30), descending=True)
    return nearest_rows(rows, sq_norms, pred)


def linearized_order(prefix: GrowingPrefix, layer: int, e0: torch.Tensor, target: torch.Tensor, rows: torch.Tensor,
                     embed_scale: float = 1.0) -> torch.Tensor:
    """(V,) token ids by ‖s(e0) + J (row − e0) − ``target``‖ (L2), nearest first: each token's state at ``layer``
    after ``prefix`` predicted to first order around the input-embedding row ``e0`` (d,). ``rows`` (V, d) are
    the input-embedding rows on the model's device; the model's input is row · ``embed_scale``."""
    e0 = e0.detach().to(rows.device, torch.float32).clone()  # a view of ``rows`` would give every tangent (V, d)
    with torch.no_grad():
        state = prefix.embeds_state(e0 * embed_scale, layer).float()
    jac = torch.func.jacfwd(lambda e: prefix.embeds_state(e * embed_scale, layer).float())(e0)  # (d_out, d_in)
    goal = target.to(rows.device, torch.float32) - state + jac @ e0  # ‖J row − goal‖ is the predicted distance
    pred = rows @ jac.T
    return torch.argsort(((pred - goal) ** 2).sum(dim=1)).cpu()


def table_distances(lens: Lens, target: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """(g,) fp64 L2 distances from ``target`` (d,) to every table state (fp64 arithmetic on the fp32 states)."""
    goal = target.double()[None]
    return torch.cat([(lens.table[lo:lo + chunk].double() - goal).norm(dim=1)
                      for lo in range(0, len(lens.table), chunk)])


def table_order(lens: Lens, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids by table distance to ``target``, nearest first; their distances, fp64)."""
    dist = table_distances(lens, target)
    order = torch.argsort(dist)
    return lens.table_tokens[order], dist[order]


def merge(orders: list[torch.Tensor], skip: torch.Tensor) -> Iterator[int]:
    """Token ids from several orders by turns (a round robin): each ranker in turn gives its best token not yet
    given and not in ``skip`` ((V,) bool, e.g. the tried tokens), until every order is spent. Lazy: the work
    is proportional to the tokens taken."""
    taken = skip.clone()
    lists = [order.tolist() for order in orders] if len(orders) > 1 else None
    if lists is None:
        for token in orders[0][~taken[orders[0]]].tolist() if orders else []:
            yield token
        return
    heads = [0] * len(lists)
    live = list(range(len(lists)))
    while live:
        for r in list(live):
            order, k = lists[r], heads[r]
            while k < len(order) and taken[order[k]]:
                k += 1
            if k == len(order):
                live.remove(r)
                continue
            heads[r] = k + 1
            taken[order[k]] = True
            yield order[k]


def batches(tokens: Iterator[int], first: int, largest: int) -> Iterator[torch.Tensor]:
    """Consecutive runs of ``tokens`` of sizes first, 4·first, 16·first, ... capped at ``largest``, as (b,) int64."""
    size = max(1, min(first, largest))
    while True:
        batch = [t for _, t in zip(range(size), tokens)]
        if not batch:
            return
        yield torch.tensor(batch, dtype=torch.long)
        size = min(4 * size, largest)
