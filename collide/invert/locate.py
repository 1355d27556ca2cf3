"""Which layer and norm convention a dump of states comes from, and how far its states are from this model's own.

A state at position 0 depends only on the token there, and at position 1 only on the first two. When the
tokenizer prepends a BOS, every prompt's row 0 is the BOS's state at the dump's layer: one forward of the
BOS through every block gives its state at each layer k = 0..L (HF ``hidden_states[k]``), and at layer L
both before (``pre``) and after (``post``) the final norm. The (layer, norm) whose state is nearest to the
dump's row 0 (relative L2: distance / ‖state‖, the largest over the first prompts) is the answer when it is
within ``MATCH_RTOL`` and every other (layer, norm) is at least ``SEPARATION`` times farther.

A BOS state can be nearly the same at many layers (SmolLM2's BOS carries a massive activation from layer 12
to 27: adjacent layers differ by 0.08% of its norm, less than bf16 rounding). Then, and when there is no
BOS, the next row decides: the states of every token at position 1 after the BOS (or at position 0) are
computed at the layers still in question (the model's prior after the BOS first), and the (layer, norm)
where the dump's rows have the nearest state wins, under the same two thresholds. Below layer L the two
norm conventions give the same states; ``post`` is then reported.

The matched distance is the dump's noise against this model's forward on a known input (``Location.noise``,
relative): ``epsilon=auto`` widens the noise radius to ``NOISE_FACTOR`` times it (``collide.invert.sipit``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from collide.continuations import GrowingPrefix, input_groups
from collide.errors import CollideError
from collide.invert import rankers
from collide.models import LoadedModel

log = logging.getLogger(__name__)

MATCH_RTOL = 0.05  # a row matches a state within this relative L2 distance (bf16 forwards: about 1e-2)
SEPARATION = 4.0  # the match must be this many times nearer than any other (layer, norm)
PRIOR_FIRST = 2048  # tokens by the model's prior verified at position 1 before the rest of the vocabulary
BATCH = 512  # tokens per single-token step while scanning


@dataclass
class Location:
    """Where a dump's states come from, as decided from its first rows."""

    layer: int  # HF hidden_states index
    final_norm: str  # post | pre (post below layer L, where both give the same states)
    position: int  # the row that decided: 0 (the BOS) or 1 (after the BOS) or 0 (no BOS)
    tokens: list[int]  # the token whose state matched, per prompt checked
    noise: float  # the largest relative L2 distance (‖row - state‖ / ‖state‖) over the prompts checked
    runner_up: Optional[dict] = None  # the next (layer, norm) and its relative distance
    scanned: int = 0  # tokens whose states were computed to decide (1 = the BOS alone)
    candidates: list = field(default_factory=list)  # [(layer, norm, relative distance)], nearest first

    def as_dict(self) -> dict:
        return {"layer": self.layer, "final_norm": self.final_norm, "position": self.position,
                "tokens": self.tokens, "noise": self.noise, "runner_up": self.runner_up, "scanned": self.scanned,
                "candidates": [{"layer": k, "final_norm": n, "relative": r} for k, n, r in self.candidates[:5]]}


def every_layer(lm: LoadedModel, prefix: GrowingPrefix, tokens: torch.Tensor, keys: list[tuple[int, str]]
                ) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, norm): (b, d) fp64 CPU} states of prefix + t for t in ``tokens`` at each key; layer L ``pre`` is
    the last block's output, ``post`` the final norm of it; one single-token step up to the deepest layer."""
    layers = sorted({k for k, _ in keys})
    saved = lm.final_norm
    lm.final_norm = "pre"
    try:
        got = prefix.states(tokens.to(lm.device), layers)
    finally:
        lm.final_norm = saved
    out = {}
    for k, norm in keys:
        state = got[k]
        if k == lm.n_layers and norm == "post":
            with torch.no_grad():
                state = lm.final_norm_module(state)
        out[k, norm] = state.double().cpu()
    return out


