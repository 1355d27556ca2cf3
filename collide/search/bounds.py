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
(TF32 off) has no such assumption and stays the default. ``benchmarks.gpu_bound_check``
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

import math

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


# ---------------------------------------------------------------------------------------------
# The projection lower bound of the pruned search (collide/search/prune.py)
# ---------------------------------------------------------------------------------------------
PRUNE_PROOF = r"""
**Lemma (real arithmetic).** Let V be any d x k matrix with ||V||_2 <= 1 (orthonormal columns are
not needed). For a vector w let p(w) = V^T w and r(w) = sqrt(||w||^2 - ||p(w)||^2) (>= 0 since
||V||_2 <= 1), and z(w) = [p(w), r(w)] in R^(k+1). Then for all w, v:

    ||z(w) - z(v)||^2 = ||V^T (w - v)||^2 + (r(w) - r(v))^2 <= ||w - v||^2.

Proof. ||z(w)|| = ||w||, so it is enough that <z(w), z(v)> >= <w, v>, i.e. r(w) r(v) >=
w^T M v with M = I - V V^T. M is positive semi-definite (||V||_2 <= 1), so by the Cauchy-Schwarz
inequality of the form M, w^T M v <= sqrt(w^T M w) sqrt(v^T M v) = r(w) r(v). For orthonormal V
this is ||x - y||^2 = ||V^T(x - y)||^2 + ||(I - V V^T)(x - y)||^2 >= ||V^T x - V^T y||^2 +
(r_x - r_y)^2 (reverse triangle inequality on the residuals).

**Floating point.** u = 2^-53 (fp64), g = gamma_d(u). The engine computes, in fp64:
w = fl(x - mu) (rows as given, mu the fp64 mean), V' = fl(f V) with f chosen so that
||V'||_2 <= 1 is proven (basis_scale below), p~ = fl(w V'), n2 = fl(sum w_i^2),
pn = fl(sum p~_i^2), r~ = fl(sqrt(max(fl(n2 - pn), 0))), Z~ = [p~, r~], and W = sqrt(n2) (1 +
gamma_{d+2}) >= ||w||. Whatever the summation order:
1. ||p~ - p(w)|| <= g || |w| |V'| || <= g ||V'||_F ||w|| <= g sqrt(k) ||w||.
2. |n2 - ||w||^2| <= g ||w||^2; |pn - ||p~||^2| <= gamma_k ||p~||^2 <= gamma_k (1 + g sqrt(k))^2
   ||w||^2; | ||p~||^2 - ||p||^2 | <= (2 + g sqrt(k)) g sqrt(k) ||w||^2; the subtraction adds
   u (n2 + pn) <= 3 u ||w||^2. So |fl(n2 - pn)^+ - r(w)^2| <= beta ||w||^2 with
   beta = SAFETY (g + gamma_k + 3 g sqrt(k) + 3 u) (the clamp at 0 only moves it towards r^2 >= 0).
3. For a, b >= 0, |a - b| <= sqrt(|a^2 - b^2|), and the square root adds u r~ <= 2 u ||w||: so
   |r~ - r(w)| <= (sqrt(beta) + 2 u) ||w||, and ||Z~ - z(w)|| <= eps ||w||,
   eps = g sqrt(k) + sqrt(beta) + 2 u.
4. w is x - mu rounded once per entry: ||(w_x - w_y) - (x - y)|| <= 2 u (||w_x|| + ||w_y||).
5. Underflow in fp64 adds at most 2^-1022 per operation; ETA64 = 2^-480 per row covers it in
   every norm above (d, k < 2^20).
With the lemma: ||Z~_x - Z~_y|| <= ||w_x - w_y|| + eps (W_x + W_y) + 2 ETA64
<= ||x - y|| + delta_xy, delta_xy = (eps + 2 u) SAFETY (W_x + W_y) + 2 ETA64 (prune_coefficient).

**Screening the bound in fp32.** Z~ are fp64 rows of width k + 1; the fp32 screen of this module's
theorem, applied to them (centered on any vector), gives s^ with |s^ - ||Z~_x - Z~_y||^2| <= E_z
(screening_constant(k + 1), norms of the centered Z~ rows). Hence
sqrt(D) >= sqrt(max(s^ - E_z, 0)) - delta_xy, and a pair whose s^ exceeds

    prune_threshold(B, delta, E_z) = ((sqrt(B) + delta)^2 + E_z) (1 + PRUNE_MARGIN)

has D > B (PRUNE_MARGIN = 2^-40 covers the fp64 rounding of the threshold itself; the
conversion to fp32 cannot lose a candidate, tiles.as_threshold). B is the largest squared
distance the pair could still matter at: the best exact distance (times the re-rank slack), the
threshold gate, and with nearest either row's nearest-neighbour bound.

**Tiles.** For a tile T of rows with any fp64 centre c_T and R_T >= max_{x in T} ||Z~_x - c_T||,
the triangle inequality gives, for x in S and y in T, ||Z~_x - Z~_y|| >= ||c_S - c_T|| - R_S - R_T,
so sqrt(D) >= ||c_S - c_T|| - R_S - R_T - delta_ST with delta_ST from the tiles' largest W. The
norms are fp64 sums of at most k + 4 < 2^12 terms, relative error below 2^-41; the engine moves
every computed norm by PRUNE_MARGIN in the safe direction (distances between centres down, radii
and deltas up) and compares against sqrt(B) (1 + PRUNE_MARGIN), so a tile pair is skipped only
when every pair in it has D > B.

**The basis scale.** G = fl(V^T V) in fp64; |G - V^T V| <= gamma_d |V|^T |V| entrywise, and each
entry of |V|^T |V| is at most nu = max_j ||v_j||^2. ||V||_2^2 = ||V^T V||_2 <= ||V^T V||_inf (it is
symmetric) <= (1 + gamma_k) max_i sum_j |G_ij| + k gamma_d nu (1 + gamma_d) =: s. f =
1 / (sqrt(s) (1 + PRUNE_MARGIN)), and fl(f V) = f V + Delta with ||Delta||_2 <= ||Delta||_F
<= u sqrt(k) ||f V||_2, so ||V'||_2 <= (1 + u sqrt(k)) (1 + 2u) / (1 + PRUNE_MARGIN) <= 1 (k < 2^20).
"""

