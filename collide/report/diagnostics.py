"""Geometric diagnostics of each layer: the separation margin and a co-Lipschitz (lower Lipschitz) estimate.

These follow the diagnostics named in arXiv 2511.14808 ("Transformer Injectivity & Geometric
Robustness"), estimated from nearest-neighbour statistics over the run's prompt set. The
definitions below are collide's (stated in full in docs/report-schema.md and docs/quantization.md):

* **Separation margin** of layer k: ``m_k = min over distinct prompts x != y of ‖h_k(x) - h_k(y)‖``,
  L2 (not squared) between last-token states, i.e. the search's exact certified ``min_distance``.
  ``relative_margin = m_k / median_x ‖h_k(x)‖`` makes it comparable across layers and models. A
  collision is ``m_k = 0`` (or below the threshold).
* **Co-Lipschitz estimate** of layer k: over the nearest-neighbour pairs (x, NN_k(x)) in state
  space, the ratio ``‖h_k(x) - h_k(NN_k(x))‖ / d_edit(x, NN_k(x))``, where d_edit is the token edit
  (Levenshtein) distance between the two token-id sequences (insertions, deletions and
  substitutions of one token each cost 1; defined for prompts of different lengths, >= 1 for
  distinct ones). Reported: its minimum (``min``: the estimate of the lower Lipschitz constant,
  in L2 per token edit), p5 and median, and the pair attaining the minimum. The minimum over the
  nearest-neighbour pairs is an upper bound of the minimum over all pairs of the set (a pair farther
  in state space may be farther still in edit distance); 0 exactly when the layer has a collision.

The numerator is the search's exact nearest-neighbour distance of each row (``nn_distance``); the
neighbour itself is found here by an fp64 scan of the stored states (direct differences for the
candidates), for at most ``max_rows`` rows (a seeded sample that always holds the closest pair).
"""

from __future__ import annotations

import numpy as np

PROMPT_DISTANCE = "token_edit"  # the prompt-space distance of the co-Lipschitz estimate
SCAN_ROWS = 256  # rows per fp64 scan block: memory O(SCAN_ROWS * n) doubles


def edit_distances(a: list, b: list) -> np.ndarray:
    """Levenshtein distance (unit costs) between token sequences a[k] and b[k], for every k: (m,) int64."""
    m = len(a)
    if m == 0:
        return np.zeros(0, np.int64)
    la = np.array([len(s) for s in a], np.int64)
    lb = np.array([len(s) for s in b], np.int64)
    ta, tb = int(la.max()), int(lb.max())
    A = np.full((m, max(ta, 1)), -1, np.int64)
    B = np.full((m, max(tb, 1)), -2, np.int64)
    for k in range(m):
        A[k, :la[k]], B[k, :lb[k]] = a[k], b[k]
    ar = np.arange(tb + 1, dtype=np.int64)
    prev = np.broadcast_to(ar, (m, tb + 1)).copy()  # row i = 0: j insertions
    out = prev[np.arange(m), lb].copy()  # for la == 0
    for i in range(1, ta + 1):
        sub = prev[:, :-1] + (A[:, i - 1:i] != B[:, :tb])  # substitute (or match)
        best = np.minimum(sub, prev[:, 1:] + 1)  # or delete a's i-th token
        first = np.full((m, 1), i, np.int64)
        c = np.concatenate([first, best], axis=1)
        cur = np.minimum.accumulate(c - ar, axis=1) + ar  # or insert: cur[j] = min_k c[k] + (j - k)
        done = la == i
        out[done] = cur[done, lb[done]]
        prev = cur
    return out


