"""Certified pruning of the exact search (``search.prune``): skip most of the pair matrix, same answers.

Needs only numpy and torch; device-agnostic (the tensors stay on the engine device, CPU or CUDA).
Hidden states are far from isotropic, so a projection onto k leading principal directions gives a
tight lower bound of every squared distance (the lemma and its floating-point proof:
bounds.PRUNE_PROOF). The search:

1. V: k principal directions of a sample of the rows centred on the fp64 mean (randomised range
   finder), scaled so that ||V||_2 <= 1 is proven; every row goes to Z = [V^T w, r] (k + 1 fp64
   values, r the residual norm), with ||Z_x - Z_y|| <= ||x - y|| + delta_xy.
2. Rows are ordered by a median-split tree over Z (each split on the widest coordinate), so close
   rows share tiles of TILE_ROWS rows; each tile gets a centre and a radius in Z.
3. Each tile is visited with itself and its NEAR_TILES nearest tiles first (early, tight bounds for
   every row), then every other tile pair in increasing order of its lower bound (the larger of the
   centre/radius bound and the distance between the tiles' bounding boxes in Z). A tile
   pair whose bound exceeds the largest squared distance B that could still matter to any of its
   rows is skipped whole (and once the next bound exceeds every tile's B, the search stops).
4. In a visited tile pair, only the rows whose distance in Z to the other tile's bounding box can
   still matter take part, then only the columns near the box of those rows, then only the rows
   near the box of those columns (a point's distance to a box bounds its distance to every row in
   it, as for a tile pair). fp32 GEMMs screen their projected squared distances with the rigorous
   bound, first on the LEVEL1 leading coordinates (plus the residual norm beyond them: the same
   bound with V's first columns), then on all k, each on the rows and columns the previous level
   left. The pairs whose certified lower bound can still beat B are then either re-ranked
   directly in fp64 (when they are few: DIRECT_COST) or their rows and columns go to the
   full-dimension fp32 screen and fp64 re-rank of symmetric.PairSearch, exactly as in the
   brute-force engine. Direct re-ranks are counted in n_candidates but not against
   max_candidates (each replaces a screen that would cost more).

B per row (squared): with ``nearest``, max(min(best exact nn, nn upper bound), threshold gate)
(1 + 2 rerank_rel); without, max(best exact distance, threshold gate) (1 + 2 rerank_rel). A pair
skipped has D > B for both its rows: it is nobody's nearest neighbour, not the minimum (nor a tie of
it) and not a collision, and B only decreases, so a skip stays valid. The minimum, its pair, the
collision list, every nn distance and ``certified`` are those of the brute-force engine.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from collide.search.blocks import Block, augment, centred_sq_norms, exact_sq, right_operand
from collide.search.bounds import (ETA64, PRUNE_MARGIN, pair_bound, prune_coefficient,
                                   prune_threshold, screening_constant, underflow_term)
from collide.search.projection import near_box, pca_basis, project, tree_order
from collide.search.symmetric import PairSearch
from collide.search.tiles import FLT_MAX, as_threshold

PRUNE_MODES = ("auto", "off", "pca")
# principal directions of the bound (the projected screen costs (k + 3) / (d + 2) of a full one). For the
# minimum and collisions a few suffice: on real SmolLM2 stores (d=576, layers 2, 4, 8; n=20,000 and 100,000)
# k=8..16 ran fastest, 32 about 15% and 64 about 60% slower (benchmarks/results/); the nn distances need the
# tighter projection (real SmolLM2 states, n=1000: pairs left for the nn distances 4-17% at k=64, 1.3-3.7% at
# k=128)
K = {True: 128, False: 16}
NEAR_TILES = 2  # nearest tiles visited with each tile before all others
LEVEL1 = 16  # width of the first, cheapest projected screen (then k): 16 beat 4, 8 and 32 (same runs)
SAMPLE_ROWS = 2048  # rows the basis is estimated from (a fixed-seed sample; any basis is valid)
# rows per tile, the unit that is skipped or screened (twice as many without nearest). CPU, n=20000,
# d=576, one core: without nearest 1.45 s at 1024 rows, 1.64 s at 512, 2.75 s at 256; with nearest
# (n=8000) 3.3 s at 512, 3.6 s at 1024 (LEVEL1=16)
TILE_ROWS = {"cpu": 512, "cuda": 2048}
AUTO_MIN_ROWS = 8192  # auto prunes from this many valid rows on (see choose)
MEMORY_FRACTION = 0.25  # share of available host memory a streamed layer may take to be pruned in memory
NUMPY_ON_CPU = True  # the per-tile work on CPU in numpy (faster there); False runs the torch code of CUDA
# A visited tile pair with h pairs left by the bound: they are re-ranked directly in fp64 when
# h * DIRECT_COST < (rows x columns to screen) + SCREEN_COST, in units of screened entries (CPU, d=576:
# an fp64 re-rank costs ~2 us, a screened entry ~30 ns single-threaded, a screen call ~1 ms)
DIRECT_COST = 64
GROUP_ROWS = 128  # rows of a tile pair screened together (each group only against the columns it needs)
SCREEN_COST = 16384


def choose(prune: str, m: int, device: torch.device, all_nearest: bool) -> tuple[bool, str | None]:
    """(prune?, why not) for ``search.prune`` = auto | off | pca, m valid rows, on ``device``;
    ``all_nearest``: whether every row's nearest neighbour is certified in the same pass.

    Rule for auto: prune on CPU from AUTO_MIN_ROWS valid rows on, unless every row's nearest
    neighbour is wanted; otherwise brute force. The rule follows benchmarks/suite/bench_prune.py and
    benchmarks/real_store_search.py (figures in benchmarks/results/): for the minimum and the
    collisions the pruned search wins from a few thousand rows on and more so as n grows; for every
    row's nearest neighbour it loses (the per-row bounds tighten too late, so a large share of pairs
    still needs its full distance), so auto leaves it off there (search.nearest=auto then certifies
    a sample's nearest neighbours in a pass of their own: collide.search.nearest).
    On CUDA auto stays off until measured (search.prune=pca runs it on any device).
    """
    mode = check_mode(prune)
    if mode == "off":
        return False, None
    if mode == "pca":
        return True, None
    if device.type != "cpu":
        return False, "auto: not measured on CUDA (search.prune=pca turns it on)"
    if all_nearest:
        return False, "auto: off when every row's nearest neighbour is certified (measured slower than brute force)"
    if m < AUTO_MIN_ROWS:
        return False, f"auto: {m} rows < {AUTO_MIN_ROWS}, brute force is as fast"
    return True, None


def check_mode(prune) -> str:
    """``search.prune`` as a string; a CollideError if it is not one of PRUNE_MODES."""
    mode = str(prune)
    if mode not in PRUNE_MODES:
        from collide.errors import CollideError
        raise CollideError(f"search.prune={mode!r} is not a pruning mode; use one of {list(PRUNE_MODES)}")
    return mode


def off_info(reason: str | None) -> dict | None:
    """The result's ``prune`` record when pruning did not run: None when it was not asked for."""
    if reason is None:
        return None
    return {"method": "off", "k": None, "tile_rows": None, "pairs_evaluated_fraction": 1.0,
            "tile_pairs_evaluated_fraction": 1.0, "reason": reason}


def fits_in_memory(m: int, d: int) -> bool:
    """Whether m rows of width d (fp32, with their screening operand) fit MEMORY_FRACTION of free host memory."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return False
    return 2.2 * m * d * 4 < MEMORY_FRACTION * free


def _hits(sv: np.ndarray, tr, tc) -> np.ndarray | None:
    """Boolean (P, Q): sv <= tr[row] or sv <= tc[col] (scalar tr: sv <= tr); None if no entry passes.
    Only the rows whose minimum passes, and the columns whose minimum passes, are compared."""
    if isinstance(tr, float):
        rows = np.flatnonzero(sv.min(1) <= tr)
        if rows.size == 0:
            return None
        h = np.zeros(sv.shape, bool)
        h[rows] = sv[rows] <= tr
        return h
    rows, cols = np.flatnonzero(sv.min(1) <= tr), np.flatnonzero(sv.min(0) <= tc)
    if rows.size == 0 and cols.size == 0:
        return None
    h = np.zeros(sv.shape, bool)
    h[rows] = sv[rows] <= tr[rows, None]
    if cols.size:
        h[:, cols] |= sv[:, cols] <= tc[cols]
    return h


def _nonzero(mask):
    """Indices of the True entries of a numpy or torch boolean array, as torch tensors (a tuple for 2-D)."""
    if isinstance(mask, np.ndarray):
        idx = np.nonzero(mask)
        return torch.from_numpy(idx[0]) if mask.ndim == 1 else tuple(torch.from_numpy(i) for i in idx)
    idx = torch.nonzero(mask)
    return idx[:, 0] if mask.ndim == 1 else (idx[:, 0], idx[:, 1])


class PrunedSearch:
    """One pruned search over the rows x (m, d) of a PairSearch (engine index = row of x)."""

    def __init__(self, x: torch.Tensor, rows: torch.Tensor, mu: torch.Tensor, state: PairSearch,
                 k: int | None = None, tile: int | None = None):
        dev, (m, d) = x.device, x.shape
        self.x, self.rows, self.state, self.d = x, rows.to(dev), state, d
        self.tile = tile or TILE_ROWS.get(dev.type, 1024) * (1 if state.nearest else 2)
        g = torch.Generator(device="cpu").manual_seed(0)
        sample = torch.randperm(m, generator=g)[:SAMPLE_ROWS].sort().values.to(dev)
        self.k = min(k or K[bool(state.nearest)], d, len(sample))
        basis = pca_basis(x[sample].to(torch.float64) - mu, self.k)
        self.k = basis.shape[1]
        z, w_norm, n2 = project(x, mu, basis)
        perm, off = tree_order(z.cpu().numpy(), self.tile)
        self.off = off
        self.perm = torch.from_numpy(perm).to(dev)  # position in tile order -> engine index
        z, w_norm, n2 = z[self.perm], w_norm[self.perm], n2[self.perm]
        nt = len(off) - 1
        starts, ends = off[:-1], off[1:]
        # projected rows, one level per width j (the first j coordinates of Z and the residual norm
        # of w beyond them: the same construction with V's first j columns): fp32 screening operands
        self.levels = [self._level(z, n2, j, d, off, state.precision) for j in sorted({min(LEVEL1, self.k), self.k})]
        self.coef = prune_coefficient(d, self.k)
        self.mu = mu
        # per tile (host, fp64): largest norms, centre, radius in Z (moved by PRUNE_MARGIN the safe way)
        up, down = 1.0 + PRUNE_MARGIN, 1.0 - PRUNE_MARGIN
        seg = lambda v: np.array([float(v[a:b].max()) for a, b in zip(starts, ends)])  # noqa: E731
        self.wmax = seg(w_norm) * up
        cent = torch.stack([z[a:b].mean(0) for a, b in zip(starts, ends)])
        tile_of = torch.from_numpy(np.repeat(np.arange(nt), np.diff(off))).to(dev)
        radius = seg((z - cent[tile_of]).square().sum(1).sqrt()) * up
        dist = torch.cdist(cent, cent, compute_mode="donot_use_mm_for_euclid_dist").cpu().numpy()
        ball = dist * down - (radius[:, None] + radius[None, :]) * up
        lo = torch.stack([z[a:b].amin(0) for a, b in zip(starts, ends)]).cpu().numpy()
        hi = torch.stack([z[a:b].amax(0) for a, b in zip(starts, ends)]).cpu().numpy()
        self.numpy = dev.type == "cpu" and NUMPY_ON_CPU  # tile work in numpy (else torch, as on CUDA)
        self.z = z.numpy() if self.numpy else z  # Z in tile order (the rows' own box bounds, _near_box)
        box = np.empty((nt, nt))
        step = max(1, (1 << 22) // (nt * (self.k + 1)))
        for a in range(0, nt, step):  # distance between bounding boxes: a lower bound of every pair's
            gap = np.maximum(lo[None, :, :] - hi[a:a + step, None, :], lo[a:a + step, None, :] - hi[None, :, :])
            box[a:a + step] = np.sqrt(np.square(gap.clip(min=0.0)).sum(-1)) * down
        self.delta = (self.coef * (self.wmax[:, None] + self.wmax[None, :]) + 2 * ETA64) * up
        self.tile_lb = np.maximum(ball, box) - self.delta  # lower bound of sqrt(D) over each tile pair (L2)
        self.cdist = dist  # distances between tile centres in Z (the visiting order)
        self.direct = 0  # pairs re-ranked exactly without a full-dimension screen
        self.bt = np.full(nt, math.inf)  # per tile: the largest B of its rows (squared)
        self.np_bounds = (state.nn_exact.numpy(), state.nn_ub.numpy()) if self.numpy else None
        self.evaluated = 0.0  # entries of the full-dimension screen, diagonal tiles counted half
        self.tiles_done = 0

    @staticmethod
    def _level(z: torch.Tensor, n2: torch.Tensor, j: int, d: int, off: np.ndarray, precision: str) -> dict:
        """Screening operands of the j-coordinate bound: rows [z_1..z_j, sqrt(max(n2 - sum z_i^2, 0))]."""
        k = z.shape[1] - 1
        zj = z if j == k else torch.cat([z[:, :j], (n2 - z[:, :j].square().sum(1)).clamp(min=0.0).sqrt()[:, None]], 1)
        lz, nz2 = augment(zj, zj.mean(0))  # centred on their own mean (any centre is valid)
        return {"lz": lz, "rz": right_operand(lz, j + 1), "c": screening_constant(j + 1, precision),
                "eta": underflow_term(j + 1), "coef": prune_coefficient(d, j),
                "nzmax": np.sqrt([float(nz2[a:b].max()) for a, b in zip(off[:-1], off[1:])])}

    # ------------------------------------------------------------------ bounds
    def row_bounds(self, eng: torch.Tensor) -> torch.Tensor:
        """B (squared, fp64) of the rows ``eng``: beyond it a pair cannot change any result of theirs."""
        st = self.state
        if st.nearest:
            return torch.minimum(st.nn_exact[eng], st.nn_ub[eng]).clamp(min=st.t2) * st.slack
        return torch.full(eng.shape, max(st.tau, st.t2) * st.slack, dtype=torch.float64, device=eng.device)

    def _tile_bound(self, t: int) -> float:
        return float(self.row_bounds(self.perm[self.off[t]:self.off[t + 1]]).max())

    def _thresholds(self, eng: torch.Tensor, delta: float, ez: float):
        """fp32 thresholds of the projected screen for the rows ``eng``: a scalar without nearest,
        else per row (numpy on CPU)."""
        st = self.state
        if not st.nearest:
            return float(as_threshold(torch.tensor([prune_threshold(max(st.tau, st.t2) * st.slack, delta, ez)],
                                                   dtype=torch.float64))[0])
        if self.np_bounds is not None:
            e = eng.numpy()
            b = np.maximum(np.minimum(self.np_bounds[0][e], self.np_bounds[1][e]), st.t2) * st.slack
            return np.minimum(prune_threshold(b, delta, ez), FLT_MAX).astype(np.float32)
        return as_threshold(prune_threshold(self.row_bounds(eng), delta, ez))

    # ------------------------------------------------------------------ search
    def run(self) -> dict:
        nt = len(self.off) - 1
        su, tu = np.triu_indices(nt)
        lb = self.tile_lb[su, tu]
        # first each tile with itself and its NEAR_TILES nearest tiles (early, tight bounds for every row)
        near = np.argsort(self.cdist, axis=1, kind="stable")[:, :NEAR_TILES + 1]
        first = np.zeros((nt, nt), bool)
        first[np.repeat(np.arange(nt), near.shape[1]), near.ravel()] = True
        first = (first | first.T)[su, tu]
        order = np.lexsort((lb, ~first))  # the first ones, then every other pair by increasing bound
        n_first = int(first.sum())
        st = self.state
        for step, o in enumerate(order):
            s, t, bound = int(su[o]), int(tu[o]), lb[o]
            if not st.nearest:
                self.bt[:] = max(st.tau, st.t2) * st.slack
            if bound > math.sqrt(max(self.bt[s], self.bt[t])) * (1.0 + PRUNE_MARGIN):
                # bounds only grow from here on, and B only shrinks: past every tile's B, nothing is left
                if step >= n_first and (step % 64 == 0 or not st.nearest) and \
                        bound > math.sqrt(self.bt.max()) * (1.0 + PRUNE_MARGIN):
                    break
                continue
            self._pair(s, t)
            self.tiles_done += 1
            if st.nearest:
                self.bt[s], self.bt[t] = self._tile_bound(s), self._tile_bound(t)
        st.n_candidates += self.direct
        m = self.x.shape[0]
        return {"method": "pca", "k": int(self.k), "tile_rows": int(self.tile),
                "pairs_evaluated_fraction": self.evaluated / max(m * (m - 1) / 2, 1.0),
                "tile_pairs_evaluated_fraction": self.tiles_done / max(len(order), 1), "reason": None}

    def _pair(self, s: int, t: int) -> None:
        """Screen tile pair (s, t) through the projection levels (each on the rows and columns the
        previous one left); then the full search, or direct fp64 re-ranks, of the pairs left."""
        st = self.state
        a0, a1, b0, b1 = self.off[s], self.off[s + 1], self.off[t], self.off[t + 1]
        eng_r, eng_c = self.perm[a0:a1], self.perm[b0:b1]
        ri = ci = hit = None  # rows and columns left (positions within the tiles), pairs left among them
        cpu = self.numpy
        if s != t:  # only the rows near the other tile's box, the columns near the box of those rows, ...
            reach = math.sqrt(max(self.bt[s], self.bt[t])) * (1.0 + PRUNE_MARGIN) + self.delta[s, t]
            zr, zc = self.z[a0:a1], self.z[b0:b1]
            ri = near_box(zr, zc, reach)
            ci = near_box(zc, zr[ri], reach)
            ri = ri[near_box(zr[ri], zc[ci], reach)]
            if len(ri) == 0 or len(ci) == 0:
                return
            ri, ci = (torch.from_numpy(ri), torch.from_numpy(ci)) if cpu else (ri, ci)
        for lev in self.levels:
            lz, rz = lev["lz"][a0:a1], lev["rz"][b0:b1]
            er, ec = eng_r, eng_c
            if ri is not None:
                lz, rz, er, ec = lz[ri], rz[ci], er[ri], ec[ci]
            sz = st._gemm(lz, rz)
            ez = pair_bound(lev["c"], lev["eta"], lev["nzmax"][s], lev["nzmax"][t])
            delta = lev["coef"] * (self.wmax[s] + self.wmax[t]) + 2 * ETA64
            tr, tc = self._thresholds(er, delta, ez), self._thresholds(ec, delta, ez)
            h = _hits(sz.numpy(), tr, tc) if cpu else (sz <= tr) if isinstance(tr, float) else \
                (sz <= tr[:, None]) | (sz <= tc[None, :])
            if h is None:
                return
            if hit is None:
                if s == t:  # a pair is left only if neither orientation rules it out
                    h = h & h.T
                    h = np.triu(h, 1) if cpu else torch.triu(h, 1)
            else:
                h &= hit
            r_keep, c_keep = _nonzero(h.any(1)), _nonzero(h.any(0))
            if r_keep.numel() == 0:
                return
            hit = h[np.ix_(r_keep.numpy(), c_keep.numpy())] if cpu else h[r_keep][:, c_keep]
            ri = r_keep if ri is None else ri[r_keep]
            ci = c_keep if ci is None else ci[c_keep]
        for g0 in range(0, ri.numel(), GROUP_ROWS):  # groups of rows, each with the columns it needs
            hg = hit[g0:g0 + GROUP_ROWS]
            cg = _nonzero(hg.any(0))
            if cg.numel() == 0:
                continue
            hg = hg[:, cg.numpy()] if cpu else hg[:, cg]
            rg, cgi = ri[g0:g0 + GROUP_ROWS], ci[cg]
            n_hit = int(np.count_nonzero(hg)) if cpu else int(hg.sum())
            full = rg.numel() * cgi.numel()
            if n_hit * DIRECT_COST < full + SCREEN_COST:  # few pairs: re-rank them exactly, without a screen
                ii, jj = _nonzero(hg)
                ei, ej = eng_r[rg[ii].to(eng_r.device)], eng_c[cgi[jj].to(eng_c.device)]
                st.offer(self.rows[ei], self.rows[ej], ei, ej, exact_sq(self.x, ei, self.x, ej), True)
                self.direct += n_hit
                self.evaluated += n_hit
                continue
            self.evaluated += full * (0.5 if s == t else 1.0)
            bi, bj = self._block(eng_r[rg.to(eng_r.device)]), self._block(eng_c[cgi.to(eng_c.device)])
            st.screen(bi, bj, right_operand(bj.left, self.d), "rect")

    def _block(self, eng: torch.Tensor) -> Block:
        """The rows ``eng`` (engine indices) as a Block of the engine, built for one screen (nothing is cached:
        the search holds the rows once, in ``x``)."""
        x = self.x[eng]
        left, n2 = augment(x, self.mu)
        return Block(index=eng, rows=self.rows[eng], x=x, left=left, norm_max=math.sqrt(float(n2.max())))


def pruned_search(x: torch.Tensor, rows: torch.Tensor, mu: torch.Tensor, state: PairSearch,
                  k: int | None = None, tile: int | None = None) -> dict:
    """Run the pruned search of rows x (m, d) (caller rows ``rows``, fp64 mean mu) into ``state``;
    returns the result's ``prune`` record (method, k, tile_rows, pairs_evaluated_fraction,
    tile_pairs_evaluated_fraction, reason)."""
    m = x.shape[0]
    if m < 2:
        return {"method": "pca", "k": 0, "tile_rows": int(tile or 0), "pairs_evaluated_fraction": 0.0,
                "tile_pairs_evaluated_fraction": 0.0, "reason": None}
    state.centred2[:] = centred_sq_norms(x, mu)
    info = PrunedSearch(x, rows, mu, state, k, tile).run()
    if state.bar is not None:
        state.bar.update(max(state.bar.total - state.bar.n, 0))
    return info
