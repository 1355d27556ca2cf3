"""The results of a certified search and their one JSON form (``LayerResult.to_dict``).

Needs only numpy at module level (pyarrow where a table is built), so that the report code can
read results without importing torch. Distances are L2 (not squared), fp64, each the correctly
rounded square root of the exact fp64 squared distance (see collide/search/symmetric.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow

NN_PERCENTILES = {"min": 0, "p1": 1, "p5": 5, "p25": 25, "p50": 50, "p75": 75, "p95": 95, "max": 100}


@dataclass(frozen=True, eq=False)
class Pairs:
    """Pairs of rows as three aligned arrays: a layer-0 search can list millions of them."""

    a: np.ndarray  # (k,) int64: the first row of each pair
    b: np.ndarray  # (k,) int64: the second row, a < b
    distance: np.ndarray  # (k,) float64: L2 distance (not squared)

    @classmethod
    def empty(cls) -> "Pairs":
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64))

    def __len__(self) -> int:
        return len(self.a)

    def __eq__(self, other) -> bool:
        """Same pairs in the same order with bitwise-equal distances."""
        return isinstance(other, Pairs) and all(np.array_equal(getattr(self, f), getattr(other, f))
                                                for f in ("a", "b", "distance"))

    def tolist(self, limit: int | None = None) -> list[tuple[int, int, float]]:
        """The first ``limit`` pairs (all if None) as (a, b, distance) Python tuples."""
        return list(zip(self.a[:limit].tolist(), self.b[:limit].tolist(), self.distance[:limit].tolist()))


@dataclass
class PairwiseResult:
    """The certified answer for one (n, d) matrix. Row indices are the matrix's rows."""

    distance: float  # exact min L2 (NOT squared) over pairs of valid rows, fp64; math.inf if < 2 valid rows
    pair: tuple[int, int] | None  # row indices (i, j), i < j, attaining it (smallest (i, j) among ties)
    certified: bool  # True iff no unseen pair can beat `distance`, any row's nn_distance, or the threshold
    collisions: Pairs  # EVERY pair (i, j), i < j, with distance < threshold, sorted by (distance, i, j)
    n_collisions: int  # len(collisions)
    # (n,) float64: each valid row's exact L2 distance to its nearest other valid row (certified, like
    # `distance`); inf if there is no other row; nan for invalid rows and for the rows whose nearest
    # neighbour was not computed (see `nearest`)
    nn_distance: np.ndarray
    n_pairs: int  # C(n_valid, 2): pairs covered
    invalid_rows: list[int]  # rows with NaN/Inf, excluded from the search (never compared as numbers)
    threshold: float  # collision threshold (L2, not squared)
    backend: str  # "torch" or "faiss" (what actually ran)
    precision: str  # screening arithmetic: "fp32" or "tf32x3"
    n_candidates: int  # pairs re-ranked exactly in fp64 because they passed the screening bound
    uncertified_reason: str | None  # why certified is False (e.g. candidate budget exhausted)
    seconds: float  # wall time of the search
    # pruning record (search.prune, collide/search/prune.py): {"method": "pca" | "off", "k", "tile_rows",
    # "pairs_evaluated_fraction", "tile_pairs_evaluated_fraction", "reason"}; None when not asked for
    prune: dict | None = None
    # (n,) int64: the row of each row's nearest neighbour (the smallest row among exact ties) where
    # nn_distance is finite, else -1
    nn_index: np.ndarray | None = None
    # whose nearest neighbours were computed (collide.search.nearest.record): {"rows": "all" | "sample" |
    # "none", "n_rows", "seed" (of the sample), "description"}
    nearest: dict | None = None
    row_norm: np.ndarray | None = None  # (n,) float64: each row's L2 norm (not squared) as given; nan if invalid
    # (n,) float64: each row's L2 norm (not squared) centred on the valid rows' fp64 mean, summed in fp64 from
    # the centred values rounded to fp32 (the screen's operand: blocks.centred_sq_norms); nan if invalid
    centred_norm: np.ndarray | None = None


def nn_percentiles(nn_distance: np.ndarray) -> dict | None:
    """Percentiles (NN_PERCENTILES, linear interpolation) of the finite per-row nearest-neighbour L2
    distances; None if there are none (invalid rows and searches without nearest have nan)."""
    nn = np.asarray(nn_distance, dtype=np.float64)
    nn = nn[np.isfinite(nn)]
    if nn.size == 0:
        return None
    return {name: float(np.percentile(nn, q)) for name, q in NN_PERCENTILES.items()}


