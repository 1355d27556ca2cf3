"""The faiss backend: k-NN screening with FAISS IndexFlatL2, certified row by row. In memory only.

1. Bitwise-identical rows are collapsed to one representative (the first), so that k-NN lists are
   not swamped by duplicates; each group is expanded at the end into distance-0 collisions, and
   every collision between representatives into the cross pairs of their groups.
2. The representatives, centered on the fp64 mean, go into an IndexFlatL2 (fp32; on all GPUs when
   faiss-gpu sees one, with use_cuvs=False since cuVS zeroes small distances). Each row's k + 1
   nearest are searched; the self match is excluded **by index**, not by position (duplicates of
   a row in fp32 can come first).
3. Every returned neighbour is re-ranked exactly in fp64. Row i is complete when its largest
   returned screened distance D_k(i) satisfies D_k(i) - E_i > max(nn_i, threshold^2) (1 + 2
   rerank_rel), nn_i = row i's best exact squared distance (tau instead without ``nearest``),
   E_i = bound at (||a_i||, max ||a||): every unseen j then has s^ >= D_k(i), so its exact squared
   distance exceeds nn_i >= tau and threshold^2: row i's nearest neighbour is exact. FAISS computes ||x||^2 + ||y||^2 -
   2<x, y> with fp32 norms and an fp32 GEMM (or a direct fp32 sum of squared differences for few
   queries), errors within the fp32 bound of bounds.py; results are squared distances.
4. Incomplete rows are searched again with k doubled, up to max_k, then screened directly against
   all rows by the symmetric engine's tile routine (rows x all rows), which completes them.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from collide.search.bounds import pair_bound
from collide.search.blocks import Block, augment, centred_sq_norms, right_operand, sum_rows
from collide.search.symmetric import PairSearch

log = logging.getLogger(__name__)


def duplicate_groups(x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(representatives, groups) of the rows of x (m, d): the first row of each bitwise-distinct
    value (ascending), and the rows of every value that occurs more than once (ascending, the
    representative first)."""
    m, d = x.shape
    key = np.ascontiguousarray(x).view(np.dtype((np.void, x.dtype.itemsize * d))).ravel()
    _, first, inverse, counts = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
    order = np.argsort(inverse.ravel(), kind="stable")
    ends = np.cumsum(counts)
    groups = [order[ends[g] - counts[g]:ends[g]] for g in np.flatnonzero(counts > 1)]
    return np.sort(first), groups


def _index(a: np.ndarray, dev: torch.device):
    """IndexFlatL2 holding a (r, d) fp32: on all GPUs (use_cuvs=False) when faiss-gpu sees one and dev is cuda."""
    import faiss

    index = faiss.IndexFlatL2(a.shape[1])
    if dev.type == "cuda" and faiss.get_num_gpus() > 0:
        co = faiss.GpuMultipleClonerOptions()
        if hasattr(co, "use_cuvs"):
            co.use_cuvs = False  # cuVS zeroes squared distances below ~1e-3 for equal norms
        index = faiss.index_cpu_to_all_gpus(index, co=co)
    index.add(a)
    return index


def faiss_search(x: np.ndarray, threshold: float, dev: torch.device, *, block_rows: int, k: int, max_k: int,
                 max_candidates: int, threads: int, nearest: bool = True) -> tuple[PairSearch, np.ndarray, np.ndarray]:
    """Certified search of the rows of x (n, d) with FAISS screening.

    Returns the finished PairSearch (engine index = valid-row index, caller rows = rows of x), the
    valid rows and the invalid (NaN/Inf) rows.
    """
    import faiss

    n, d = x.shape
    valid = np.isfinite(x).all(1)
    valid_rows, invalid_rows = np.flatnonzero(valid), np.flatnonzero(~valid)
    xv = x if len(invalid_rows) == 0 else x[valid_rows]
    m = len(xv)
    state = PairSearch(m, d, torch.device("cpu"), threshold, "fp32", max_candidates, block_rows, nearest=nearest)
    if m < 2:
        return state, valid_rows, invalid_rows
    saved_threads = faiss.omp_get_max_threads()
    if threads:
        faiss.omp_set_num_threads(threads)
    try:
        reps, groups = duplicate_groups(xv)
        xt = torch.from_numpy(np.ascontiguousarray(xv))
        mu = sum_rows(xt, block_rows) / m
        state.centred2[:] = centred_sq_norms(xt, mu)
        left, norm2 = augment(xt[reps], mu)
        rep = Block(index=torch.from_numpy(reps), rows=torch.from_numpy(valid_rows[reps]), x=xt[reps], left=left,
                    norm_max=math.sqrt(float(norm2.max())))
        norms = norm2.sqrt()
        pending = _knn_rounds(state, rep, norms.numpy(), dev, k, max_k) if len(reps) > 1 else reps[:0]
        if pending.size:
            log.info("faiss: %d rows still uncertified at k=%d: screening them against all rows", pending.size, max_k)
            _direct(state, rep, norms, torch.from_numpy(pending), block_rows)
        _expand(state, groups, valid_rows)
    finally:
        faiss.omp_set_num_threads(saved_threads)
    return state, valid_rows, invalid_rows


