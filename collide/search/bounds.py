"""Rigorous error bounds of the fp32 screening arithmetic (needs only the standard library).

Notation: x, y are two rows as given (fp32 or fp64 values), mu is the centering vector (any
vector: distances do not depend on it, so its own rounding is irrelevant), a = fl32(x - mu) and
b = fl32(y - mu) are the screened rows. The exact squared distance is D = ||x - y||^2. Screening
computes, in one fp32 GEMM over the augmented rows

    A_aug = [a, na, 1]   B_aug = [-2b, 1, nb]     na = fl32(||a||^2), nb = fl32(||b||^2)

(norms summed in fp64 then rounded), the value s^ = fl(A_aug . B_aug) ~ ||a||^2 + ||b||^2 - 2<a, b>.
u = 2^-24 is the fp32 unit roundoff and gamma_m = m u / (1 - m u) (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., section 3.1).

**Theorem (fp32, IEEE arithmetic, TF32 off).** |s^ - D| <= E(a, b) with

    E(a, b) = c (||a|| + ||b||)^2 + eta (1 + ||a|| + ||b||)^2
    c   = SAFETY * (gamma_{d+3} + 2 u_c),   u_c = u + 2^-52
    eta = 8 (d + 3) 2^-126

whatever the summation order of the GEMM (blocked, split-K, tree, with or without FMA).

Proof.
1. Centering: a = fl32(fl64(x - mu)), so a = (x - mu) + e_a with ||e_a|| <= u_c ||x - mu||
   (one fp64 and one fp32 rounding; u_c covers both). With p = ||a - b||, q = ||x - y||:
   |p - q| <= ||e_a|| + ||e_b|| <= u_c (||a|| + ||b||) (1 + O(u)), and p + q <= 2 (||a|| + ||b||)
   (1 + O(u)), hence |p^2 - q^2| <= 2 u_c (||a|| + ||b||)^2 (1 + O(u)).
2. Norms: the fp64 sum of the d exact products a_k^2 is within d 2^-53 of ||a||^2 and the
   rounding to fp32 adds u: na = ||a||^2 (1 + theta), |theta| <= u + d 2^-53.
3. Dot product of the d + 2 terms t_k = A_aug_k B_aug_k (-2 b_k is exact): for any order of
   summation, |fl(sum t_k) - sum t_k| <= gamma_{d+2} sum |t_k| (Higham, eq. 3.5, FMA included),
   and sum |t_k| = 2 sum |a_k b_k| + na + nb <= (||a|| + ||b||)^2 (1 + theta). Together with the
   norm roundings (theta (na + nb) <= theta (||a|| + ||b||)^2) and Higham's lemma 3.3
   (gamma_{d+2} + u + u gamma_{d+2} <= gamma_{d+3}): |s^ - p^2| <= gamma_{d+3} (||a|| + ||b||)^2
   (1 + O(u)).
4. Steps 1 + 3 give c; SAFETY = 1 + 2^-10 absorbs every O(u) relative factor (they are below
   2^-20 for d < 2^20).
5. Underflow (gradual or flushed to zero, as GPUs may do) adds at most 2^-126 in absolute value
   per operation: 2 (d + 2) operations in the dot product, and sqrt(d) 2^-126 per centered row,
   which moves p by 2 sqrt(d) 2^-126 and p^2 by at most 4 sqrt(d) 2^-126 (||a|| + ||b||) + ...;
   eta (1 + ||a|| + ||b||)^2 covers all of it.

Screening compares s^ against ``tau + E``: a pair whose s^ exceeds it has D > tau, so it can
neither beat the best exact distance tau nor be a collision when tau >= threshold^2.
The engines use a per-block scalar E_blk = E evaluated at the largest ||a|| of each of the two
blocks, which is an upper bound of E(a, b) for every pair of the block (E grows with the norms).

**tf32x3 (GPU tensor cores, 3 passes).** Each operand A is split as A = A_hi + A_lo, A_hi = A
with its 13 low mantissa bits cleared (exactly representable in TF32, |A_lo| <= 2^-10 |A|, and
A_lo is exact in fp32); the tensor cores see A_lo' = tf32(A_lo) with |A_lo - A_lo'| <= 2^-10
|A_lo| whether they round or truncate. s^ = A_hi B_hi + A_hi B_lo' + A_lo' B_hi drops A_lo B_lo
and the two rounding residues: per term at most 3 2^-20 |A_k B_k|. Products of TF32 values are
exact in fp32; tensor cores may truncate when they accumulate and align the addends of a fused
multi-term addition to the largest exponent, so each of the (at most 2 (d + 5)) steps of the
accumulation of the three GEMMs is charged 2u relative to the running sum of |terms|:

    c_tf32x3 = SAFETY * (gamma'_{2(d+5)} (1 + 2^-8) + 3 2^-20 + 2 u_c),  gamma' = gamma with 2u

and the same eta term. It is about 4x the fp32 constant: more candidates, still certified.

**Assumption (tf32x3 only, not proven).** The charge of 2u per accumulation step assumes that the
tensor cores keep at least 24 significant bits (fp32's) of the running sum when they align the
products to the largest exponent and add them. NVIDIA does not document the width of that
internal accumulation, so the tf32x3 bound rests on this assumption, not on a theorem; fp32
(TF32 off) has no such assumption and stays the default. ``collide.search.gpu_bound_check``
measures the worst |s^ - D| / E on adversarial inputs (massive dimensions, near-cancelling sums,
mixed exponents, d up to 8192) on the GPU at hand, and the GPU check fails above 0.5.

**What "exact" means.** The exact squared distance the engines report is the fp64 value of
sum_k (x_k - y_k)^2 over the values as given (differences are exact in fp64 for fp32 or narrower
inputs and rounded for fp64 ones; squares and sums are rounded to fp64 in a fixed order: numpy's
pairwise sum on CPU, one fixed kernel configuration on CUDA), and every reported L2 distance is its correctly
rounded square root. It is within rerank_rel(d) (below) of the real squared distance: exactness
of the value the code defines, not of real arithmetic.

**Exact re-ranking** sums (x_k - y_k)^2 in fp64; its relative error is below
``rerank_rel(d) = 2 (d + 3) 2^-53``. Thresholds are inflated by (1 + 2 rerank_rel) so that a pair
that screening leaves out cannot tie or beat the fp64 value of the reported minimum.
"""

