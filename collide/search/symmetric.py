"""The symmetric block engine ("torch" backend): certified exact minimum pairwise L2 distance.

Needs only numpy and torch. The rows to search are cut into blocks; every block pair (I, J) with
I <= J is screened by ONE fp32 GEMM of augmented rows that yields squared distances directly
(see bounds.py), so each unordered pair is computed once: half the work of a k-NN self-search.
Per tile of S:

1. row and column minima update each row's screened nearest neighbour (re-ranked in fp64 when
   it improves, while both blocks are in memory: this works out of core);
2. the tile's screened minimum pair is re-ranked exactly, lowering tau (best exact squared
   distance so far);
3. every pair with s^ <= max(tau, threshold^2) (1 + 2 rerank_rel) + E_blk is re-ranked exactly in
   fp64 at once: pairs with exact L2 < threshold are collisions.

**Exactness (a property of the construction).** A pair that step 3 leaves out has
s^ > tau_then + E >= tau_final + E, so its exact squared distance exceeds tau_final: the
reported minimum is the true one and every pair attaining it was re-ranked (ties are broken by
the smallest (i, j), whatever the block order). A pair closer than the threshold has
s^ < threshold^2 + E and is always re-ranked: the collision list is complete and exact, however
many neighbours a row has under the threshold (e.g. layer-0 states, bitwise equal for prompts that
end in the same token). The only exception is an exhausted candidate budget, which is reported
as uncertified, never hidden.

Loop order: for each block J (held on the device, with its right operand built once), stream the
blocks I < J, then the diagonal tile (J, J) cut into row panels so that only its upper triangle
is computed. Memory: two blocks plus one block_rows^2 fp32 tile.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from collide.search.bounds import pair_bound, rerank_rel, screening_constant, underflow_term

log = logging.getLogger(__name__)

PAD = 8  # the augmented width d + 2 is padded with zero columns to a multiple of this (GEMM speed)
CPU_PANEL = 1024  # row panel of a diagonal tile on CPU: a quarter of a 4096-row block wastes 20% of the GEMM
# on the lower triangle instead of 33% at 2048 (n=5000, d=576: 0.15 s vs 0.19 s; n=20000: the same)
GPU_PANEL = 2048  # row panel of a diagonal tile on CUDA (the H100 figures in benchmarks/ use it)
COL_CHUNK = 32  # rows per step of the CPU tile reduction (a chunk stays in cache)
RERANK_ELEMENTS = 1 << 22  # fp64 elements per chunk of exact re-ranks (bounds their memory)


@dataclass
class Block:
    """A block of rows to search, resident on the engine device."""

    index: torch.Tensor  # (b,) int64: engine index of each row (0..m-1 over all searched rows)
    rows: torch.Tensor  # (b,) int64: each row's index in the caller's numbering (input row, store row)
    x: torch.Tensor  # (b, d) the rows as given (fp32 or fp64): exact fp64 re-ranks read these
    left: torch.Tensor  # (b, K) fp32 left GEMM operand [a, fl32(||a||^2), 1, 0 pad], a = fl32(x - mu)
    norm_max: float  # largest ||a|| in the block (fp64, not squared): the block's error bound uses it


def finite_rows(x: torch.Tensor, block_rows: int) -> torch.Tensor:
    """(n,) bool: rows of x without NaN/Inf, checked block by block (no (n, d) mask in memory)."""
    if x.device.type == "cpu":  # numpy: torch's CPU kernels are slower here
        xn = x.numpy()
        return torch.from_numpy(np.concatenate([np.isfinite(xn[s:s + block_rows]).all(1)
                                                for s in range(0, len(xn), block_rows)] or [np.zeros(0, bool)]))
    return torch.cat([torch.isfinite(x[s:s + block_rows]).all(1) for s in range(0, x.shape[0], block_rows)]
                     or [torch.zeros(0, dtype=torch.bool, device=x.device)])


def sum_rows(x: torch.Tensor, block_rows: int) -> torch.Tensor:
    """fp64 sum of the rows of x (m, d), block by block (no fp64 copy of x)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], block_rows):
        if x.device.type == "cpu":
            total += torch.from_numpy(x[s:s + block_rows].numpy().sum(0, dtype=np.float64))
        else:
            total += x[s:s + block_rows].to(torch.float64).sum(0)
    return total


