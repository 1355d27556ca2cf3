"""A whole prompt, left to right: tokens within ε of the same state are decided by the positions after them.

``Inverter.position`` returns, besides the nearest verified token within ε, every other verified token within
ε (its ``alternatives``). Under a wide ε (quantized activations, bf16 forwards, a user's ε) several tokens can
lie within it; the state of a *later* position then tells them apart, because it depends on every token before
it. ``invert_prompt`` takes the nearest token at each position and goes on:

* **backtracking**: when a later position m has no candidate within ε (the whole vocabulary verified), the
  deepest earlier position with an alternative not yet tried takes its nearest such alternative, and the
  positions after it are searched again. The abandoned token is ``excluded`` there (with ``at`` = m). If no
  alternative gets past the miss, the first path is kept, the miss reported, and nothing is excluded.
* **after the whole prompt** (``resolve``): each remaining alternative of a position j is put in the recovered
  token's place, and the recovered tokens after it are checked in one batched forward of those sequences.
  If every later state still lies within ε, the alternative is ``consistent`` (the states cannot tell the two
  apart at this ε). Otherwise the first later position m that no longer fits is noted (``at`` = m) and, with
  ``cfg.prove_ties``, searched after it: no candidate within ε there excludes it (``excluded``); a fitting
  candidate leaves it ``open``. Without ``prove_ties`` (the default) it stays ``open``: excluding it verifies
  every token at m, a vocabulary sweep that would dominate the prompt's cost under a wide ε (bf16, quantized).

Each backtrack and each such search may verify the whole vocabulary, so a prompt gets ``cfg.backtrack`` of
them; what is left undecided stays ``open`` and says why. A position is ``unique`` only when every one of
its alternatives is excluded (``PositionResult.unique``). Distances are L2 (not squared), fp64. ``inv`` is
the ``collide.invert.sipit.Inverter`` whose ``invert`` calls ``invert_prompt``.
"""

from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch

from collide.continuations import GrowingPrefix
from collide.invert.results import Alternative, PositionResult
from collide.models import all_token_states

MAX_CHECKED = 64  # alternatives of one position checked against the rest of the prompt, nearest first
CHECK_BATCH = 32  # sequences per batched forward of that check


def grown(inv, ids: list[int]) -> GrowingPrefix:
    """A GrowingPrefix holding ``ids`` (one single-token step each)."""
    prefix = GrowingPrefix(inv.lm)
    for token in ids:
        prefix.append(token)
    return prefix


def backtrack_point(path: list[PositionResult], floor: int) -> Optional[int]:
    """The deepest position >= ``floor`` of ``path`` with an alternative still open, or None."""
    for j in range(len(path) - 1, floor - 1, -1):
        if any(a.status == "open" for a in path[j].alternatives):
            return j
    return None


def switch(res: PositionResult, inv, miss: int) -> PositionResult:
    """``res`` with its nearest open alternative as the token; the token it held excluded by the miss at ``miss``."""
    alt = next(a for a in res.alternatives if a.status == "open")
    old = Alternative(res.token, res.distance, "excluded", miss,
                      f"position {miss} had no candidate within epsilon after it")
    new = copy.copy(res)
    new.token, new.distance, new.group = alt.token, alt.distance, inv.group(alt.token)
    new.alternatives = sorted([a for a in res.alternatives if a is not alt] + [old], key=lambda a: a.distance)
    return new


