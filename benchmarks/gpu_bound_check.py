"""How close the screening GEMM's observed error comes to its rigorous bound (bounds.py), on inputs
built to make it large. Needs only numpy and torch.

``worst_error_ratio(device, precision)`` screens every pair of n rows exactly as the engine does
(``PairSearch._gemm`` on ``blocks.augment`` operands, under ``api.numerics``) and returns the
worst observed |s^ - D| / E(a, b) over all pairs i != j, per input family and width d, where D is
the squared distance of the rows (fp64, relative error ~d 2^-53, negligible here) and E the bound
at the pair's own centered norms (not squared). The bound is proven for fp32 (IEEE, TF32 off); for
tf32x3 it rests on an assumption about tensor-core accumulation (at least 24 bits kept when the
products are aligned and summed; NVIDIA does not document it), which this measurement tests: the
GPU check fails when a ratio exceeds ``LIMIT``.

Input families (fp32 rows, seeded):
- ``massive``: N(0, 1) plus 4 massive dimensions ~1e4 (LLM-like), norms ~2e4;
- ``cancel``: two clusters at +-B, B a vector of entries ~1e3 of one sign, each row B's sign times
  B plus 1e-3 N(0, 1): centering cannot shrink the norms (~1e3 sqrt(d)), pairs within a cluster
  cancel almost completely in ||a||^2 + ||b||^2 - 2 <a, b>, and every product a_k b_k of such a pair
  has the same sign, so accumulation errors add up instead of cancelling;
- ``mixed``: entries spread over 2^-20..2^20 in magnitude (log-uniform, random signs), so that the
  products' exponents differ widely (alignment losses in a fused multi-term accumulation).
"""

from __future__ import annotations

import numpy as np
import torch

from collide.search.api import numerics, resolve_device
from collide.search.blocks import augment, right_operand
from collide.search.bounds import pair_bound, screening_constant, underflow_term
from collide.search.symmetric import PairSearch

LIMIT = 0.5  # a measured ratio above this fails the check: the bound would have less than 2x margin
FAMILIES = ("massive", "cancel", "mixed")
DIMS = (64, 576, 2048, 4096, 8192)  # widths checked by default (d up to 8192)


def adversarial_rows(family: str, n: int, d: int, seed: int = 0) -> np.ndarray:
    """(n, d) fp32 rows of one input family (see the module docstring)."""
    rng = np.random.default_rng(seed)
    if family == "massive":
        x = rng.standard_normal((n, d))
        x[:, :4] += 1e4 * rng.uniform(0.9, 1.1, size=4)
    elif family == "cancel":
        base = 1e3 * rng.uniform(0.5, 1.5, size=d)
        x = np.where(np.arange(n)[:, None] % 2 == 0, base, -base) + 1e-3 * rng.standard_normal((n, d))
    elif family == "mixed":
        x = 2.0 ** rng.uniform(-20, 20, size=(n, d)) * rng.choice([-1.0, 1.0], size=(n, d))
    else:
        raise ValueError(f"family={family!r}: use one of {FAMILIES}")
    return x.astype(np.float32)


def error_ratio(x: torch.Tensor, precision: str) -> float:
    """max over pairs i != j of |s^ - D| / E(a_i, a_j) for the rows x (n, d) fp32, on x's device."""
    n, d = x.shape
    dev = x.device
    left, norm2 = augment(x, x.double().mean(0))
    state = PairSearch(n, d, dev, 0.0, precision, block_rows=n)
    with numerics(dev, precision, 0):
        s = state._gemm(left, right_operand(left, d)).double()
    xd = x.double()
    exact = torch.cdist(xd, xd, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    norms = norm2.sqrt()
    bound = pair_bound(screening_constant(d, precision), underflow_term(d), norms[:, None], norms[None, :])
    ratio = (s - exact).abs() / bound
    ratio.fill_diagonal_(0.0)
    return float(ratio.max())


def worst_error_ratio(device="cuda", precision: str = "fp32", dims=DIMS, n: int = 2048, seed: int = 0) -> dict:
    """The screening GEMM's worst observed |error| / bound on ``device`` ("cuda", "cuda:N", "cpu")
    in ``precision`` ("fp32", or "tf32x3" on CUDA) over FAMILIES x ``dims``, n rows each.

    Returns {"device", "precision", "n", "limit": LIMIT, "worst_ratio", "worst_case", "passed",
    "ratios": {"<family>_d<d>": ratio}} (plain floats, str and bool: JSON-able). ``passed`` is
    worst_ratio <= LIMIT.
    """
    dev = resolve_device(device)
    ratios = {}
    for family in FAMILIES:
        for d in dims:
            x = torch.from_numpy(adversarial_rows(family, n, d, seed)).to(dev)
            ratios[f"{family}_d{d}"] = error_ratio(x, precision)
            del x
    worst = max(ratios, key=ratios.get)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"device": name, "precision": str(precision), "n": n, "limit": LIMIT, "worst_ratio": ratios[worst],
            "worst_case": worst, "passed": ratios[worst] <= LIMIT, "ratios": ratios}