def _relative(rows: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """(n, b) ‖rows[i] - states[j]‖ / ‖states[j]‖."""
    return torch.cdist(rows, states) / states.norm(dim=1).clamp(min=1e-30)[None]


def _decided(ranked: list[tuple[int, str, float]]) -> bool:
    best = ranked[0][2]
    return best <= MATCH_RTOL and (len(ranked) == 1 or ranked[1][2] >= SEPARATION * max(best, 1e-12))


def locate(lm: LoadedModel, rows: np.ndarray, bos: Optional[int], layer: Optional[int] = None,
           norm: Optional[str] = None) -> Location:
    """The (layer, norm) of states whose first rows are ``rows`` (n, P, d): the first P >= 1 rows of n prompts
    (module docstring). ``layer`` / ``norm`` given restrict the answer. One-line CollideError when nothing
    matches, naming the nearest."""
    L = lm.n_layers
    keys = [(k, "post") for k in range(L + 1)] + [(L, "pre")]
    keys = [(k, n) for k, n in keys if (layer is None or k == layer) and (norm is None or n == norm or k < L)]
    keys = [(k, "post" if k < L else n) for k, n in dict.fromkeys(keys)]
    x = torch.from_numpy(np.asarray(rows, dtype=np.float64))
    scanned, position = 0, 0
    ranked: list[tuple[int, str, float]] = []
    tokens = [0] * len(x)
    with torch.inference_mode(False), torch.no_grad():
        if bos is not None:
            states = every_layer(lm, GrowingPrefix(lm), torch.tensor([bos]), keys)
            ranked = sorted(((k, n, float(_relative(x[:, 0], s).max())) for (k, n), s in states.items()),
                            key=lambda r: r[2])
            scanned, tokens = 1, [bos] * len(x)
            if not _decided(ranked):
                still = [(k, n) for k, n, r in ranked if r <= max(MATCH_RTOL, SEPARATION * ranked[0][2])]
                if still and x.shape[1] > 1:
                    keys, position = still, 1
                    ranked, tokens, scanned = _scan(lm, x[:, 1], [bos], keys)
        else:
            ranked, tokens, scanned = _scan(lm, x[:, 0], [], keys)
    best = ranked[0]
    if best[2] > MATCH_RTOL:
        raise CollideError(f"the first rows of SOURCE match no layer of model {lm.name!r}: the nearest is layer "
                           f"{best[0]} ({best[1]} final norm) at {best[2]:.3g} of the state's norm (a match is within "
                           f"{MATCH_RTOL}); name the model the states came from (model=...), or pass layer=K "
                           "and model.final_norm=pre|post")
    if len(ranked) > 1 and ranked[1][2] < SEPARATION * max(best[2], 1e-12):
        raise CollideError(f"the first rows of SOURCE fit layer {best[0]} ({best[1]}) and layer {ranked[1][0]} "
                           f"({ranked[1][1]}) nearly as well ({best[2]:.3g} vs {ranked[1][2]:.3g} of the norm); "
                           "pass layer=K (and model.final_norm=pre|post at the last layer)")
    runner = None if len(ranked) < 2 else {"layer": ranked[1][0], "final_norm": ranked[1][1], "relative": ranked[1][2]}
    found = Location(best[0], best[1], position, [int(t) for t in tokens], best[2], runner, scanned, ranked)
    log.info("SOURCE's states are layer %d (%s final norm) of %s: row %d within %.3g of its state, the next "
             "candidate %s", found.layer, found.final_norm, lm.name, position, found.noise, runner)
    return found


def _scan(lm: LoadedModel, x: torch.Tensor, prefix_ids: list[int], keys: list[tuple[int, str]]):
    """Nearest state to each row of ``x`` (n, d) among prefix + t for every distinct token t, at each key; the
    prior's first PRIOR_FIRST tokens first (with a prefix), stopping there when that decides. Returns (ranked
    [(layer, norm, relative)], the matched token per row at the best key, tokens scanned)."""
    prefix = GrowingPrefix(lm)
    for token in prefix_ids:
        prefix.append(token)
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    first, _ = input_groups(lm, np.arange(vocab))
    order = torch.as_tensor(first, dtype=torch.long)  # the first token of each group of identical rows
    prior = rankers.prior_order(lm, prefix)
    if prior is not None:
        distinct = torch.zeros(vocab, dtype=torch.bool)
        distinct[order] = True
        head = prior[prior < vocab]
        head = head[distinct[head]][:PRIOR_FIRST]
        taken = torch.zeros(vocab, dtype=torch.bool)
        taken[head] = True
        order = torch.cat([head, order[~taken[order]]])
    best = {key: (torch.full((len(x),), np.inf, dtype=torch.float64), torch.zeros(len(x), dtype=torch.long))
            for key in keys}
    scanned, ranked = 0, []
    for lo in range(0, len(order), BATCH):
        batch = order[lo:lo + BATCH]
        for key, states in every_layer(lm, prefix, batch, keys).items():
            rel = _relative(x, states)
            value, index = rel.min(dim=1)
            better = value < best[key][0]
            best[key][0][better], best[key][1][better] = value[better], batch[index[better]]
        scanned += len(batch)
        ranked = sorted(((k, n, float(v.max())) for (k, n), (v, _) in best.items()), key=lambda r: r[2])
        if scanned >= PRIOR_FIRST and prior is not None and _decided(ranked):
            break
    k, n, _ = ranked[0]
    return ranked, best[k, n][1].tolist(), scanned


def measure_noise(inverter, rows: np.ndarray) -> dict:
    """The relative gap (L2 distance / ‖state‖) between SOURCE's known rows and this model's own states of them:
    row 0 against the BOS (when the tokenizer prepends one), and the row the lens table covers against the
    table's nearest token, over the first prompts (``rows``: (n, P, d)). Rows farther than MATCH_RTOL are not
    known rows (another first token) and do not count. {"relative": the largest gap or None, "rows": [...]}."""
    lm, found = inverter.lm, []
    x = torch.from_numpy(np.asarray(rows, dtype=np.float64))
    with torch.inference_mode(False), torch.no_grad():
        if inverter.bos is not None:
            for i in range(len(x)):
                goal = x[i, 0]
                dist = float(inverter._distances(GrowingPrefix(lm), torch.tensor([inverter.bos]), goal)[0])
                found.append({"prompt": i, "position": 0, "token": int(inverter.bos), "distance": dist,
                              "relative": dist / max(float(goal.norm()), 1e-30)})
        lens = inverter.lens
        p = len(lens.prefix) if lens is not None and lens.table is not None else None
        bos_matched = any(r["relative"] <= MATCH_RTOL for r in found)
        if p is not None and p < x.shape[1] and (p == 0 or bos_matched):
            prefix = GrowingPrefix(lm)
            for token in lens.prefix:
                prefix.append(token)
            for i in range(len(x)):
                goal = x[i, p]
                token = rankers.table_order(lens, goal)[0][:1]
                dist = float(inverter._distances(prefix, token, goal)[0])
                found.append({"prompt": i, "position": p, "token": int(token[0]), "distance": dist,
                              "relative": dist / max(float(goal.norm()), 1e-30)})
    known = [r["relative"] for r in found if r["relative"] <= MATCH_RTOL]
    return {"relative": max(known) if known else None, "rows": found}