from __future__ import annotations

U32 = 2.0 ** -24  # fp32 unit roundoff
U_CENTER = U32 + 2.0 ** -52  # one fp64 rounding of x - mu followed by one fp32 rounding
SAFETY = 1.0 + 2.0 ** -10  # absorbs the O(u) relative factors of the proof above
TINY = 2.0 ** -126  # smallest normal fp32: the absolute error of an underflow
PRECISIONS = ("fp32", "tf32x3")  # screening arithmetics with a bound here


def gamma(m: int, u: float) -> float:
    """Higham's gamma_m = m u / (1 - m u), the relative error bound of an m-term sum or dot product."""
    if m * u >= 1.0:
        raise ValueError(f"gamma_{m} is unbounded for u={u}: the dimension is too large for this precision")
    return m * u / (1.0 - m * u)


def screening_constant(d: int, precision: str = "fp32") -> float:
    """The constant c of E(a, b) = c (||a|| + ||b||)^2 + eta (1 + ||a|| + ||b||)^2, for d columns."""
    if precision == "fp32":
        return SAFETY * (gamma(d + 3, U32) + 2.0 * U_CENTER)
    if precision == "tf32x3":
        return SAFETY * (gamma(2 * (d + 5), 2.0 * U32) * (1.0 + 2.0 ** -8) + 3.0 * 2.0 ** -20 + 2.0 * U_CENTER)
    raise ValueError(f"precision={precision!r}: use one of {PRECISIONS}")


def underflow_term(d: int) -> float:
    """eta of the bound: the absolute error that underflow (gradual or flushed) can add."""
    return 8.0 * (d + 3) * TINY


def pair_bound(c: float, eta: float, norm_a: float, norm_b: float) -> float:
    """E: a bound on |s^ - ||x - y||^2| for rows whose centered norms are at most norm_a, norm_b (not squared)."""
    s = norm_a + norm_b
    return c * s * s + eta * (1.0 + s) * (1.0 + s)


def rerank_rel(d: int) -> float:
    """Relative error bound of the fp64 re-rank sum((x_k - y_k)^2) over d columns."""
    return 2.0 * (d + 3) * 2.0 ** -53