def invert_prompt(inv, states: np.ndarray, stop_on_miss: bool = True, progress=None
                  ) -> list[PositionResult]:
    """Recover one prompt from its (T, d) states (see the module docstring); one PositionResult per position
    searched. A miss stops the prompt (``stop_on_miss``) or goes on with its best candidate."""
    rng = np.random.default_rng(inv.cfg.seed)
    budget = [int(inv.cfg.backtrack)]  # branches left for this prompt (backtracks and searches of resolve)
    path: list[PositionResult] = []
    prefix = GrowingPrefix(inv.lm)
    first_miss = None  # (path, miss) at the first miss, kept when backtracking does not get past it
    floor, t = 0, 0
    while t < len(states):
        res = inv.position(prefix, t, states[t], rng)
        if not res.recovered:
            j = backtrack_point(path, floor) if budget[0] > 0 else None
            if j is not None:
                if first_miss is None:
                    first_miss = (copy.deepcopy(path), res)
                budget[0] -= 1
                path = path[:j] + [switch(path[j], inv, t)]
                prefix, t = grown(inv, [r.token for r in path]), j + 1
                continue
            if first_miss is not None and len(first_miss[0]) >= len(path):  # no branch got further: the first path
                path, res = first_miss
                for r in path:
                    for a in r.alternatives:
                        a.note = a.note or f"backtracking from the miss at position {res.position} did not get past it"
                prefix = grown(inv, [r.token for r in path])
            first_miss = None
            if progress is not None:
                progress(res)
            path.append(res)
            if stop_on_miss:
                return path
            floor = t + 1  # a reported miss is final: no backtracking before it
        else:
            if progress is not None:
                progress(res)
            path.append(res)
        if t + 1 < len(states):
            prefix.append(res.token)
        t += 1
    resolve(inv, path, states, budget, rng)
    return path


def misfits(inv, ids: list[int], j: int, tokens: list[int], states: np.ndarray,
            eps: list[float]) -> list[Optional[int]]:
    """For each token a of ``tokens``: the first position m > j at which ``ids`` with a at j has a state farther
    than ``eps[m]`` from ``states[m]`` (one batched forward of those sequences at the inverter's layer); None
    when every later position fits."""
    out: list[Optional[int]] = []
    goal = torch.from_numpy(np.asarray(states[:len(ids)], dtype=np.float64))
    for lo in range(0, len(tokens), CHECK_BATCH):
        chunk = tokens[lo:lo + CHECK_BATCH]
        seqs = torch.tensor([ids[:j] + [a] + ids[j + 1:] for a in chunk], dtype=torch.long, device=inv.lm.device)
        got = all_token_states(inv.lm, seqs, torch.ones_like(seqs), [inv.layer])[inv.layer]
        dist = (got[:, j + 1:].double().cpu() - goal[j + 1:]).norm(dim=2)  # (b, T - j - 1)
        bad = dist > torch.tensor(eps[j + 1:], dtype=torch.float64)
        out += [j + 1 + int(row.nonzero()[0]) if bool(row.any()) else None for row in bad]
    return out


def resolve(inv, path: list[PositionResult], states: np.ndarray, budget: list[int],
            rng: np.random.Generator) -> None:
    """Decide the open alternatives of a finished ``path`` by the positions after them (module docstring); in place."""
    ids = [r.token for r in path]
    eps = [r.epsilon for r in path]
    for j, res in enumerate(path):
        open_ = [a for a in res.alternatives if a.status == "open"]
        if not open_ or not res.recovered:
            continue
        if j == len(path) - 1:
            for a in open_:
                a.note = a.note or "the last position: no later state to decide"
            continue
        for a in open_[MAX_CHECKED:]:
            a.note = f"not checked (only the nearest {MAX_CHECKED} alternatives are)"
        checked = open_[:MAX_CHECKED]
        for a, m in zip(checked, misfits(inv, ids, j, [a.token for a in checked], states, eps)):
            if m is None:
                a.status, a.note = "consistent", "the recovered rest of the prompt still fits within epsilon after it"
                continue
            a.at = m
            if not inv.cfg.prove_ties:
                a.note = (f"the recovered token at position {m} does not fit after it (not excluded: that verifies "
                          "every token there, prove_ties=true)")
                continue
            if budget[0] <= 0:
                a.note = f"the recovered token at position {m} does not fit after it (not searched: backtrack spent)"
                continue
            budget[0] -= 1
            found = inv.position(grown(inv, ids[:j] + [a.token] + ids[j + 1:m]), m, states[m], rng)
            if found.recovered:
                a.note = f"position {m} fits token {found.token} after it (not the recovered {ids[m]})"
            else:
                a.status = "excluded"
                a.note = f"position {m} has no candidate within epsilon after it ({found.tried} verified)"