def augmented_width(d: int) -> int:
    """K: columns of the augmented operands (d + 2, padded with zeros to a multiple of PAD)."""
    return -(-(d + 2) // PAD) * PAD


def augment(x: torch.Tensor, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left operand [a, fl32(||a||^2), 1, 0...] of rows x (b, d) centered on mu (fp64), and ||a||^2 (fp64).

    a = fl32(fl64(x) - mu); its squared norms are summed in fp64 from the fp32 values, then rounded
    for the operand. Raises OverflowError if squared distances could overflow fp32.
    """
    b, d = x.shape
    left = torch.zeros(b, augmented_width(d), dtype=torch.float32, device=x.device)
    norm2 = torch.empty(b, dtype=torch.float64, device=x.device)
    step = max(1, RERANK_ELEMENTS // max(d, 1))
    for s in range(0, b, step):
        if x.device.type == "cpu":  # numpy: several times faster than torch's CPU kernels here
            a = np.subtract(x[s:s + step].numpy(), mu.numpy(), dtype=np.float64).astype(np.float32)
            left.numpy()[s:s + step, :d] = a
            norm2.numpy()[s:s + step] = np.einsum("ij,ij->i", a, a, dtype=np.float64)
        else:
            a = (x[s:s + step].to(torch.float64) - mu).to(torch.float32)
            left[s:s + step, :d] = a
            norm2[s:s + step] = a.to(torch.float64).square().sum(1)
    left[:, d] = norm2.to(torch.float32)
    left[:, d + 1] = 1.0
    top = float(norm2.max()) if b else 0.0
    if not math.isfinite(top) or 4.0 * top > 1e37:
        raise OverflowError(f"centered rows have squared norms up to {top:.3g}: squared distances overflow fp32")
    return left, norm2


def make_block(x: torch.Tensor, rows: torch.Tensor, start: int, mu: torch.Tensor) -> Block:
    """Block of rows x (on the engine device) with caller rows ``rows``, engine indices start..start+b-1."""
    left, norm2 = augment(x, mu)
    index = torch.arange(start, start + x.shape[0], device=x.device)
    return Block(index=index, rows=rows, x=x, left=left, norm_max=math.sqrt(float(norm2.max())))


def right_operand(left: torch.Tensor, d: int) -> torch.Tensor:
    """Right operand [-2a, 1, fl32(||a||^2), 0...] of a block, from its left operand (exact: a power-of-2 scale)."""
    right = torch.zeros_like(left)
    right[:, :d] = left[:, :d] * -2.0
    right[:, d] = 1.0
    right[:, d + 1] = left[:, d]
    return right


def tf32_split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo): hi = t with its 13 low mantissa bits cleared (exact TF32), lo = t - hi (exact in fp32)."""
    hi = (t.view(torch.int32) & -8192).view(torch.float32)
    return hi, t - hi


def exact_sq(xa: torch.Tensor, ia: torch.Tensor, xb: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
    """Exact-as-fp64 squared L2 distances sum_k (xa[ia_r, k] - xb[ib_r, k])^2, fp64 (len(ia),).

    Deterministic per pair: the same two rows give the same bits whatever batch they are part of.
    On CPU numpy does it (its row sums do not depend on the number of rows, and it is several
    times faster than torch's CPU kernels here); on CUDA every chunk is padded to the same number
    of rows, since the reduction kernel's split can depend on the number of outputs.
    """
    step = max(1, RERANK_ELEMENTS // max(xa.shape[1], 1))
    if xa.device.type == "cpu":
        an, bn, ia_n, ib_n = xa.numpy(), xb.numpy(), ia.numpy(), ib.numpy()
        out = np.empty(len(ia_n))
        for s in range(0, len(ia_n), step):
            diff = np.subtract(an[ia_n[s:s + step]], bn[ib_n[s:s + step]], dtype=np.float64)
            diff *= diff
            out[s:s + step] = diff.sum(1)
        return torch.from_numpy(out)
    out = torch.empty(len(ia), dtype=torch.float64, device=xa.device)
    for s in range(0, len(ia), step):
        pa, pb = ia[s:s + step], ib[s:s + step]
        k = len(pa)
        if k < step:  # pad with row 0: same kernel configuration for every chunk
            pa = torch.cat([pa, pa.new_zeros(step - k)])
            pb = torch.cat([pb, pb.new_zeros(step - k)])
        out[s:s + k] = (xa[pa].to(torch.float64) - xb[pb].to(torch.float64)).square().sum(1)[:k]
    return out


def _reduce_cpu(s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row min, row argmin, column min, column argmin) of a tile s (P, Q); first index among ties.

    One pass over s in chunks of COL_CHUNK rows that stay in cache: numpy's argmin(axis=0) walks
    columns with a stride and is ~10x slower. A chunk's column argmin is only computed for the
    columns whose minimum it improves.
    """
    ri = np.empty(s.shape[0], np.int64)
    cv = ci = None
    for r0 in range(0, s.shape[0], COL_CHUNK):
        chunk = s[r0:r0 + COL_CHUNK]
        ri[r0:r0 + COL_CHUNK] = chunk.argmin(1)
        if cv is None:
            cv, ci = chunk.min(0), chunk.argmin(0)
            continue
        v = chunk.min(0)
        better = np.flatnonzero(v < cv)
        if better.size:
            ci[better] = chunk[:, better].argmin(0) + r0
            cv[better] = v[better]
    rv = np.take_along_axis(s, ri[:, None], 1)[:, 0]
    return rv, ri, cv, ci


class PairSearch:
    """Running state of one certified search: best exact pair, collisions, nearest neighbours, budget.

    Row numbering: engine index e in 0..m-1 for the arrays here; pairs and collisions are reported
    in the caller's numbering (Block.rows), (i, j) with i < j. tau and the nn arrays hold squared
    distances (fp64), collisions hold L2 distances.
    """

    def __init__(self, m: int, d: int, device: torch.device, threshold: float, precision: str = "fp32",
                 max_candidates: int = 50_000_000, block_rows: int = 4096, progress: bool = False,
                 eager: bool = True):
        self.d, self.device, self.threshold = d, device, float(threshold)
        self.t2 = self.threshold * self.threshold  # collision threshold, squared
        self.precision = precision  # screening arithmetic: fp32 | tf32x3
        self.c, self.eta = screening_constant(d, precision), underflow_term(d)  # bound constants
        self.slack = 1.0 + 2.0 * rerank_rel(d)  # inflation of exact thresholds for the fp64 re-rank error
        self.max_candidates = int(max_candidates)  # budget of exact re-ranks
        self.tau = math.inf  # best exact squared distance so far
        self.pair: tuple[int, int] | None = None  # its pair, caller numbering, i < j
        self.nn_screen = torch.full((m,), math.inf, dtype=torch.float32, device=device)  # best s^ per row
        self.nn_exact = torch.full((m,), math.inf, dtype=torch.float64, device=device)  # best exact d^2 per row
        self.nn_partner = torch.full((m,), -1, dtype=torch.int64, device=device)  # engine index of screened nn
        # True: re-rank a row's screened nearest neighbour whenever it improves (both blocks are in
        # memory: needed out of core); False: once at the end (settle_nearest), for in-memory data
        self.eager = eager
        self.coll: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (i, j, d) collision batches
        self.n_candidates = 0  # pairs re-ranked exactly because they passed the screening bound
        self.n_skipped = 0  # candidates left un-re-ranked once the budget was spent
        self.reason: str | None = None  # why the result is not certified
        self.panel = CPU_PANEL if device.type == "cpu" else GPU_PANEL
        self.buf = torch.empty(min(block_rows, max(m, 1)) ** 2, dtype=torch.float32, device=device)  # S tile
        self.tri: torch.Tensor | None = None  # lower-triangle mask of a diagonal panel (cached)
        self.bar = None
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=m * (m - 1) // 2, unit="pair", unit_scale=True, desc="pairs", smoothing=0.1)
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

    def _reduce(self, s: torch.Tensor):
        """Row minima + argmins (over columns) and column minima + argmins (over rows) of a tile."""
        if self.device.type == "cpu":
            rv, ri, cv, ci = _reduce_cpu(s.numpy())
            return (torch.from_numpy(rv), torch.from_numpy(ri)), (torch.from_numpy(cv), torch.from_numpy(ci))
        return torch.min(s, 1), torch.min(s, 0)

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
        (rv, ri), (cv, ci) = self._reduce(s)
        rows_i = torch.arange(r0, r1, device=self.device)
        cols_j = torch.arange(c0, c0 + q, device=self.device)
        self._nearest(bi, rows_i, bj, ri.to(self.device) + c0, rv.to(self.device))
        self._nearest(bj, cols_j, bi, ci.to(self.device) + r0, cv.to(self.device))

        k = int(torch.argmin(rv))
        smin = float(rv[k])
        if math.isfinite(smin):
            self._rerank(bi, rows_i[k:k + 1], bj, ri[k:k + 1].to(self.device) + c0, kind)
            thr = max(self.tau, self.t2) * self.slack + e
            if smin <= thr:
                self._candidates(s, rv, thr, bi, r0, bj, c0, kind)
        if self.bar is not None:
            self.bar.update(n_pairs)

    def _candidates(self, s, rv, thr: float, bi: Block, r0: int, bj: Block, c0: int, kind: str) -> None:
        """Re-rank every pair of the tile with s^ <= thr (within the budget)."""
        if self.device.type == "cpu":
            sel = np.flatnonzero(rv.numpy() <= thr)
            sub = s.numpy()[sel]
            rr, cc = np.nonzero(sub <= thr)
            vals = torch.from_numpy(sub[rr, cc])
            rr, cc = torch.from_numpy(sel[rr]), torch.from_numpy(cc)
        else:
            sel = torch.nonzero(rv <= thr)[:, 0]
            sub = s[sel]
            rr, cc = torch.nonzero(sub <= thr, as_tuple=True)
            vals = sub[rr, cc]
            rr = sel[rr]
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
                           f"re-ranks were not enough for the pairs within the screening bound of the minimum "
                           f"or of the threshold; raise search.max_candidates")
        self.n_skipped += vals.numel() - room
        return torch.topk(vals, room, largest=False).indices

    def _nearest(self, blk: Block, local: torch.Tensor, other: Block, other_local: torch.Tensor,
                 sv: torch.Tensor) -> None:
        """Rows of blk whose screened nearest neighbour improved: keep it, re-rank it exactly."""
        eng = blk.index[local]
        better = torch.nonzero(sv < self.nn_screen[eng])[:, 0]
        if better.numel() == 0:
            return
        self.nn_screen[eng[better]] = sv[better]
        self.nn_partner[eng[better]] = other.index[other_local[better]]
        if self.eager:
            d2 = exact_sq(blk.x, local[better], other.x, other_local[better])
            self.nn_exact.scatter_reduce_(0, eng[better], d2, "amin")
            self.nn_exact.scatter_reduce_(0, other.index[other_local[better]], d2, "amin")

    def settle_nearest(self, x: torch.Tensor) -> None:
        """Re-rank every row's screened nearest neighbour exactly (lazy mode; x: all rows, engine order)."""
        rows = torch.nonzero(self.nn_partner >= 0)[:, 0]
        d2 = exact_sq(x, rows, x, self.nn_partner[rows])
        self.nn_exact.scatter_reduce_(0, rows, d2, "amin")
        self.nn_exact.scatter_reduce_(0, self.nn_partner[rows], d2, "amin")

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
        if reorient:
            ri, rj = torch.minimum(ri, rj), torch.maximum(ri, rj)
        self.nn_exact.scatter_reduce_(0, ei, d2, "amin")
        self.nn_exact.scatter_reduce_(0, ej, d2, "amin")
        best = float(d2.min())
        if best <= self.tau:
            at = torch.nonzero(d2 == best)[:, 0]
            pair = min(zip(ri[at].tolist(), rj[at].tolist()))
            if best < self.tau or self.pair is None or pair < self.pair:
                self.tau, self.pair = best, pair
        if self.t2 > 0.0 and float(d2.min()) < self.t2 * self.slack:
            dist = d2.sqrt()
            hit = torch.nonzero(dist < self.threshold)[:, 0]
            if hit.numel():
                self.coll.append((ri[hit].cpu(), rj[hit].cpu(), dist[hit].cpu()))

    # ------------------------------------------------------------------ results
    def collisions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unique collision pairs (i, j, L2) sorted by (distance, i, j), caller numbering."""
        if not self.coll:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64)
        i, j, dist = (torch.cat(parts).numpy() for parts in zip(*self.coll))
        order = np.lexsort((j, i, dist))
        i, j, dist = i[order], j[order], dist[order]
        keep = np.ones(len(i), bool)
        keep[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])  # the faiss engine may see a pair twice
        return i[keep], j[keep], dist[keep]

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
        right = right_operand(bj.left, state.d)
        for bi in blocks(jb):
            state.screen(bi, bj, right, "cross")
        state.screen(bj, bj, right, "diag")
        log.debug("block %d done: tau=%.6g, %d candidates, %.1f s", jb, state.tau, state.n_candidates,
                  time.perf_counter() - tic)
