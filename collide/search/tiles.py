"""Reductions of one screened tile S (P, Q) of fp32 values s^ (squared distances, see bounds.py).

Needs only numpy and torch. On CPU the work is done in numpy (torch's CPU kernels are several
times slower on these shapes); on CUDA in torch.
"""

from __future__ import annotations

import numpy as np
import torch

COL_CHUNK = 32  # rows per step of the CPU tile reduction (a chunk stays in cache)
FLT_MAX = float(np.finfo(np.float32).max)  # thresholds are clamped to it: masked entries (inf) never pass


def _reduce_cpu(s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row min, row argmin, column min, column argmin, row second min, chunk column minima) of a
    tile s (P, Q).

    First index among ties. One pass over s in chunks of COL_CHUNK rows that stay in cache:
    numpy's argmin(axis=0) walks columns with a stride and is ~10x slower. A chunk's column argmin
    is only computed for the columns whose minimum it improves. The row second minima (the
    smallest entry besides the argmin) and the chunk column minima (ceil(P / COL_CHUNK), Q) let
    select() skip the rows and chunks that hold no candidate besides a minimum.
    """
    p = s.shape[0]
    ri, rv, rv2 = np.empty(p, np.int64), np.empty(p, s.dtype), np.empty(p, s.dtype)
    cmins = np.empty((-(-p // COL_CHUNK), s.shape[1]), s.dtype)
    cv = ci = None
    for c, r0 in enumerate(range(0, p, COL_CHUNK)):
        chunk = s[r0:r0 + COL_CHUNK]
        at = chunk.argmin(1)
        ri[r0:r0 + COL_CHUNK] = at
        v = cmins[c]
        np.min(chunk, 0, out=v)
        lines = np.arange(len(chunk))
        rv[r0:r0 + COL_CHUNK] = chunk[lines, at]
        chunk[lines, at] = np.inf
        np.min(chunk, 1, out=rv2[r0:r0 + COL_CHUNK])
        chunk[lines, at] = rv[r0:r0 + COL_CHUNK]
        if cv is None:
            cv, ci = v.copy(), chunk.argmin(0)
            continue
        better = np.flatnonzero(v < cv)
        if better.size:
            ci[better] = chunk[:, better].argmin(0) + r0
            cv[better] = v[better]
    return rv, ri, cv, ci, rv2, cmins


def reduce_tile(s: torch.Tensor):
    """((row min, row argmin), (column min, column argmin), extra) of a tile, as tensors on its
    device; extra: (row second minima, chunk column minima) on CPU (see _reduce_cpu), None on CUDA."""
    if s.device.type == "cpu":
        rv, ri, cv, ci, rv2, cmins = _reduce_cpu(s.numpy())
        return (torch.from_numpy(rv), torch.from_numpy(ri)), (torch.from_numpy(cv), torch.from_numpy(ci)), (rv2, cmins)
    return torch.min(s, 1), torch.min(s, 0), None


def as_threshold(t: torch.Tensor) -> torch.Tensor:
    """fp64 thresholds t as fp32, clamped to FLT_MAX.

    For an fp32 value s, ``s <= fl32(t)`` holds whenever ``s <= t`` does (round to nearest moves t
    at most to the neighbouring fp32 value, never past an fp32 value below t), so comparing in fp32
    never loses a candidate; the clamp keeps inf (masked) entries out.
    """
    return t.clamp(max=FLT_MAX).to(torch.float32)


def _select_cpu(s: np.ndarray, rv: np.ndarray, ri: np.ndarray, extra, tr: np.ndarray, tc: np.ndarray | None):
    """select() on CPU. Rows: each row whose minimum is within tr gives it, and is compared whole
    only if its second smallest entry is within tr too. Columns: only the COL_CHUNK entries of the
    (chunk, column) pairs whose chunk minimum is within tc, gathered at once, only for the entries
    the row test did not take. No copy of the tile."""
    rv2, cmins = extra
    q = s.shape[1]
    rsel = np.flatnonzero(rv <= tr)
    more = rsel[rv2[rsel] <= tr[rsel]]
    sub = s[more]
    f = np.flatnonzero(sub <= tr[more, None])
    rows, cols, vals = [rsel, more[f // q]], [ri[rsel], f % q], [rv[rsel], sub.ravel()[f]]
    keep = cols[1] != ri[rows[1]]  # the minima are listed already
    rows[1], cols[1], vals[1] = rows[1][keep], cols[1][keep], vals[1][keep]
    if tc is not None:  # the COL_CHUNK entries of every (chunk, column) whose minimum passes tc, at once
        chunk, col = np.nonzero(cmins <= tc[None, :])
        at = np.minimum(chunk[:, None] * COL_CHUNK + np.arange(COL_CHUNK), len(rv) - 1)  # last chunk: repeats
        sub = s[at, col[:, None]]
        hit = sub <= tc[col, None]
        hit &= sub > tr[at]  # entries the row test did not take
        hit[:, 1:] &= at[:, 1:] != at[:, :-1]  # each entry of a short last chunk once
        f = np.flatnonzero(hit)
        rows.append(at.ravel()[f])
        cols.append(col[f // COL_CHUNK])
        vals.append(sub.ravel()[f])
    return tuple(torch.from_numpy(np.concatenate(p)) for p in (rows, cols, vals))


def select(s: torch.Tensor, rv: torch.Tensor, ri: torch.Tensor, cv: torch.Tensor, extra, tr: torch.Tensor,
           tc: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, values) of the entries of s with s <= tr[row] or s <= tc[col], each entry once.

    rv, ri, cv: row minima and argmins and column minima of s; extra: from reduce_tile (CPU);
    tr (P,), tc (Q,): fp32 thresholds (tc None: rows only). Only the rows whose minimum passes tr,
    and the columns whose minimum passes tc, are scanned.
    """
    if s.device.type == "cpu":
        return _select_cpu(s.numpy(), rv.numpy(), ri.numpy(), extra, tr.numpy(), None if tc is None else tc.numpy())
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
