"""Quantized storage (``store.dtype=int8|int4``): states kept as integer codes with a power-of-two scale.

The definition (docs/store-format.md is the contract in words):

* **Codes.** A stored row of d values x is kept as codes c_i in [-Q, Q], Q = 127 (int8) or 7 (int4),
  and one scale 2^e: the row stands for the values ``c_i * 2^e``. The codes are
  ``c_i = round_half_even(x_i * 2^-e)`` with ``e`` the smallest integer >= -127 such that
  ``max|x| * 2^-e <= Q`` (so no code is clipped); -Q..Q is symmetric, the code -Q-1 is never used.
  ``max|x|`` is taken over the row (``granularity=row``) or over every finite row of the stored
  tensor: one layer's states of one shard file (``granularity=tensor``).
* **The scale is a power of two,** as the shared exponent of an OCP microscaling (MX) block, and it
  is stored the same way: one E8M0 byte, ``e + 127`` (0..254); 255 is NaN. So every step is exact:
  ``x * 2^-e`` is exact in float64, the rounding is the only approximation, and the dequantized value
  ``c * 2^e`` (at most 7 significant bits times a power of two >= 2^-127) is a float32 exactly.
  ``dequantize`` returns those float32 values, and the search, which takes float32 rows exactly,
  compares exactly the values the codes define, whatever arithmetic a reader uses to form them.
* **Rows with NaN or Inf** keep codes 0 and the scale byte 255: they read back as rows of NaN, and
  are counted and excluded as every non-finite row is. So is a row whose rounded value overflows
  float32 (``|c| * 2^e >= 2^128``, only for values within a step of float32's largest), as an fp16
  store's overflow is.
* **Layout.** One ``uint8`` vector per row: the scale byte, then the codes: int8 codes one byte each
  (two's complement), int4 codes two per byte, code 2j in the low nibble of byte j and code 2j+1 in
  its high nibble (two's complement nibbles; an odd d leaves the last high nibble 0). A row is
  self-contained: ``1 + d`` bytes (int8) or ``1 + ceil(d / 2)`` bytes (int4).

Needs only numpy.
"""

from __future__ import annotations

import numpy as np

BITS = {"int8": 8, "int4": 4}
GRANULARITIES = ("row", "tensor")
NAN_SCALE = 255  # the E8M0 NaN byte: a row that held NaN or Inf
MIN_EXPONENT = -127  # the smallest scale 2^-127 (E8M0 byte 0)


def qmax(dtype: str) -> int:
    """Q = 2^(bits-1) - 1: the largest code magnitude (127, 7)."""
    return 2 ** (BITS[dtype] - 1) - 1


def width(dtype: str, d: int) -> int:
    """Bytes per stored row of d values: the scale byte, then the codes."""
    return 1 + (d if dtype == "int8" else (d + 1) // 2)


def exponents(peak: np.ndarray, Q: int) -> np.ndarray:
    """int64 e per entry of ``peak`` (max|x| >= 0, float64): the smallest e >= -127 with peak * 2^-e <= Q."""
    with np.errstate(divide="ignore"):
        e = np.ceil(np.log2(peak / Q))
    e = np.where(np.isfinite(e), e, MIN_EXPONENT).astype(np.int64)  # peak 0: the smallest scale
    e += np.ldexp(peak, -e) > Q  # log2 may miss by one near a power of two: both directions checked exactly
    e -= np.ldexp(peak, -(e - 1)) <= Q
    return np.maximum(e, MIN_EXPONENT)


def quantize(states: np.ndarray, dtype: str, granularity: str) -> np.ndarray:
    """(n, d) float states -> (n, width) uint8 rows (module docstring); exact but for the one rounding."""
    Q = qmax(dtype)
    x = np.asarray(states, np.float64)
    n, d = x.shape
    finite = np.isfinite(x).all(axis=1)
    x = np.where(finite[:, None], x, 0.0)
    peak = np.abs(x).max(axis=1) if d else np.zeros(n)
    if granularity == "tensor":
        peak = np.full(n, peak.max() if n else 0.0)
    e = exponents(peak, Q)
    codes = np.rint(np.ldexp(x, -e[:, None]))  # |x| * 2^-e <= Q: never clipped
    finite &= np.ldexp(np.abs(codes).max(axis=1, initial=0.0), e) < 2.0 ** 128  # the value is a float32
    codes = np.where(finite[:, None], codes, 0).astype(np.int8)
    out = np.empty((n, width(dtype, d)), np.uint8)
    out[:, 0] = np.where(finite, e - MIN_EXPONENT, NAN_SCALE)
    if dtype == "int8":
        out[:, 1:] = codes.view(np.uint8)
    else:
        nibbles = np.zeros((n, 2 * (width(dtype, d) - 1)), np.uint8)
        nibbles[:, :d] = codes.view(np.uint8) & 0x0F
        out[:, 1:] = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return out


def dequantize(rows: np.ndarray, dtype: str, d: int, out: np.ndarray | None = None) -> np.ndarray:
    """(n, width) uint8 rows -> (n, d) float32 ``code * 2^e`` (exact), into ``out`` when given."""
    rows = np.asarray(rows, np.uint8)
    out = np.empty((len(rows), d), np.float32) if out is None else out
    if dtype == "int8":
        out[...] = rows[:, 1:].view(np.int8)
    else:
        packed = rows[:, 1:]
        nibbles = np.empty((len(rows), 2 * packed.shape[1]), np.int8)
        nibbles[:, 0::2] = packed & 0x0F
        nibbles[:, 1::2] = packed >> 4
        nibbles[nibbles > 7] -= 16  # two's complement nibbles
        out[...] = nibbles[:, :d]
    nan = rows[:, 0] == NAN_SCALE
    scale = np.ldexp(np.float32(1), np.where(nan, 0, rows[:, 0].astype(np.int32) + MIN_EXPONENT)).astype(np.float32)
    scale[nan] = np.nan
    out *= scale[:, None]
    return out


def problem(rows: np.ndarray, dtype: str, d: int, granularity: str) -> str | None:
    """What makes (n, width) uint8 rows not a valid encoding (``collide verify``), or None: a code outside
    -Q..Q, a NaN row (scale byte 255) with codes, int4 padding that is not 0, rows of one tensor with two scales."""
    rows = np.asarray(rows, np.uint8)
    Q = qmax(dtype)
    if dtype == "int8":
        codes = rows[:, 1:].view(np.int8).astype(np.int16)
    else:
        packed = rows[:, 1:]
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(len(rows), -1).astype(np.int16)
        codes[codes > 7] -= 16
        if d % 2 and np.any(codes[:, d:]):
            return "an int4 row's padding nibble is not 0"
        codes = codes[:, :d]
    if np.any(np.abs(codes) > Q):
        return f"a code outside -{Q}..{Q}"
    nan = rows[:, 0] == NAN_SCALE
    if np.any(codes[nan]):
        return "a NaN row (scale byte 255) holds codes"
    if granularity == "tensor" and len(np.unique(rows[~nan, 0])) > 1:
        return "rows of one tensor (quant_granularity=tensor) with different scales"
    return None

