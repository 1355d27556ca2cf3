"""Which rows' exact nearest neighbours a search certifies (``search.nearest``), and the pass that
certifies them for a sample of rows.

Needs only numpy and torch. ``search.nearest``:

* ``true``: every row's nearest neighbour, certified inside the all-pairs pass (symmetric.py);
* ``false``: none (the minimum, its pair and the collisions only);
* ``auto`` (the default): every row's, unless the all-pairs pass is pruned (prune.py) and there
  are more than ``search.nearest_cutoff`` rows. Then the nearest neighbours of a seeded uniform
  sample of ``search.nearest_sample`` rows are certified by a second pass, ``nearest_of``: the
  sampled rows against every row. The pruned pass pays only for the minimum and the collisions, and
  with a brute-force pass every row's nearest neighbour costs little more than the minimum alone.

``nearest_of`` screens query rows against blocks of rows with the fp32 GEMM of the symmetric engine
and its rigorous bound (bounds.py), one threshold per query row: its best exact squared distance so
far or its upper bound (a tile minimum plus the tile's bound), inflated for the fp64 re-rank error,
plus the bound. A pair left out is provably farther than that row's nearest neighbour; the pairs
re-ranked in fp64 include every pair attaining it, so each sampled row's distance and neighbour
(the smallest row among exact ties) are exactly those of the all-pairs search with ``nearest=true``.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from collide.errors import CollideError
from collide.search.blocks import Block, exact_sq, right_operand
from collide.search.bounds import pair_bound
from collide.search.symmetric import PairSearch
from collide.search.tiles import reduce_tile, select

MODES = ("auto", "all", "none")  # search.nearest = auto | true | false, as nearest_mode names them
SAMPLE_SEED = 0  # seed of the sampled rows (a fixed seed: the same rows in every run of a store)
QUERY_PANEL = 1024  # query rows per tile of nearest_of (a 1024 x 4096 fp32 tile: 16 MiB)


def nearest_mode(value) -> str:
    """``search.nearest`` (auto, true or false; bools or their names) as "auto", "all" or "none"."""
    mode = {True: "all", False: "none", "true": "all", "false": "none", "auto": "auto"}.get(
        value.lower() if isinstance(value, str) else value)
    if mode is None:
        raise CollideError(f"search.nearest={value!r} is not a choice; use auto, true or false")
    return mode


def resolve(mode: str, m: int, cutoff: int, pruned: bool) -> str:
    """The rows whose nearest neighbours are certified: "all", "sample" or "none" (see the module docstring)."""
    if mode != "auto":
        return mode
    return "sample" if pruned and m > cutoff else "all"


def sample_rows(m: int, size: int, seed: int = SAMPLE_SEED) -> np.ndarray:
    """A seeded uniform sample of ``min(size, m)`` of the engine rows 0..m-1, ascending."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(m, size=min(size, m), replace=False)).astype(np.int64)


def record(rows: str, n_rows: int, seed: int | None = None) -> dict:
    """The result's ``nearest`` record: which rows' nearest neighbours were certified, in words too."""
    text = {"all": f"nn of all {n_rows:,} rows, each exact",
            "sample": f"nn of {n_rows:,} sampled rows, each exact",
            "none": "nn not computed (search.nearest=false)"}[rows]
    return {"rows": rows, "n_rows": int(n_rows), "seed": seed, "description": text}


def _mask_self(s: torch.Tensor, q_rows: torch.Tensor, b_rows: torch.Tensor) -> None:
    """Set s[i, j] = inf where query row i and block row j are the same caller row (rows ascending)."""
    if s.device.type == "cpu":
        _, qi, bj = np.intersect1d(q_rows.numpy(), b_rows.numpy(), assume_unique=True, return_indices=True)
        s.numpy()[qi, bj] = np.inf
    else:
        s.masked_fill_(q_rows[:, None] == b_rows[None, :], float("inf"))


def nearest_of(query: Block, blocks: Iterable[Block], search: PairSearch) -> None:
    """Certify the exact nearest neighbour of every row of ``query`` among the rows of ``blocks``
    (itself excluded by caller row) into ``search``: a PairSearch with ``nearest`` whose engine rows are
    the query's (``query.index`` = 0..len - 1). Both operands are centred on the same vector. Tiles are
    QUERY_PANEL query rows by one block (memory: one such fp32 tile)."""
    for bj in blocks:
        right = right_operand(bj.left, search.d)
        e = pair_bound(search.c, search.eta, query.norm_max, bj.norm_max)
        for q0 in range(0, query.x.shape[0], QUERY_PANEL):
            q = slice(q0, q0 + QUERY_PANEL)
            s = search._gemm(query.left[q], right)
            _mask_self(s, query.rows[q], bj.rows)
            (rv, ri), (cv, ci), extra = reduce_tile(s)
            tr = search._nn_threshold(query.index[q], rv, e)
            rr, cc, vals = select(s, rv, ri, cv, extra, tr.to(rv.device), None)
            keep = search.within_budget(vals)
            if keep is not None:
                rr, cc = rr[keep], cc[keep]
            if rr.numel():
                rr, cc = rr.to(query.x.device) + q0, cc.to(bj.x.device)
                search.n_candidates += rr.numel()
                search.record_nn(query.index[rr], bj.rows[cc], exact_sq(query.x, rr, bj.x, cc))
