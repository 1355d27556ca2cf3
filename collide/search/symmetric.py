"""The symmetric block engine ("torch" backend): certified exact minimum pairwise L2 distance,
collisions and each row's nearest-neighbour distance.

Needs only numpy and torch. The rows to search are cut into blocks (blocks.py); every block pair
(I, J) with I <= J is screened by ONE fp32 GEMM of augmented rows that yields squared distances
directly (see bounds.py), so each unordered pair is computed once: half the work of a k-NN
self-search. Per tile of S (tiles.py reduces it):

1. the tile's screened minimum pair is re-ranked exactly, lowering tau (best exact squared
   distance so far);
2. (``nearest``) each row's and each column's tile minimum m lowers that row's bound
   ub_i = min(ub_i, m + E_blk) >= its exact nearest-neighbour squared distance; the row's
   threshold is t_i = max(min(nn_i, ub_i), threshold^2) (1 + 2 rerank_rel) + E_blk, nn_i its best
   exact squared distance so far (t_i >= the tau threshold below, since tau <= nn_i);
3. every pair (i, j) with s^ <= t_i or s^ <= t_j is re-ranked exactly in fp64 at once (tiles.py
   reads only the rows and chunk columns whose minimum passes): pairs with exact L2 < threshold
   are collisions, and nn_i, nn_j, tau take the exact values. Without ``nearest`` the threshold
   is max(tau, threshold^2) (1 + 2 rerank_rel) + E_blk for every row (minimum and collisions
   only; nn is not reported).

**Exactness (a property of the construction).** t_i only decreases and stays above
N_i (1 + 2 rerank_rel) + E, N_i the true nearest-neighbour squared distance of row i, so a pair
(i, j) that step 3 leaves out has an exact squared distance, and an fp64 value, above N_i, and
likewise for j, while the pair attaining N_i passes. So every row's reported nearest-neighbour
distance is the fp64 minimum over ALL other rows, and since tau = min_i nn_i, the reported
minimum is the true one and every pair attaining it was
re-ranked (ties are broken by the smallest (i, j), whatever the block order). A pair closer than
the threshold has s^ < threshold^2 + E and is always re-ranked: the collision list is complete
and exact, however many neighbours a row has under the threshold (e.g. layer-0 states, bitwise
equal for prompts that end in the same token). The only exception is an exhausted candidate
budget, which is reported as uncertified, never hidden.

Distances: re-ranks give exact fp64 squared distances; every reported L2 distance (minimum,
collisions, nn) is their correctly rounded square root (math.sqrt / numpy.sqrt, on the host),
and the collision rule ``distance < threshold`` is applied to that same value.

Loop order: for each block J (held on the device, with its right operand built once), stream the
blocks I < J, then the diagonal tile (J, J) cut into row panels so that only its upper triangle
is computed. Memory: two blocks plus one block_rows^2 fp32 tile.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Iterator

import numpy as np
import torch

from collide.search.blocks import Block, exact_sq, right_operand, tf32_split
from collide.search.bounds import pair_bound, rerank_rel, screening_constant, underflow_term
from collide.search.tiles import as_threshold, reduce_tile, select

log = logging.getLogger(__name__)

CPU_PANEL = 1024  # row panel of a diagonal tile on CPU: a quarter of a 4096-row block wastes 20% of the GEMM
# on the lower triangle instead of 33% at 2048 (n=5000, d=576: 0.15 s vs 0.19 s; n=20000: the same)
GPU_PANEL = 2048  # row panel of a diagonal tile on CUDA (the H100 figures in benchmarks/ use it)
NO_ROW = torch.iinfo(torch.int64).max  # "no neighbour yet" in PairSearch.nn_row (loses every amin)


def collision_gate(threshold: float) -> float:
    """A squared-distance gate g > threshold^2 (real arithmetic), positive for every threshold > 0.

    sqrt is correctly rounded and monotone, so sqrt(d2) < threshold implies d2 < threshold^2 < g:
    only values under g need a square root. ``nextafter`` keeps g positive when threshold^2
    underflows (threshold < 1.5e-162), so identical rows stay collisions for every positive threshold.
    """
    return math.nextafter(threshold * threshold, math.inf)


class PairSearch:
    """Running state of one certified search: best exact pair, collisions, nearest neighbours, budget.

    Row numbering: engine index e in 0..m-1 for the arrays here; pairs and collisions are reported
    in the caller's numbering (Block.rows), (i, j) with i < j. tau and the nn arrays hold squared
    distances (fp64), collisions hold L2 distances (correctly rounded square roots).
    """

    def __init__(self, m: int, d: int, device: torch.device, threshold: float, precision: str = "fp32",
                 max_candidates: int = 50_000_000, block_rows: int = 4096, progress: bool = False,
                 nearest: bool = True):
        self.d, self.device, self.threshold = d, device, float(threshold)
        self.t2 = collision_gate(self.threshold)  # squared gate of the collision rule (> threshold^2)
        self.precision = precision  # screening arithmetic: fp32 | tf32x3
        self.c, self.eta = screening_constant(d, precision), underflow_term(d)  # bound constants
        self.slack = 1.0 + 2.0 * rerank_rel(d)  # inflation of exact thresholds for the fp64 re-rank error
        self.max_candidates = int(max_candidates)  # budget of exact re-ranks
        self.nearest = nearest  # certify every row's exact nearest-neighbour distance (else nn is not tracked)
        self.tau = math.inf  # best exact squared distance so far
        self.pair: tuple[int, int] | None = None  # its pair, caller numbering, i < j
        # per row: an upper bound of its nearest-neighbour squared distance, min over tiles of (s^ + E)
        self.nn_ub = torch.full((m,), math.inf, dtype=torch.float64, device=device)
        self.nn_exact = torch.full((m,), math.inf, dtype=torch.float64, device=device)  # best exact d^2 per row
        # per row: the caller row of its nearest neighbour so far (the smallest among exact ties); NO_ROW if none
        self.nn_row = torch.full((m,), NO_ROW, dtype=torch.int64, device=device)
        # per row: its squared norm centred on the search's fp64 mean (blocks.centred_sq_norms); nan until seen
        self.centred2 = torch.full((m,), math.nan, dtype=torch.float64, device=device)
        self.coll: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (i, j, L2) collision batches, host
        self.n_candidates = 0  # pairs re-ranked exactly because they passed the screening bound
        self.n_skipped = 0  # candidates left un-re-ranked once the budget was spent
        self.reason: str | None = None  # why the result is not certified
        self.panel = CPU_PANEL if device.type == "cpu" else GPU_PANEL
        self.buf = torch.empty(min(block_rows, max(m, 1)) ** 2, dtype=torch.float32, device=device)  # S tile
        self.tri: torch.Tensor | None = None  # lower-triangle mask of a diagonal panel (cached)
        self.bar = None
        if progress:
            from collide.console import progress as progress_bar

            self.bar = progress_bar(total=m * (m - 1) // 2, unit="pair", unit_scale=True, desc="pairs", smoothing=0.1)
        self.gemm_s = 0.0  # seconds in the screening GEMMs (informational)

    # ------------------------------------------------------------------ screening
    def _gemm(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """S = left @ right^T (P, Q) fp32 in the reusable tile buffer."""
        p, q = left.shape[0], right.shape[0]
        if p * q > self.buf.numel():
            self.buf = torch.empty(p * q, dtype=torch.float32, device=self.device)
        s = self.buf[:p * q].view(p, q)
        tic = time.perf_counter()
        if self.device.type == "cpu":
            np.matmul(left.numpy(), right.numpy().T, out=s.numpy())  # OpenBLAS sgemm: faster than MKL here
        elif self.precision == "tf32x3":
            (lh, ll), (rh, rl) = tf32_split(left), tf32_split(right)
            torch.mm(ll, rh.T, out=s)  # small terms first
            s.addmm_(lh, rl.T)
            s.addmm_(lh, rh.T)
        else:
            torch.mm(left, right.T, out=s)
        self.gemm_s += time.perf_counter() - tic
        return s

    def screen(self, bi: Block, bj: Block, right_j: torch.Tensor, kind: str) -> None:
        """Screen all pairs of rows (i in bi, j in bj), bi's rows before bj's.

        kind: "cross" (disjoint blocks, every pair counts), "diag" (bi is bj: only i < j counts;
        computed as row panels against the columns from the panel on), "rect" (arbitrary row sets:
        self pairs are masked out by caller row, pairs are reoriented to i < j).
        """
        e = pair_bound(self.c, self.eta, bi.norm_max, bj.norm_max)
        if kind != "diag":
            self._tile(bi, 0, bi.x.shape[0], bj, 0, right_j, e, kind)
            return
        b = bi.x.shape[0]
        for p0 in range(0, b - 1, self.panel):
            self._tile(bi, p0, min(b, p0 + self.panel), bj, p0, right_j, e, kind)

    def _tile(self, bi: Block, r0: int, r1: int, bj: Block, c0: int, right_j: torch.Tensor, e: float,
              kind: str) -> None:
        s = self._gemm(bi.left[r0:r1], right_j[c0:])
        p, q = s.shape
        if kind == "diag":  # pairs (i, j) with j <= i in this panel: the lower triangle and the diagonal
            if self.tri is None or self.tri.shape[0] < p:
                self.tri = torch.ones(p, p, dtype=torch.bool, device=self.device).tril_()
            if self.device.type == "cpu":  # torch's masked_fill_ on a strided CPU view is ~100x slower
                np.copyto(s.numpy()[:, :p], np.inf, where=self.tri.numpy()[:p, :p])
            else:
                s[:, :p].masked_fill_(self.tri[:p, :p], math.inf)
            n_pairs = p * (p - 1) // 2 + p * (q - p)
        elif kind == "rect":
            s.masked_fill_(bi.rows[r0:r1, None] == bj.rows[None, c0:], math.inf)
            n_pairs = p * q
        else:
            n_pairs = p * q
        (rv, ri), (cv, ci), extra = reduce_tile(s)
        rows_i = torch.arange(r0, r1, device=self.device)
        k = int(torch.argmin(rv))
        smin = float(rv[k])
        if math.isfinite(smin):
            self._rerank(bi, rows_i[k:k + 1], bj, ri[k:k + 1].to(self.device) + c0, kind)
            if self.nearest:  # per row: a bound of its own nn (>= tau), or the collision gate
                tr = self._nn_threshold(bi.index[r0:r1], rv, e)
                tc = self._nn_threshold(bj.index[c0:c0 + q], cv, e)
                self._candidates(s, (rv, ri, cv, extra), tr.to(rv.device), tc.to(cv.device), bi, r0, bj, c0, kind)
            else:
                thr = max(self.tau, self.t2) * self.slack + e
                if smin <= thr:
                    tr = as_threshold(torch.full((p,), thr, dtype=torch.float64, device=rv.device))
                    self._candidates(s, (rv, ri, cv, extra), tr, None, bi, r0, bj, c0, kind)
        if self.bar is not None:
            self.bar.update(n_pairs)

    def _candidates(self, s, reduced, tr, tc, bi: Block, r0: int, bj: Block, c0: int, kind: str) -> None:
        """Re-rank every pair of the tile with s^ <= tr[row] or s^ <= tc[col] (within the budget);
        reduced: (row min, row argmin, column min, extra) of the tile (tiles.reduce_tile)."""
        rr, cc, vals = select(s, *reduced, tr, tc)
        keep = self.within_budget(vals)
        if keep is not None:
            rr, cc = rr[keep], cc[keep]
        if rr.numel():
            self._rerank(bi, rr.to(self.device) + r0, bj, cc.to(self.device) + c0, kind)

    def within_budget(self, vals: torch.Tensor) -> torch.Tensor | None:
        """None if all candidates with screened values ``vals`` fit the budget of exact re-ranks;
        else the indices of the smallest that do (and the result becomes uncertified)."""
        room = max(self.max_candidates - self.n_candidates, 0)
        if vals.numel() <= room:
            return None
        if self.reason is None:
            self.reason = (f"candidate budget exhausted: search.max_candidates={self.max_candidates} exact "
                           f"re-ranks were not enough for the pairs within the screening bound of the minimum, "
                           f"of a row's nearest neighbour or of the threshold; raise search.max_candidates")
        self.n_skipped += vals.numel() - room
        return torch.topk(vals, room, largest=False).indices

    def _nn_threshold(self, eng: torch.Tensor, sv: torch.Tensor, e: float) -> torch.Tensor:
        """fp32 screening thresholds of the rows ``eng`` whose tile minima are sv: first lower each
        row's bound nn_ub by sv + e (>= the exact distance of that pair, hence of its nearest
        neighbour), then max(min(nn_exact, nn_ub), threshold gate) (1 + 2 rerank_rel) + e."""
        self.nn_ub[eng] = torch.minimum(self.nn_ub[eng], sv.to(self.nn_ub.device, torch.float64) + e)
        bound = torch.minimum(self.nn_exact[eng], self.nn_ub[eng]).clamp(min=self.t2)
        return as_threshold(bound * self.slack + e)

    def _rerank(self, bi: Block, li: torch.Tensor, bj: Block, lj: torch.Tensor, kind: str) -> None:
        """Exact fp64 distances of pairs (bi row li, bj row lj): update tau, the pair, collisions, nn."""
        self.rerank(bi, li, bj, lj, kind == "rect")

    def rerank(self, bi: Block, li: torch.Tensor, bj: Block, lj: torch.Tensor, reorient: bool = False) -> None:
        """Re-rank the pairs (row li[k] of bi, row lj[k] of bj) exactly and record them."""
        self.n_candidates += li.numel()
        self.offer(bi.rows[li], bj.rows[lj], bi.index[li], bj.index[lj], exact_sq(bi.x, li, bj.x, lj), reorient)

    def offer(self, ri: torch.Tensor, rj: torch.Tensor, ei: torch.Tensor, ej: torch.Tensor, d2: torch.Tensor,
              reorient: bool = False) -> None:
        """Record exact squared distances d2 of pairs (caller rows ri, rj; engine indices ei, ej)."""
        if d2.numel() == 0:
            return
        self.record_nn(torch.cat([ei, ej]), torch.cat([rj, ri]), torch.cat([d2, d2]))
        if reorient:
            ri, rj = torch.minimum(ri, rj), torch.maximum(ri, rj)
        best = float(d2.min())
        if best <= self.tau:
            at = torch.nonzero(d2 == best)[:, 0]
            pair = min(zip(ri[at].tolist(), rj[at].tolist()))
            if best < self.tau or self.pair is None or pair < self.pair:
                self.tau, self.pair = best, pair
        if self.threshold > 0.0 and best < self.t2:
            near = torch.nonzero(d2 < self.t2)[:, 0]
            dist = np.sqrt(d2[near].cpu().numpy())  # correctly rounded (IEEE sqrt), on the host
            hit = np.flatnonzero(dist < self.threshold)
            if hit.size:
                sel = near[torch.from_numpy(hit).to(near.device)]
                self.coll.append((ri[sel].cpu().numpy(), rj[sel].cpu().numpy(), dist[hit]))

    def record_nn(self, eng: torch.Tensor, partner: torch.Tensor, d2: torch.Tensor) -> None:
        """Offer each row ``eng[k]`` (engine index) the neighbour ``partner[k]`` (caller row) at exact squared
        distance ``d2[k]``: a row keeps its smallest distance and, among exact ties, the smallest caller row,
        whatever the order of the offers."""
        before = self.nn_exact[eng]
        self.nn_exact.scatter_reduce_(0, eng, d2, "amin")
        now = self.nn_exact[eng]
        self.nn_row[eng[now < before]] = NO_ROW  # a closer neighbour replaces the old one, ties or not
        at = d2 == now
        self.nn_row.scatter_reduce_(0, eng[at], partner[at].to(self.nn_row.device), "amin")

    # ------------------------------------------------------------------ results
    def collisions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unique collision pairs (i, j, L2) sorted by (distance, i, j), caller numbering."""
        if not self.coll:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64)
        i, j, dist = (np.concatenate(parts) for parts in zip(*self.coll))
        order = np.lexsort((j, i, dist))
        i, j, dist = i[order], j[order], dist[order]
        keep = np.ones(len(i), bool)
        keep[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])  # a pair can be re-ranked more than once
        return i[keep].astype(np.int64), j[keep].astype(np.int64), dist[keep]

    def nn_distances(self) -> np.ndarray:
        """(m,) each row's exact nearest-neighbour L2 distance (correctly rounded sqrt), engine order;
        inf for a row with no other row, nan for every row when ``nearest`` is off."""
        if not self.nearest:
            return np.full(self.nn_exact.shape[0], np.nan)
        return np.sqrt(self.nn_exact.cpu().numpy())

    def nn_rows(self) -> np.ndarray:
        """(m,) int64 caller row of each row's nearest neighbour (the smallest among exact ties), engine order;
        -1 for a row with no other row, and for every row when ``nearest`` is off."""
        if not self.nearest:
            return np.full(self.nn_row.shape[0], -1, np.int64)
        rows = self.nn_row.cpu().numpy().copy()
        rows[rows == NO_ROW] = -1
        return rows

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def search_blocks(blocks: Callable[[int | None], Iterator[Block]], state: PairSearch) -> None:
    """Screen every pair once: for each block J, blocks I < J (streamed), then the diagonal (J, J).

    ``blocks(stop)`` yields the first ``stop`` blocks (all when None) in order, afresh at each call
    (a list for in-memory data, a re-read of the store out of core).
    """
    tic = time.perf_counter()
    for jb, bj in enumerate(blocks(None)):
        state.centred2[bj.index] = bj.norm2
        right = right_operand(bj.left, state.d)
        for bi in blocks(jb):
            state.screen(bi, bj, right, "cross")
        state.screen(bj, bj, right, "diag")
        log.debug("block %d done: tau=%.6g, %d candidates, %.1f s", jb, state.tau, state.n_candidates,
                  time.perf_counter() - tic)
