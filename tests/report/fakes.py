"""Small stand-ins for the search results and the store that collide.report consumes.

The per-layer results are computed by an fp64 brute force (exact for these sizes), with the
fields of collide.search.PairwiseResult, wrapped in the real LayerResult, so that report tests do
not depend on the search engine and can plant exactly the collisions they check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from collide.search.results import LayerResult, Pairs


@dataclass
class FakePairwise:
    distance: float  # exact min L2 over valid pairs (inf if none)
    pair: tuple[int, int] | None  # rows (i, j), i < j, attaining it
    certified: bool  # the minimum is proven exact
    collisions: Pairs  # every pair of rows (i, j) with L2 < threshold, sorted by (distance, i, j)
    n_collisions: int  # len(collisions)
    nn_distance: np.ndarray  # (n,) per-row nearest-neighbour L2; nan for invalid rows
    n_pairs: int  # valid pairs compared
    invalid_rows: list[int]  # rows with NaN/Inf, left out
    threshold: float  # collision threshold, L2
    backend: str = "bruteforce"  # engine name
    precision: str = "fp64"  # screening arithmetic
    n_candidates: int = 0  # fp64 re-ranks
    uncertified_reason: str | None = None  # why certified is False
    seconds: float = 0.01  # search time
    nn_index: np.ndarray | None = None  # (n,) row of each row's nearest neighbour; -1 for invalid rows
    nearest: dict | None = None  # whose nearest neighbours were computed (collide.search.nearest.record)
    row_norm: np.ndarray | None = None  # (n,) L2 norm of each row; nan for invalid rows


@dataclass
class FakeStore:
    text: dict[int, str] = field(default_factory=dict)  # prompt id -> text ({} = store keeps no text)
    manifest: dict = field(default_factory=lambda: {"dtype": "fp32"})  # what the report reads of the manifest

    def texts(self, prompt_ids):
        return {int(p): self.text[int(p)] for p in prompt_ids if int(p) in self.text}


def brute_force(x: np.ndarray, threshold: float) -> FakePairwise:
    """Exact fp64 answer for a small (n, d) matrix."""
    x = np.asarray(x, dtype=np.float64)
    valid = np.isfinite(x).all(axis=1)
    rows = np.flatnonzero(valid)
    dist = np.sqrt(((x[rows, None, :] - x[None, rows, :]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    nn, nn_index = np.full(len(x), np.nan), np.full(len(x), -1, np.int64)
    nn[rows] = dist.min(axis=1) if len(rows) > 1 else np.inf
    if len(rows) > 1:
        nn_index[rows] = rows[dist.argmin(axis=1)]  # the first (smallest) row among ties
    row_norm = np.where(valid, np.linalg.norm(np.where(valid[:, None], x, 0.0), axis=1), np.nan)
    iu, ju = np.triu_indices(len(rows), 1)
    pairs = dist[iu, ju]
    best = int(np.argmin(pairs)) if len(pairs) else None
    hit = np.flatnonzero(pairs < threshold)
    hit = hit[np.lexsort((ju[hit], iu[hit], pairs[hit]))]  # by (distance, i, j), as the search sorts them
    coll = Pairs(rows[iu[hit]].astype(np.int64), rows[ju[hit]].astype(np.int64), pairs[hit].astype(np.float64))
    return FakePairwise(distance=float(pairs[best]) if best is not None else float("inf"),
                        pair=(int(rows[iu[best]]), int(rows[ju[best]])) if best is not None else None,
                        certified=True, collisions=coll, n_collisions=len(coll), nn_distance=nn,
                        n_pairs=len(pairs), invalid_rows=[int(i) for i in np.flatnonzero(~valid)],
                        threshold=threshold, nn_index=nn_index, row_norm=row_norm,
                        nearest={"rows": "all", "n_rows": len(rows), "seed": None,
                                 "description": f"nn of all {len(rows):,} rows, each exact"})


def fake_run(n_layers: int = 4, n: int = 30, d: int = 8, collide_at: tuple[int, ...] = (),
             embedding_collisions: bool = True, uncertified: tuple[int, ...] = (), threshold: float = 1e-6,
             model: str = "tiny", dtype: str = "fp32", final_norm: str = "post", seed: int = 0):
    """(run_info, results, store) of a synthetic run with layers 0..n_layers.

    Layer 0 gives prompts 100+i the state of (i mod 5) when ``embedding_collisions`` (prompts ending
    in the same token); at each layer in ``collide_at`` prompt 107 gets prompt 103's state plus 1e-9.
    """
    rng = np.random.default_rng(seed)
    ids = np.arange(100, 100 + n, dtype=np.int64)
    results = []
    for layer in range(n_layers + 1):
        x = rng.normal(size=(n, d)) * (1 + layer)
        if layer == 0 and embedding_collisions:
            x = x[np.arange(n) % 5]
        if layer in collide_at:
            x[7] = x[3] + 1e-9
        res = brute_force(x, threshold)
        if layer in uncertified:
            res.certified, res.uncertified_reason = False, "max_candidates reached"
        results.append(LayerResult(layer=layer, prompt_ids=ids, result=res))
    run_info = {
        "model": {"name": model, "source": "random:llama", "revision": None, "family": "llama", "dtype": dtype,
                  "final_norm": final_norm, "n_layers": n_layers, "d": d},
        "corpus": {"name": "stdlib-docs", "kind": "stdlib-docs", "seed": 0, "min_tokens": 8, "max_tokens": 32},
        "n_prompts": n, "n_duplicates": 2, "threshold": threshold, "layers": list(range(n_layers + 1)),
        "timings": {"load_model": 1.5, "extract": 10.25, "search": 0.5}, "store": "store",
        "command": "python -m collide model=tiny-random n_prompts=30",
    }
    store = FakeStore({int(p): f"text of prompt {p} with `ticks` and\na newline" for p in ids})
    return run_info, results, store
