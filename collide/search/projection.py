"""The geometry of the pruned search (prune.py): the projection Z of every row onto principal directions, the
median-split tree that orders rows into tiles, and bounding-box distances in Z.

Needs only numpy and torch. Every function here is exact in the sense the pruned search needs: the
projection's floating-point error is bounded (bounds.PRUNE_PROOF), the box distances are moved by
PRUNE_MARGIN the safe way, and the tree and the directions may be anything (they only decide how
tight the bounds are, never whether they hold).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from collide.search.bounds import PRUNE_MARGIN, U64, gamma

CHUNK = 8192  # rows per step of the projection
VAR_ROWS = 4096  # rows a tree node estimates its coordinates' variances from (the split dimension)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (fp64); on CPU through numpy's multi-threaded BLAS."""
    if a.device.type == "cpu":
        return torch.from_numpy(a.numpy() @ b.numpy())
    return a @ b


def pca_basis(ws: torch.Tensor, k: int) -> torch.Tensor:
    """(d, k) fp64 basis of the leading principal directions of the sample ``ws`` (s, d) (centred),
    scaled so that ||V||_2 <= 1 holds for the stored values (bounds.PRUNE_PROOF). The directions
    are estimated in fp32 (a randomised range finder, one power iteration): any basis is valid, only
    the scaling needs to be rigorous, and it is computed in fp64 from the stored values."""
    s, d = ws.shape
    if k >= d:
        v = torch.eye(d, dtype=torch.float64, device=ws.device)
    else:
        q = min(k + 8, s, d)
        g = torch.Generator(device="cpu").manual_seed(0)
        omega = torch.randn(d, q, generator=g, dtype=torch.float32)
        if ws.device.type == "cpu":  # numpy's BLAS takes the transposes without copies
            a = ws.numpy().astype(np.float32)
            y = np.linalg.qr(a @ omega.numpy())[0]
            y = np.linalg.qr(a @ (a.T @ y))[0]
            vh = np.linalg.svd(y.T @ a, full_matrices=False)[2]
            v = torch.from_numpy(vh[:k].T.astype(np.float64))
        else:
            a = ws.to(torch.float32)
            y = torch.linalg.qr(a @ omega.to(a.device)).Q
            y = torch.linalg.qr(a @ (a.T @ y)).Q
            v = torch.linalg.svd(y.T @ a, full_matrices=False).Vh[:k].T.to(torch.float64)
        v = v.contiguous()
    k = v.shape[1]
    gm = _mm(v.T.contiguous(), v)
    nu = float(torch.diagonal(gm).max()) * (1.0 + gamma(d, U64)) ** 2
    bound = (1.0 + gamma(k, U64)) * float(gm.abs().sum(1).max()) + k * gamma(d, U64) * nu * (1.0 + gamma(d, U64))
    return v * (1.0 / (math.sqrt(bound) * (1.0 + PRUNE_MARGIN)))


def project(x: torch.Tensor, mu: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Z (m, k + 1) fp64 = [V^T w, residual norm], W (m,) fp64 >= ||w|| (not squared), n2 (m,) fp64 =
    fl(||w||^2) (squared)), w = fl64(x - mu)."""
    m, d = x.shape
    k = v.shape[1]
    z = torch.empty(m, k + 1, dtype=torch.float64, device=x.device)
    w_norm = torch.empty(m, dtype=torch.float64, device=x.device)
    sq = torch.empty(m, dtype=torch.float64, device=x.device)
    step = max(1, min(CHUNK, (1 << 21) // max(d, 1)))
    for s in range(0, m, step):
        if x.device.type == "cpu":  # one pass, in numpy: fl64(x - mu)
            w = torch.from_numpy(np.subtract(x[s:s + step].numpy(), mu.numpy(), dtype=np.float64))
        else:
            w = x[s:s + step].to(torch.float64) - mu
        p = _mm(w, v)
        if w.device.type == "cpu":  # numpy: torch's CPU kernels are slower here
            wn, pn = w.numpy(), p.numpy()
            n2 = torch.from_numpy(np.einsum("ij,ij->i", wn, wn))
            r2 = (n2 - torch.from_numpy(np.einsum("ij,ij->i", pn, pn))).clamp(min=0.0)
        else:
            n2 = w.square().sum(1)
            r2 = (n2 - p.square().sum(1)).clamp(min=0.0)
        z[s:s + step, :k] = p
        z[s:s + step, k] = r2.sqrt()
        w_norm[s:s + step] = n2.sqrt() * (1.0 + gamma(d + 2, U64))
        sq[s:s + step] = n2
    return z, w_norm, sq


def tree_order(z: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """(perm, offsets): rows in the leaf order of a median-split tree over z (m, k), each split on the
    coordinate of largest variance (estimated on at most VAR_ROWS evenly spaced rows of the node), leaves
    of at most ``tile`` rows; tile t is perm[off[t]:off[t+1]]. Any order is valid: the order only decides
    how tight the tiles' bounds are."""
    def widest(idx: np.ndarray) -> int:
        return int(np.argmax(z[idx[::max(1, len(idx) // VAR_ROWS)]].var(0)))

    leaves, stack = [], [np.arange(len(z))]
    while stack:
        idx = stack.pop()
        if len(idx) <= tile:  # a leaf, its rows sorted along its widest coordinate (row groups, _pair)
            leaves.append(idx[np.argsort(z[idx, widest(idx)], kind="stable")] if len(idx) > 1 else idx)
            continue
        dim = widest(idx)
        half = len(idx) // 2
        part = np.argpartition(z[idx, dim], half, kind="introselect")
        stack.append(idx[part[half:]])
        stack.append(idx[part[:half]])
    sizes = np.array([len(leaf) for leaf in leaves], np.int64)
    return np.concatenate(leaves), np.concatenate([[0], np.cumsum(sizes)])


def near_box(z, other, reach: float):
    """Indices of the rows of z (numpy or torch) within ``reach`` (L2, fp64, moved by PRUNE_MARGIN the safe
    way) of the bounding box of the rows ``other``: the distance to the box is a lower bound of the
    distance to each of its rows, as for a tile pair. None of them when ``other`` is empty."""
    if len(other) == 0:
        return z[:0, 0].astype(np.int64) if isinstance(z, np.ndarray) else torch.zeros(0, dtype=torch.int64)
    if isinstance(z, np.ndarray):
        gap = np.maximum(other.min(0) - z, z - other.max(0))
        np.maximum(gap, 0.0, out=gap)
        return np.flatnonzero(np.sqrt(np.einsum("ij,ij->i", gap, gap)) * (1.0 - PRUNE_MARGIN) <= reach)
    gap = torch.maximum(other.amin(0) - z, z - other.amax(0)).clamp(min=0.0)
    return torch.nonzero(gap.square().sum(1).sqrt() * (1.0 - PRUNE_MARGIN) <= reach)[:, 0]
