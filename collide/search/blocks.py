"""The rows of a search as blocks: validity, fp64 mean, the augmented GEMM operands, exact fp64 re-ranks.

Needs only numpy and torch. Conventions: rows are given as fp32 or fp64 (narrower floats are
widened exactly by the caller); a = fl32(fl64(x) - mu) are the centered rows the screening GEMM
sees; squared norms and exact distances are fp64 and squared (see bounds.py for the error bound).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from collide.errors import CollideError

PAD = 8  # the augmented width d + 2 is padded with zero columns to a multiple of this (GEMM speed)
RERANK_ELEMENTS = 1 << 22  # fp64 elements per chunk of exact re-ranks (bounds their memory)
CPU_RERANK_ELEMENTS = 1 << 16  # the same on CPU, where a chunk that stays in cache is ~2x faster


@dataclass
class Block:
    """A block of rows to search, resident on the engine device."""

    index: torch.Tensor  # (b,) int64: engine index of each row (0..m-1 over all searched rows)
    rows: torch.Tensor  # (b,) int64: each row's index in the caller's numbering (input row, store row)
    x: torch.Tensor  # (b, d) the rows as given (fp32 or fp64): exact fp64 re-ranks read these
    left: torch.Tensor  # (b, K) fp32 left GEMM operand [a, fl32(||a||^2), 1, 0 pad], a = fl32(x - mu)
    norm_max: float  # largest ||a|| in the block (fp64, not squared): the block's error bound uses it
    norm2: torch.Tensor | None = None  # (b,) fp64 ||a||^2, the centred rows' squared norms (centred_sq_norms)


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


def row_norms(x: torch.Tensor, block_rows: int) -> torch.Tensor:
    """(m,) fp64 L2 norm (not squared) of each row of x (m, d), block by block (no fp64 copy of x)."""
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], block_rows):
        if x.device.type == "cpu":
            xb = x[s:s + block_rows].numpy()
            out.numpy()[s:s + block_rows] = np.sqrt(np.einsum("ij,ij->i", xb, xb, dtype=np.float64))
        else:
            out[s:s + block_rows] = x[s:s + block_rows].to(torch.float64).square().sum(1).sqrt()
    return out


def augmented_width(d: int) -> int:
    """K: columns of the augmented operands (d + 2, padded with zeros to a multiple of PAD)."""
    return -(-(d + 2) // PAD) * PAD


def _centred(x: torch.Tensor, mu: torch.Tensor, left: torch.Tensor | None) -> torch.Tensor:
    """||a||^2 (fp64) of the rows x (b, d), a = fl32(fl64(x) - mu); a goes into left[:, :d] when given."""
    b, d = x.shape
    norm2 = torch.empty(b, dtype=torch.float64, device=x.device)
    step = max(1, RERANK_ELEMENTS // max(d, 1))
    for s in range(0, b, step):
        if x.device.type == "cpu":  # numpy: several times faster than torch's CPU kernels here
            a = np.subtract(x[s:s + step].numpy(), mu.numpy(), dtype=np.float64).astype(np.float32)
            if left is not None:
                left.numpy()[s:s + step, :d] = a
            norm2.numpy()[s:s + step] = np.einsum("ij,ij->i", a, a, dtype=np.float64)
        else:
            a = (x[s:s + step].to(torch.float64) - mu).to(torch.float32)
            if left is not None:
                left[s:s + step, :d] = a
            norm2[s:s + step] = a.to(torch.float64).square().sum(1)
    return norm2


def centred_sq_norms(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """(b,) fp64 squared norms of the rows x centred on mu as the screen sees them: sum of a^2 in fp64,
    a = fl32(fl64(x) - mu) (what augment computes, without the operand)."""
    return _centred(x, mu, None)


def augment(x: torch.Tensor, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left operand [a, fl32(||a||^2), 1, 0...] of rows x (b, d) centered on mu (fp64), and ||a||^2 (fp64).

    a = fl32(fl64(x) - mu); its squared norms are summed in fp64 from the fp32 values, then rounded
    for the operand. Raises OverflowError if squared distances could overflow fp32.
    """
    b, d = x.shape
    left = torch.zeros(b, augmented_width(d), dtype=torch.float32, device=x.device)
    norm2 = _centred(x, mu, left)
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
    return Block(index=index, rows=rows, x=x, left=left, norm_max=math.sqrt(float(norm2.max())), norm2=norm2)


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
    if xa.device.type == "cpu":
        step = max(1, CPU_RERANK_ELEMENTS // max(xa.shape[1], 1))
        an, bn, ia_n, ib_n = xa.numpy(), xb.numpy(), ia.numpy(), ib.numpy()
        out = np.empty(len(ia_n))
        for s in range(0, len(ia_n), step):
            diff = np.subtract(an[ia_n[s:s + step]], bn[ib_n[s:s + step]], dtype=np.float64)
            diff *= diff
            out[s:s + step] = diff.sum(1)
        return torch.from_numpy(out)
    step = max(1, RERANK_ELEMENTS // max(xa.shape[1], 1))
    out = torch.empty(len(ia), dtype=torch.float64, device=xa.device)
    for s in range(0, len(ia), step):
        pa, pb = ia[s:s + step], ib[s:s + step]
        k = len(pa)
        if k < step:  # pad with row 0: same kernel configuration for every chunk
            pa = torch.cat([pa, pa.new_zeros(step - k)])
            pb = torch.cat([pb, pb.new_zeros(step - k)])
        out[s:s + k] = (xa[pa].to(torch.float64) - xb[pb].to(torch.float64)).square().sum(1)[:k]
    return out


def _numpy_rows(x: np.ndarray) -> np.ndarray:
    """x as a native-byte-order fp32 or fp64 array, exactly; any other dtype is refused."""
    dt = x.dtype
    if dt.kind == "f" and dt.itemsize in (2, 4, 8):  # fp16/fp32/fp64 in either byte order: all exact in fp64
        native = dt.newbyteorder("=")
        return np.ascontiguousarray(x, dtype=np.float32 if native.itemsize == 2 else native)
    if dt.name == "bfloat16":  # ml_dtypes' bf16: exact in fp32
        return np.ascontiguousarray(x.astype(np.float32))
    raise CollideError(f"min_pairwise takes fp16, bf16, fp32 or fp64 rows, got dtype {dt}; cast them to float64 "
                       "yourself (long double and complex values would be rounded or dropped, not searched exactly)"
                       + ("; bf16 bit patterns held as uint16 go in as torch.from_numpy(x).view(torch.bfloat16)"
                          if dt == np.uint16 else ""))


def as_tensor(x) -> torch.Tensor:
    """x as a 2-D float32/float64 torch tensor holding exactly the values given.

    Takes fp16, bf16, fp32 and fp64 (numpy arrays in either byte order, or torch tensors; bf16 as a
    torch.bfloat16 tensor, numpy having no bf16); fp16/bf16 are widened to fp32, exactly. Refuses
    every other dtype (long double, complex, object, integers) with a CollideError. Zero-copy
    where possible (native fp32/fp64 numpy arrays stay shared).
    """
    if isinstance(x, np.ndarray):
        x = _numpy_rows(x)
        with warnings.catch_warnings():  # read-only arrays (e.g. Arrow buffers) are never written to
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(x)
    elif isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise CollideError(f"min_pairwise takes fp16, bf16, fp32 or fp64 rows, got {x.dtype}; cast them to "
                               "torch.float64 yourself (complex values would be dropped)")
        t = x.detach()
        if t.dtype not in (torch.float32, torch.float64):
            t = t.to(torch.float32)  # fp16/bf16 (and fp8) values are exact in fp32
    else:
        raise CollideError(f"min_pairwise needs an (n, d) numpy array or torch tensor, got {type(x).__name__}")
    if t.ndim != 2:
        raise CollideError(f"min_pairwise needs a 2-D (n, d) matrix, got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise CollideError(f"min_pairwise got zero-width rows, shape {tuple(t.shape)}: every row needs at least "
                           "one column")
    return t.contiguous()