def _knn_rounds(state: PairSearch, rep: Block, norms: np.ndarray, dev: torch.device, k: int, max_k: int
                ) -> np.ndarray:
    """k-NN rounds with k doubling up to max_k; returns the representatives still incomplete."""
    r, d = rep.left.shape[0], state.d
    a = np.ascontiguousarray(rep.left[:, :d].numpy())
    index = _index(a, dev)
    pending, kk = np.arange(r), k
    while pending.size:
        kq = min(kk + 1, r)
        dist, nbr = index.search(a[pending], kq)  # squared, fp32, ascending
        q = np.repeat(pending, kq)
        hit = (nbr.ravel() >= 0) & (nbr.ravel() != q)  # self excluded by index
        qi, qj = torch.from_numpy(q[hit]), torch.from_numpy(nbr.ravel()[hit])
        keep = state.within_budget(torch.from_numpy(dist.ravel()[hit]))
        if keep is not None:
            qi, qj = qi[keep], qj[keep]
        state.rerank(rep, qi, rep, qj, reorient=True)
        if kq == r:  # every row was returned: nothing unseen
            return pending[:0]
        bound = pair_bound(state.c, state.eta, norms[pending], rep.norm_max)  # E_i, elementwise
        # complete: no unseen neighbour can beat (or tie) the row's exact nn, tau or the collision gate
        best = state.nn_exact[rep.index[pending]].numpy() if state.nearest else state.tau
        done = dist[:, -1].astype(np.float64) - bound > np.maximum(best, max(state.tau, state.t2)) * state.slack
        log.debug("faiss: k=%d, %d of %d rows complete", kk, int(done.sum()), pending.size)
        pending = pending[~done]
        if kk >= max_k:
            break
        kk = min(2 * kk, max_k)
    return pending


def _direct(state: PairSearch, rep: Block, norms: torch.Tensor, rows: torch.Tensor, block_rows: int) -> None:
    """Screen the representatives ``rows`` against all representatives (tiles of the symmetric engine).

    norms: (r,) fp64 ||a|| of every representative."""
    r = rep.left.shape[0]
    for s in range(0, len(rows), block_rows):
        sel = rows[s:s + block_rows]
        bi = Block(index=rep.index[sel], rows=rep.rows[sel], x=rep.x[sel], left=rep.left[sel],
                   norm_max=float(norms[sel].max()))
        for t in range(0, r, block_rows):
            bj = Block(index=rep.index[t:t + block_rows], rows=rep.rows[t:t + block_rows], x=rep.x[t:t + block_rows],
                       left=rep.left[t:t + block_rows], norm_max=rep.norm_max)
            state.screen(bi, bj, right_operand(bj.left, state.d), "rect")


def _expand(state: PairSearch, groups: list[np.ndarray], valid_rows: np.ndarray) -> None:
    """Bring the collapsed duplicates back: distance-0 pairs within groups, cross pairs of collisions."""
    if not groups:
        return
    rep_collisions = list(state.coll)  # before the groups' own pairs join the list
    members = {int(valid_rows[g[0]]): valid_rows[g] for g in groups}  # representative's row -> its group's rows
    for g in groups:  # the smallest pair of each group, at exactly 0, for the minimum and the nn distances
        # each member's nearest neighbour: the group's first row (the first's own: the second), at exactly 0
        partner = valid_rows[np.where(np.arange(len(g)) == 0, g[1], g[0])]
        state.record_nn(torch.from_numpy(g), torch.from_numpy(partner), torch.zeros(len(g), dtype=torch.float64))
        first, second = torch.from_numpy(g[:1]), torch.from_numpy(g[1:2])
        state.offer(torch.from_numpy(valid_rows[g[:1]]), torch.from_numpy(valid_rows[g[1:2]]), first, second,
                    torch.zeros(1, dtype=torch.float64))
    if state.threshold == 0.0:
        return
    extra_i, extra_j, extra_d = [], [], []
    for g in groups:  # within a group: every pair, distance 0 (the pair offered above is already listed)
        rows = valid_rows[g]
        iu, ju = np.triu_indices(len(rows), 1)
        extra_i.append(rows[iu][1:])
        extra_j.append(rows[ju][1:])
        extra_d.append(np.zeros(len(iu) - 1))
    for ci, cj, cd in rep_collisions:  # collisions between representatives -> their groups' cross pairs
        for a, b, dist in zip(ci.tolist(), cj.tolist(), cd.tolist()):
            ga, gb = members.get(a), members.get(b)
            if ga is None and gb is None:
                continue
            ga = np.array([a]) if ga is None else ga
            gb = np.array([b]) if gb is None else gb
            pi, pj = np.repeat(ga, len(gb)), np.tile(gb, len(ga))
            extra_i.append(np.minimum(pi, pj))
            extra_j.append(np.maximum(pi, pj))
            extra_d.append(np.full(len(pi), dist))
    i, j, dist = np.concatenate(extra_i), np.concatenate(extra_j), np.concatenate(extra_d)
    if len(i) > state.max_candidates:
        state.reason = state.reason or (f"{len(i)} duplicate collision pairs exceed search.max_candidates="
                                        f"{state.max_candidates}: the list is truncated; raise search.max_candidates")
        i, j, dist = i[:state.max_candidates], j[:state.max_candidates], dist[:state.max_candidates]
    state.coll.append((i, j, dist))