def _finite(x: float) -> float | None:
    """x as a JSON number, None for inf/nan (JSON has neither)."""
    return float(x) if math.isfinite(x) else None


def nn_pairs(result: PairwiseResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, their nearest neighbours' rows, L2 distances) of every row whose nearest neighbour the search
    certified (rows ascending)."""
    idx = result.nn_index if result.nn_index is not None else np.full(len(result.nn_distance), -1)
    rows = np.flatnonzero((np.asarray(idx) >= 0) & np.isfinite(result.nn_distance))
    return rows, np.asarray(idx, np.int64)[rows], np.asarray(result.nn_distance, np.float64)[rows]


@dataclass
class LayerResult:
    """The search result of one layer of a store, with the prompt id of each row."""

    layer: int  # HF hidden_states index (0 = embeddings)
    prompt_ids: np.ndarray  # (n,) int64, row -> prompt_id
    result: PairwiseResult  # the search, in row indices

    def closest_pair_ids(self) -> tuple[int, int] | None:
        """Prompt ids of the pair attaining the minimum distance (None with fewer than 2 valid rows)."""
        if self.result.pair is None:
            return None
        i, j = self.result.pair
        return int(self.prompt_ids[i]), int(self.prompt_ids[j])

    def collision_table(self) -> "pyarrow.Table":
        """Every collision as prompt ids: columns a, b (int64, a's row before b's) and distance (float64, L2)."""
        import pyarrow as pa

        c, ids = self.result.collisions, np.asarray(self.prompt_ids, np.int64)
        return pa.table({"a": pa.array(ids[c.a], pa.int64()), "b": pa.array(ids[c.b], pa.int64()),
                         "distance": pa.array(np.asarray(c.distance, np.float64), pa.float64())})

    def write_collisions(self, path: str | Path) -> None:
        """Write ``collision_table()`` (every collision, even none) to the Parquet file ``path``
        atomically (collide.atomic), so that a reader never sees half a file."""
        import pyarrow.parquet as pq

        from collide.atomic import atomic_write

        table = self.collision_table()
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))

    def listed_collisions(self, max_listed: int) -> list[dict]:
        """The ``max_listed`` closest collisions as {"a", "b", "distance"}, a < b prompt ids, sorted by
        (distance, a, b)."""
        c, ids = self.result.collisions, np.asarray(self.prompt_ids, np.int64)
        if max_listed <= 0 or not len(c):
            return []
        cut = c.distance[min(max_listed, len(c)) - 1]  # collisions are sorted by distance
        k = int(np.searchsorted(c.distance, cut, side="right"))  # every tie of the last one listed
        pa, pb = ids[c.a[:k]], ids[c.b[:k]]
        a, b = np.minimum(pa, pb), np.maximum(pa, pb)
        order = np.lexsort((b, a, c.distance[:k]))[:max_listed]
        return [{"a": int(a[o]), "b": int(b[o]), "distance": float(c.distance[o])} for o in order]

    def to_dict(self, max_listed: int) -> dict:
        """The JSON form of this result (the ``layers[]`` entry of report.json, docs/report-schema.md,
        and of ``collide search``): pairs, collisions and invalid rows as prompt ids, L2 distances (None
        for inf), nn_distance as percentiles over the rows ``nearest`` names (None without any)."""
        r, ids = self.result, np.asarray(self.prompt_ids, np.int64)
        closest = self.closest_pair_ids()
        return {
            "layer": int(self.layer),
            "n_vectors": int(len(ids)),
            "n_pairs": int(r.n_pairs),
            "min_distance": _finite(r.distance),
            "certified": bool(r.certified),
            "uncertified_reason": r.uncertified_reason,
            "closest_pair": [int(p) for p in closest] if closest is not None else None,
            "n_collisions": int(r.n_collisions),
            "collisions": self.listed_collisions(max_listed),
            "nn_distance": nn_percentiles(r.nn_distance),
            "nearest": getattr(r, "nearest", None),
            "invalid_rows": [int(ids[i]) for i in r.invalid_rows],
            "n_candidates": int(r.n_candidates),
            "backend": str(r.backend),
            "precision": str(r.precision),
            "seconds": float(r.seconds),
            "prune": getattr(r, "prune", None),
        }