__doc__ += PRUNE_PROOF

U64 = 2.0 ** -53  # fp64 unit roundoff
ETA64 = 2.0 ** -480  # per-row absolute term covering fp64 underflow in the projection (see PRUNE_PROOF)
PRUNE_MARGIN = 2.0 ** -40  # relative margin on fp64-computed norms and thresholds of the pruned search


def prune_coefficient(d: int, k: int) -> float:
    """The coefficient of delta_xy = coef (W_x + W_y) + 2 ETA64: a bound on how much the fp64
    projection to k + 1 dims can overstate a distance, per unit of row norm (L2, not squared)."""
    if d >= 2 ** 20 or k >= 2 ** 20:
        raise ValueError(f"d={d}, k={k}: the projection bound is stated for d, k < 2^20")
    g = gamma(d, U64)
    gk = g * math.sqrt(k)
    beta = SAFETY * (g + gamma(max(k, 1), U64) + 3.0 * gk + 3.0 * U64)
    eps = gk + math.sqrt(beta) + 2.0 * U64
    return SAFETY * (eps + 2.0 * U64)


def prune_threshold(b, delta, e_z):
    """fp32 screening threshold of the projected squared distance s^ (works on floats and tensors):
    a pair with s^ above it has exact squared distance D > b. b: squared distance (fp64);
    delta: L2 (not squared) overstatement of the projection (prune_coefficient); e_z: screening
    bound of the projected rows (squared)."""
    return ((b ** 0.5 + delta) ** 2 + e_z) * (1.0 + PRUNE_MARGIN)
