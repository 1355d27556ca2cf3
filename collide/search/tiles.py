"""Reductions of one screened tile S (P, Q) of fp32 values s^ (squared distances, see bounds.py).

Needs only numpy and torch. On CPU the work is done in numpy (torch's CPU kernels are several
times slower on these shapes); on CUDA in torch.
"""

from __future__ import annotations

import numpy as np
import torch

COL_CHUNK = 32  # rows per step of the CPU tile reduction (a chunk stays in cache)
FLT_MAX = float(np.finfo(np.float32).max)  # thresholds are clamped to it: masked entries (inf) never pass


def _reduce_cpu(s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row min, row argmin, column min, column argmin, chunk column minima) of a tile s (P, Q).

    First index among ties. One pass over s in chunks of COL_CHUNK rows that stay in cache:
    numpy's argmin(axis=0) walks columns with a stride and is ~10x slower. A chunk's column argmin
    is only computed for the columns whose minimum it improves. The chunk column minima
    (ceil(P / COL_CHUNK), Q) let select() skip the chunks that hold no candidate.
    """
    ri = np.empty(s.shape[0], np.int64)
    cmins = np.empty((-(-s.shape[0] // COL_CHUNK), s.shape[1]), s.dtype)
    cv = ci = None
    for c, r0 in enumerate(range(0, s.shape[0], COL_CHUNK)):
        chunk = s[r0:r0 + COL_CHUNK]
        ri[r0:r0 + COL_CHUNK] = chunk.argmin(1)
        v = cmins[c]
        np.min(chunk, 0, out=v)
        if cv is None:
            cv, ci = v.copy(), chunk.argmin(0)
            continue
        better = np.flatnonzero(v < cv)
        if better.size:
            ci[better] = chunk[:, better].argmin(0) + r0
            cv[better] = v[better]
    rv = np.take_along_axis(s, ri[:, None], 1)[:, 0]
    return rv, ri, cv, ci, cmins


def reduce_tile(s: torch.Tensor):
    """((row min, row argmin), (column min, column argmin), chunk column minima or None) of a tile,
    as tensors on its device (the chunk minima: CPU only, see _reduce_cpu)."""
    if s.device.type == "cpu":
        rv, ri, cv, ci, cmins = _reduce_cpu(s.numpy())
        return (torch.from_numpy(rv), torch.from_numpy(ri)), (torch.from_numpy(cv), torch.from_numpy(ci)), cmins
    return torch.min(s, 1), torch.min(s, 0), None


def as_threshold(t: torch.Tensor) -> torch.Tensor:
    """fp64 thresholds t as fp32, clamped to FLT_MAX.

    For an fp32 value s, ``s <= fl32(t)`` holds whenever ``s <= t`` does (round to nearest moves t
    at most to the neighbouring fp32 value, never past an fp32 value below t), so comparing in fp32
    never loses a candidate; the clamp keeps inf (masked) entries out.
    """
    return t.clamp(max=FLT_MAX).to(torch.float32)


def _select_cpu(s: np.ndarray, rv: np.ndarray, cmins: np.ndarray, tr: np.ndarray, tc: np.ndarray | None):
    """select() on CPU, chunk by chunk (COL_CHUNK rows, in cache): a chunk is read only if one of its
    rows has its minimum within tr, or one of its chunk column minima is within tc; then only those
    rows and columns of it are compared (no copy of the tile)."""
    q = s.shape[1]
    row_ok = rv <= tr
    col_ok = np.zeros(cmins.shape, bool) if tc is None else cmins <= tc[None, :]
    chunk_rows = np.zeros(len(cmins), bool)
    np.logical_or.at(chunk_rows, np.arange(len(rv)) // COL_CHUNK, row_ok)
    rows, cols, vals = [], [], []
    for c in np.flatnonzero(chunk_rows | col_ok.any(1)):
        r0 = c * COL_CHUNK
        chunk, thr = s[r0:r0 + COL_CHUNK], tr[r0:r0 + COL_CHUNK]
        rsel = np.flatnonzero(row_ok[r0:r0 + COL_CHUNK])
        if rsel.size:
            sub = chunk[rsel]
            f = np.flatnonzero(sub <= thr[rsel, None])
            rows.append(rsel[f // q] + r0)
            cols.append(f % q)
            vals.append(sub.ravel()[f])
        csel = np.flatnonzero(col_ok[c])
        if csel.size:
            sub = chunk[:, csel]
            hit = sub <= tc[csel]
            hit &= sub > thr[:, None]  # entries the row test did not take
            f = np.flatnonzero(hit)
            rows.append(f // csel.size + r0)
            cols.append(csel[f % csel.size])
            vals.append(sub.ravel()[f])
    if not rows:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    return tuple(torch.from_numpy(np.concatenate(p)) for p in (rows, cols, vals))


def select(s: torch.Tensor, rv: torch.Tensor, cv: torch.Tensor, cmins, tr: torch.Tensor, tc: torch.Tensor | None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, values) of the entries of s with s <= tr[row] or s <= tc[col], each entry once.

    rv, cv: row and column minima of s; cmins: chunk column minima (CPU, from reduce_tile);
    tr (P,), tc (Q,): fp32 thresholds (tc None: rows only). Only the rows whose minimum passes tr,
    and the columns whose minimum passes tc, are scanned.
    """
    if s.device.type == "cpu":
        return _select_cpu(s.numpy(), rv.numpy(), cmins, tr.numpy(), None if tc is None else tc.numpy())
    sel = torch.nonzero(rv <= tr)[:, 0]
    sub = s[sel]
    rr, cc = torch.nonzero(sub <= tr[sel, None], as_tuple=True)
    rows, cols, vals = [sel[rr]], [cc], [sub[rr, cc]]
    if tc is not None:
        cs = torch.nonzero(cv <= tc)[:, 0]
        if cs.numel():
            sub = s[:, cs]
            r2, c2 = torch.nonzero((sub <= tc[cs]) & (sub > tr[:, None]), as_tuple=True)
            rows.append(r2)
            cols.append(cs[c2])
            vals.append(sub[r2, c2])
    return torch.cat(rows), torch.cat(cols), torch.cat(vals)
