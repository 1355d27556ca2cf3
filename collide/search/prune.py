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
3. Tile pairs are visited in increasing order of their lower bound (the larger of the centre/radius
   bound and the distance between the tiles' bounding boxes in Z), the diagonal
   tiles first: they give every row an early upper bound of its nearest-neighbour distance. A tile
   pair whose bound exceeds the largest squared distance B that could still matter to any of its
   rows is skipped whole (and once the next bound exceeds every tile's B, the search stops).
4. In a visited tile pair, one fp32 GEMM screens the projected squared distances (width k + 3,
   not d + 2) with the rigorous bound; only the rows and columns with at least one pair whose
   certified lower bound can beat B go to the full-dimension fp32 screen and fp64 re-rank of
   symmetric.PairSearch, exactly as in the brute-force engine.

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

from collide.search.blocks import Block, augment, right_operand
from collide.search.bounds import (ETA64, PRUNE_MARGIN, U64, gamma, pair_bound, prune_coefficient,
                                   prune_threshold, screening_constant, underflow_term)
from collide.search.symmetric import PairSearch
from collide.search.tiles import as_threshold

PRUNE_MODES = ("auto", "off", "pca")
K = 64  # principal directions of the bound (the projected screen is (k + 3) / (d + 2) of a full one)
SAMPLE_ROWS = 2048  # rows the basis is estimated from (a fixed-seed sample; any basis is valid)
TILE_ROWS = {"cpu": 256, "cuda": 1024}  # rows per tile: the unit that is skipped or screened
AUTO_MIN_ROWS = 4096  # auto prunes from this many valid rows on (below, the brute force takes < 0.5 s here)
MEMORY_FRACTION = 0.25  # share of available host memory a streamed layer may take to be pruned in memory
CHUNK = 8192  # rows per step of the projection


def choose(prune: str, m: int, device: torch.device) -> tuple[bool, str | None]:
    """(prune?, why not) for ``search.prune`` = auto | off | pca, m valid rows, on ``device``.

    Rule for auto: prune on CPU from AUTO_MIN_ROWS rows on. Measured with
    benchmarks/suite/bench_prune.py (benchmarks/results/2026-12-03-prune.md): on LLM-like and real
    SmolLM2 rows the pruned search is faster than brute force from a few thousand rows on, and
    its overhead on rows that do not prune (isotropic noise) is that of the projected screen. On
    CUDA auto stays off until measured there (search.prune=pca runs it).
    """
    mode = check_mode(prune)
    if mode == "off":
        return False, None
    if mode == "pca":
        return True, None
    if device.type != "cpu":
        return False, "auto: not measured on CUDA (search.prune=pca turns it on)"
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


def load_rows(store, layer: int, block_rows: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, rows): the valid (finite) rows of a store layer in store order on ``dev``, and their store rows."""
    from collide.search.api import as_tensor
    from collide.search.blocks import finite_rows

    xs, rows, row = [], [], 0
    for _, states in store.iter_blocks(layer, block_rows):
        xb = as_tensor(states).to(dev)
        valid = torch.nonzero(finite_rows(xb, block_rows))[:, 0]
        xs.append(xb[valid])
        rows.append(valid + row)
        row += xb.shape[0]
    return torch.cat(xs), torch.cat(rows)


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


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (fp64); on CPU through numpy's multi-threaded BLAS."""
    if a.device.type == "cpu":
        return torch.from_numpy(a.numpy() @ b.numpy())
    return a @ b


def pca_basis(ws: torch.Tensor, k: int) -> torch.Tensor:
    """(d, k) fp64 basis of the leading principal directions of the sample ``ws`` (s, d) (fp64,
    centred), scaled so that ||V||_2 <= 1 holds for the stored values (bounds.PRUNE_PROOF)."""
    s, d = ws.shape
    if k >= d:
        v = torch.eye(d, dtype=torch.float64, device=ws.device)
    else:
        q = min(k + 8, s, d)
        g = torch.Generator(device="cpu").manual_seed(0)
        y = _mm(ws, torch.randn(d, q, generator=g, dtype=torch.float64).to(ws.device))
        for _ in range(2):  # power iterations sharpen the leading directions
            y = torch.linalg.qr(y).Q
            y = _mm(ws, _mm(ws.T.contiguous(), y))
        qy = torch.linalg.qr(y).Q
        small = _mm(qy.T.contiguous(), ws)  # (q, d)
        v = torch.linalg.svd(small, full_matrices=False).Vh[:k].T.contiguous()
    k = v.shape[1]
    gm = _mm(v.T.contiguous(), v)
    nu = float(torch.diagonal(gm).max()) * (1.0 + gamma(d, U64)) ** 2
    bound = (1.0 + gamma(k, U64)) * float(gm.abs().sum(1).max()) + k * gamma(d, U64) * nu * (1.0 + gamma(d, U64))
    return v * (1.0 / (math.sqrt(bound) * (1.0 + PRUNE_MARGIN)))


def project(x: torch.Tensor, mu: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Z (m, k + 1) fp64 = [V^T w, residual norm], W (m,) fp64 >= ||w||), w = fl64(x - mu) (not squared)."""
    m, d = x.shape
    k = v.shape[1]
    z = torch.empty(m, k + 1, dtype=torch.float64, device=x.device)
    w_norm = torch.empty(m, dtype=torch.float64, device=x.device)
    for s in range(0, m, CHUNK):
        w = x[s:s + CHUNK].to(torch.float64) - mu
        p = _mm(w, v)
        if w.device.type == "cpu":  # numpy: torch's CPU kernels are slower here
            wn, pn = w.numpy(), p.numpy()
            n2 = torch.from_numpy(np.einsum("ij,ij->i", wn, wn))
            r2 = (n2 - torch.from_numpy(np.einsum("ij,ij->i", pn, pn))).clamp(min=0.0)
        else:
            n2 = w.square().sum(1)
            r2 = (n2 - p.square().sum(1)).clamp(min=0.0)
        z[s:s + CHUNK, :k] = p
        z[s:s + CHUNK, k] = r2.sqrt()
        w_norm[s:s + CHUNK] = n2.sqrt() * (1.0 + gamma(d + 2, U64))
    return z, w_norm


def tree_order(z: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """(perm, offsets): rows in the leaf order of a median-split tree over z (m, k), each split on the
    coordinate of largest variance, leaves of at most ``tile`` rows; tile t is perm[off[t]:off[t+1]]."""
    leaves, stack = [], [np.arange(len(z))]
    while stack:
        idx = stack.pop()
        if len(idx) <= tile:
            leaves.append(idx)
            continue
        sub = z[idx]
        dim = int(np.argmax(sub.var(0)))
        half = len(idx) // 2
        part = np.argpartition(sub[:, dim], half, kind="introselect")
        stack.append(idx[part[half:]])
        stack.append(idx[part[:half]])
    sizes = np.array([len(leaf) for leaf in leaves], np.int64)
    return np.concatenate(leaves), np.concatenate([[0], np.cumsum(sizes)])


class PrunedSearch:
    """One pruned search over the rows x (m, d) of a PairSearch (engine index = row of x)."""

    def __init__(self, x: torch.Tensor, rows: torch.Tensor, mu: torch.Tensor, state: PairSearch, k: int = K,
                 tile: int | None = None):
        dev, (m, d) = x.device, x.shape
        self.x, self.rows, self.state, self.d = x, rows.to(dev), state, d
        self.tile = tile or TILE_ROWS.get(dev.type, 1024)
        g = torch.Generator(device="cpu").manual_seed(0)
        sample = torch.randperm(m, generator=g)[:SAMPLE_ROWS].sort().values.to(dev)
        self.k = min(k, d, len(sample))
        basis = pca_basis(x[sample].to(torch.float64) - mu, self.k)
        self.k = basis.shape[1]
        z, w_norm = project(x, mu, basis)
        perm, off = tree_order(z.cpu().numpy(), self.tile)
        self.off = off
        self.perm = torch.from_numpy(perm).to(dev)  # position in tile order -> engine index
        z, w_norm = z[self.perm], w_norm[self.perm]
        nt = len(off) - 1
        starts, ends = off[:-1], off[1:]
        # projected rows: fp32 screening operands, centred on their own mean (any centre is valid)
        self.lz, nz2 = augment(z, z.mean(0))
        self.rz = right_operand(self.lz, self.k + 1)
        self.cz, self.eta_z = screening_constant(self.k + 1, state.precision), underflow_term(self.k + 1)
        self.coef = prune_coefficient(d, self.k)
        self.mu, self.tiles = mu, {}  # tile -> its rows as a Block: built on first visit
        # per tile (host, fp64): largest norms, centre, radius in Z (moved by PRUNE_MARGIN the safe way)
        up, down = 1.0 + PRUNE_MARGIN, 1.0 - PRUNE_MARGIN
        seg = lambda v: np.array([float(v[a:b].max()) for a, b in zip(starts, ends)])  # noqa: E731
        self.nzmax = np.sqrt(seg(nz2))
        self.wmax = seg(w_norm) * up
        cent = torch.stack([z[a:b].mean(0) for a, b in zip(starts, ends)])
        tile_of = torch.from_numpy(np.repeat(np.arange(nt), np.diff(off))).to(dev)
        radius = seg((z - cent[tile_of]).square().sum(1).sqrt()) * up
        dist = torch.cdist(cent, cent, compute_mode="donot_use_mm_for_euclid_dist").cpu().numpy()
        ball = dist * down - (radius[:, None] + radius[None, :]) * up
        lo = torch.stack([z[a:b].amin(0) for a, b in zip(starts, ends)]).cpu().numpy()
        hi = torch.stack([z[a:b].amax(0) for a, b in zip(starts, ends)]).cpu().numpy()
        box = np.empty((nt, nt))
        step = max(1, (1 << 22) // (nt * (self.k + 1)))
        for a in range(0, nt, step):  # distance between bounding boxes: a lower bound of every pair's
            gap = np.maximum(lo[None, :, :] - hi[a:a + step, None, :], lo[a:a + step, None, :] - hi[None, :, :])
            box[a:a + step] = np.sqrt(np.square(gap.clip(min=0.0)).sum(-1)) * down
        delta = (self.coef * (self.wmax[:, None] + self.wmax[None, :]) + 2 * ETA64) * up
        self.tile_lb = np.maximum(ball, box) - delta  # lower bound of sqrt(D) over each tile pair (L2)
        self.bt = np.full(nt, math.inf)  # per tile: the largest B of its rows (squared)
        self.evaluated = 0.0  # entries of the full-dimension screen, diagonal tiles counted half
        self.tiles_done = 0

    # ------------------------------------------------------------------ bounds
    def row_bounds(self, eng: torch.Tensor) -> torch.Tensor:
        """B (squared, fp64) of the rows ``eng``: beyond it a pair cannot change any result of theirs."""
        st = self.state
        if st.nearest:
            return torch.minimum(st.nn_exact[eng], st.nn_ub[eng]).clamp(min=st.t2) * st.slack
        return torch.full(eng.shape, max(st.tau, st.t2) * st.slack, dtype=torch.float64, device=eng.device)

    def _tile_bound(self, t: int) -> float:
        return float(self.row_bounds(self.perm[self.off[t]:self.off[t + 1]]).max())

    # ------------------------------------------------------------------ search
    def run(self) -> dict:
        nt = len(self.off) - 1
        su, tu = np.triu_indices(nt)
        lb = self.tile_lb[su, tu]
        order = np.argsort(lb, kind="stable")
        st = self.state
        for n_done, o in enumerate(order):
            s, t, bound = int(su[o]), int(tu[o]), lb[o]
            if not st.nearest:
                self.bt[:] = max(st.tau, st.t2) * st.slack
            if n_done % 64 == 0 and bound > math.sqrt(self.bt.max()) * (1.0 + PRUNE_MARGIN):
                break  # every later tile pair has a larger bound: nothing left can matter
            if bound > math.sqrt(max(self.bt[s], self.bt[t])) * (1.0 + PRUNE_MARGIN):
                continue
            self._pair(s, t)
            self.tiles_done += 1
            if st.nearest:
                self.bt[s], self.bt[t] = self._tile_bound(s), self._tile_bound(t)
        m = self.x.shape[0]
        return {"method": "pca", "k": int(self.k), "tile_rows": int(self.tile),
                "pairs_evaluated_fraction": self.evaluated / max(m * (m - 1) / 2, 1.0),
                "tile_pairs_evaluated_fraction": self.tiles_done / max(len(order), 1), "reason": None}

    def _pair(self, s: int, t: int) -> None:
        """Screen tile pair (s, t) in the projection; the full search of the rows and columns that pass."""
        st = self.state
        a0, a1, b0, b1 = self.off[s], self.off[s + 1], self.off[t], self.off[t + 1]
        sz = st._gemm(self.lz[a0:a1], self.rz[b0:b1])
        if s == t:
            sz.fill_diagonal_(math.inf)
        ez = pair_bound(self.cz, self.eta_z, self.nzmax[s], self.nzmax[t])
        delta = self.coef * (self.wmax[s] + self.wmax[t]) + 2 * ETA64
        tr = as_threshold(prune_threshold(self.row_bounds(self.perm[a0:a1]), delta, ez)).to(sz.device)
        tc = as_threshold(prune_threshold(self.row_bounds(self.perm[b0:b1]), delta, ez)).to(sz.device)
        if sz.device.type == "cpu":
            sn = sz.numpy()
            hit = (sn <= tr.numpy()[:, None]) | (sn <= tc.numpy()[None, :])
            r_sel, c_sel = np.flatnonzero(hit.any(1)), np.flatnonzero(hit.any(0))
            if r_sel.size == 0:
                return
            r_sel, c_sel = torch.from_numpy(r_sel), torch.from_numpy(c_sel)
        else:
            hit = (sz <= tr[:, None]) | (sz <= tc[None, :])
            r_sel, c_sel = torch.nonzero(hit.any(1))[:, 0], torch.nonzero(hit.any(0))[:, 0]
            if r_sel.numel() == 0:
                return
        self.evaluated += r_sel.numel() * c_sel.numel() * (0.5 if s == t else 1.0)
        bi, bj = self._block(s, a0, a1, r_sel), self._block(t, b0, b1, c_sel)
        st.screen(bi, bj, right_operand(bj.left, self.d), "rect")

    def _block(self, t: int, a0: int, a1: int, sel: torch.Tensor) -> Block:
        """The rows ``sel`` (positions within tile t) as a Block of the engine."""
        if t not in self.tiles:
            pos = self.perm[a0:a1]
            x = self.x[pos]
            left, n2 = augment(x, self.mu)
            self.tiles[t] = Block(index=pos, rows=self.rows[pos], x=x, left=left, norm_max=math.sqrt(float(n2.max())))
        blk = self.tiles[t]
        if sel.numel() == a1 - a0:
            return blk
        sel = sel.to(blk.index.device)
        return Block(index=blk.index[sel], rows=blk.rows[sel], x=blk.x[sel], left=blk.left[sel],
                     norm_max=blk.norm_max)


def pruned_search(x: torch.Tensor, rows: torch.Tensor, mu: torch.Tensor, state: PairSearch, k: int = K,
                  tile: int | None = None) -> dict:
    """Run the pruned search of rows x (m, d) (caller rows ``rows``, fp64 mean mu) into ``state``;
    returns the result's ``prune`` record (method, k, tile_rows, pairs_evaluated_fraction,
    tile_pairs_evaluated_fraction, reason)."""
    m = x.shape[0]
    if m < 2:
        return {"method": "pca", "k": 0, "tile_rows": int(tile or 0), "pairs_evaluated_fraction": 0.0,
                "tile_pairs_evaluated_fraction": 0.0, "reason": None}
    info = PrunedSearch(x, rows, mu, state, k, tile).run()
    if state.bar is not None:
        state.bar.update(max(state.bar.total - state.bar.n, 0))
    return info