def nearest_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each of ``rows``, the index of its nearest other row of x (exact fp64 L2; smallest index on ties).

    Screens with an fp64 Gram matrix of the centred rows, then compares every candidate within the
    screen's error of the best by direct fp64 differences.
    """
    xc = np.asarray(x, np.float64)
    xc = xc - xc.mean(axis=0)
    sq = np.einsum("ij,ij->i", xc, xc)
    out = np.empty(len(rows), np.int64)
    slack = 1e-10 * (sq.max() if len(sq) else 0.0) * max(xc.shape[1], 1)  # >> fp64 rounding of the Gram form
    for lo in range(0, len(rows), SCAN_ROWS):
        r = rows[lo:lo + SCAN_ROWS]
        d2 = sq[r, None] + sq[None, :] - 2.0 * (xc[r] @ xc.T)
        d2[np.arange(len(r)), r] = np.inf
        best = d2.min(axis=1)
        for t, i in enumerate(r):
            cand = np.flatnonzero(d2[t] <= best[t] + slack)
            exact = ((xc[cand] - xc[i]) ** 2).sum(axis=1)
            out[lo + t] = cand[np.flatnonzero(exact == exact.min())[0]]
    return out


def layer_diagnostics(states: np.ndarray, token_ids: list, nn_distance: np.ndarray, min_distance: float | None,
                      closest: tuple[int, int] | None = None, max_rows: int = 4096, seed: int = 0,
                      prompt_ids: np.ndarray | None = None) -> dict:
    """The diagnostics of one layer (see the module docstring); distances L2, not squared.

    ``states`` (n, d) and ``token_ids`` (n sequences) are in row order, ``nn_distance`` (n,) is the
    search's exact per-row nearest-neighbour distance (nan/inf rows are left out), ``closest`` the
    rows of the closest pair (always kept in a sample), ``prompt_ids`` (n,) names rows in the output.
    """
    n = len(states)
    ids = np.arange(n) if prompt_ids is None else np.asarray(prompt_ids, np.int64)
    norms = np.linalg.norm(np.asarray(states, np.float64), axis=1)
    finite = np.isfinite(norms)
    norm_p50 = float(np.median(norms[finite])) if finite.any() else None
    out = {"separation_margin": min_distance,
           "state_norm_p50": norm_p50,
           "relative_margin": (min_distance / norm_p50) if min_distance is not None and norm_p50 else None,
           "co_lipschitz": None}
    nn = np.asarray(nn_distance, np.float64)
    usable = np.flatnonzero(np.isfinite(nn) & finite)
    if len(usable) < 1:
        return out
    rows, sampled = usable, False
    if len(usable) > max_rows:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(usable, size=max_rows, replace=False))
        if closest is not None:
            rows = np.unique(np.concatenate([rows, np.asarray(closest, np.int64)]))
        sampled = True
    valid = np.flatnonzero(finite)
    local = nearest_rows(np.asarray(states)[valid], np.searchsorted(valid, rows))
    partner = valid[local]
    edits = edit_distances([token_ids[i] for i in rows], [token_ids[j] for j in partner]).astype(np.float64)
    ratio = nn[rows] / np.maximum(edits, 1.0)
    k = int(np.argmin(ratio))
    out["co_lipschitz"] = {
        "min": float(ratio[k]),
        "p5": float(np.percentile(ratio, 5)),
        "p50": float(np.percentile(ratio, 50)),
        "min_relative": float(ratio[k] / norm_p50) if norm_p50 else None,
        "pair": sorted([int(ids[rows[k]]), int(ids[partner[k]])]),
        "pair_state_distance": float(nn[rows[k]]),
        "pair_prompt_distance": int(edits[k]),
        "prompt_distance_p50": float(np.percentile(edits, 50)),
        "n_pairs": int(len(rows)),
        "sampled": sampled,
    }
    return out


def store_diagnostics(store, results: list, max_rows: int = 4096, seed: int = 0) -> dict[int, dict]:
    """{layer: layer_diagnostics} for every search result of ``store`` (a collide Store; rows in prompt-id order)."""
    if not results:
        return {}
    prompts = store.prompts(["prompt_id", "token_ids"])
    by_id = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("token_ids").to_pylist()))
    out = {}
    for r in results:
        ids, states = store.layer(int(r.layer))
        if not np.array_equal(ids, np.asarray(r.prompt_ids, np.int64)):
            continue  # the result does not describe these rows (another selection of the store)
        tokens = [by_id[int(p)] for p in ids]
        res = r.result
        md = float(res.distance) if np.isfinite(res.distance) else None
        out[int(r.layer)] = layer_diagnostics(states, tokens, res.nn_distance, md, res.pair, max_rows, seed, ids)
    return out


DEFINITION = ("separation_margin: min L2 (not squared) between the last-token states of two distinct prompts "
              "(the search's certified min_distance); relative_margin: it over the median state norm. "
              "co_lipschitz: over nearest-neighbour pairs (x, NN(x)) in state space, L2 distance over the token "
              "edit (Levenshtein) distance of the two token-id sequences, in L2 per token edit; min is the "
              "estimate of the lower Lipschitz constant (an upper bound of the min over all pairs).")


def lossless_storage(compute: str, stored: str) -> bool:
    """True when storing states of compute dtype ``compute`` as ``stored`` loses nothing (same or wider)."""
    width = {"fp16": 1, "bf16": 1, "fp32": 2, "fp64": 3}
    return stored == compute or width.get(stored, 0) > width.get(compute, 0)


def attach(report: dict, results: list, store, max_rows: int = 4096) -> None:
    """Add the diagnostics to a report dict: ``layers[i]["diagnostics"]`` and the top-level
    ``diagnostics`` record. Nothing when ``store`` cannot give its states and token ids."""
    if not (hasattr(store, "layer") and hasattr(store, "prompts")):
        return
    per_layer = store_diagnostics(store, results, max_rows)
    for entry in report["layers"]:
        if entry["layer"] in per_layer:
            entry["diagnostics"] = per_layer[entry["layer"]]
    report["diagnostics"] = {"prompt_distance": PROMPT_DISTANCE, "max_rows": int(max_rows),
                             "definition": DEFINITION, "reference": "arXiv 2511.14808"}


def quantization_record(report: dict) -> dict:
    """The report's ``quantization`` record: the quantized forward (a property of the model) apart from the
    storage dtype (a property of the store), and so what a collision is evidence of."""
    forward = report["model"].get("quant") or {"activations": "none", "weights": "none",
                                               "description": "none (the model's own forward)"}
    lossless = lossless_storage(report["dtype"], report["store_dtype"])
    return {"forward": forward, "storage": {"dtype": report["store_dtype"], "lossless": lossless},
            "collisions_are": "model" if lossless else "model_or_storage"}
