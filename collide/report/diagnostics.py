"""Geometric diagnostics of each layer: the separation margin and a co-Lipschitz (lower Lipschitz) estimate.

These follow the diagnostics named in arXiv 2511.14808 ("Transformer Injectivity & Geometric
Robustness"), estimated from nearest-neighbour statistics over the run's prompt set. The
definitions below are collide's (stated in full in docs/report-schema.md and docs/quantization.md):

* **Separation margin** of layer k: ``m_k = min over distinct prompts x != y of ‖h_k(x) - h_k(y)‖``,
  L2 (not squared) between last-token states, i.e. the search's exact certified ``min_distance``.
  ``relative_margin = m_k / median_x ‖h_k(x)‖`` makes it comparable across layers and models;
  ``relative_margin_centred = m_k / median_x ‖h_k(x) - mean‖`` does the same without the part of
  the norm every prompt shares (massive activations inflate the raw norm). A collision is ``m_k = 0``
  (or below the threshold).
* **Co-Lipschitz estimate** of layer k: over the nearest-neighbour pairs (x, NN_k(x)) in state
  space, the ratio ``‖h_k(x) - h_k(NN_k(x))‖ / d_edit(x, NN_k(x))``, where d_edit is the token edit
  (Levenshtein) distance between the two token-id sequences (insertions, deletions and
  substitutions of one token each cost 1; defined for prompts of different lengths, >= 1 for
  distinct ones). Reported: its minimum (``min``: the estimate of the lower Lipschitz constant,
  in L2 per token edit), p5 and median, and the pair attaining the minimum. The minimum over the
  nearest-neighbour pairs is an upper bound of the minimum over all pairs of the set (a pair farther
  in state space may be farther still in edit distance); 0 exactly when the layer has a collision.

Both read what the search computed, never the states: the separation margin is its certified minimum,
the norms are its per-row norms (``row_norm``), and the nearest-neighbour pairs and their exact
distances are its ``nn_index`` and ``nn_distance`` (every row's, or a seeded sample's: the record
``nearest`` says which), with the prompts' token ids from the store. The co-Lipschitz ratios are
taken over at most ``max_rows`` of those rows (a seeded sample), plus the two rows of the closest
pair, whose nearest neighbours are each other at the minimum distance.
"""

from __future__ import annotations

import itertools

import numpy as np

from collide.search.results import nn_pairs

PROMPT_DISTANCE = "token_edit"  # the prompt-space distance of the co-Lipschitz estimate


def _padded(seqs: list, lengths: np.ndarray, width: int, fill: int) -> np.ndarray:
    """(m, width) int64: sequence k in row k, then ``fill``."""
    out = np.full((len(seqs), max(width, 1)), fill, np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(seqs), np.int64, count=int(lengths.sum()))
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[np.repeat(np.arange(len(seqs)), lengths), np.arange(len(flat)) - starts] = flat
    return out


def edit_distances(a: list, b: list) -> np.ndarray:
    """Levenshtein distance (unit costs) between token sequences a[k] and b[k], for every k: (m,) int64."""
    m = len(a)
    if m == 0:
        return np.zeros(0, np.int64)
    la = np.array([len(s) for s in a], np.int64)
    lb = np.array([len(s) for s in b], np.int64)
    ta, tb = int(la.max()), int(lb.max())
    A, B = _padded(a, la, ta, -1), _padded(b, lb, tb, -2)
    ar = np.arange(tb + 1, dtype=np.int32)
    prev = np.broadcast_to(ar, (m, tb + 1)).copy()  # row i = 0: j insertions
    out = prev[np.arange(m), lb].astype(np.int64)  # for la == 0
    first = np.empty((m, 1), np.int32)
    for i in range(1, ta + 1):
        sub = prev[:, :-1] + (A[:, i - 1:i] != B[:, :tb])  # substitute (or match)
        best = np.minimum(sub, prev[:, 1:] + 1)  # or delete a's i-th token
        first.fill(i)
        c = np.concatenate([first, best], axis=1)
        cur = np.minimum.accumulate(c - ar, axis=1) + ar  # or insert: cur[j] = min_k c[k] + (j - k)
        done = la == i
        out[done] = cur[done, lb[done]]
        prev = cur
    return out


def _median(values, n: int) -> float | None:
    """The median of the finite values (n,), None if there are none (or no values)."""
    v = np.asarray(values if values is not None else np.full(n, np.nan), np.float64)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else None


def _sequences(token_ids, rows: np.ndarray) -> list:
    """The token-id sequences of ``rows``: from a list, or from an Arrow column (one ``take``)."""
    if hasattr(token_ids, "take"):
        return token_ids.take(rows).to_pylist()
    return [token_ids[i] for i in rows]


def layer_diagnostics(result, token_ids: list, prompt_ids: np.ndarray | None = None, max_rows: int = 4096,
                      seed: int = 0) -> dict:
    """The diagnostics of one layer (see the module docstring) from its search result; distances L2, not squared.

    ``result``: the layer's collide.search.PairwiseResult (its distance, pair, nn_index, nn_distance and
    row_norm, in row order); ``token_ids``: each row's token-id sequence, a list or an Arrow column (only the
    rows used are read);
    ``prompt_ids`` (n,) names rows in the output.
    """
    n = len(result.nn_distance)
    ids = np.arange(n) if prompt_ids is None else np.asarray(prompt_ids, np.int64)
    norm_p50, centred_p50 = (_median(getattr(result, key, None), n) for key in ("row_norm", "centred_norm"))
    min_distance = float(result.distance) if np.isfinite(result.distance) else None
    out = {"separation_margin": min_distance,
           "state_norm_p50": norm_p50,
           "relative_margin": (min_distance / norm_p50) if min_distance is not None and norm_p50 else None,
           "centred_norm_p50": centred_p50,
           "relative_margin_centred": (min_distance / centred_p50) if min_distance is not None and centred_p50
           else None,
           "co_lipschitz": None}
    rows, partner, dist = nn_pairs(result)
    sampled = len(rows) > max_rows
    if sampled:
        keep = np.random.default_rng(seed).choice(len(rows), size=max_rows, replace=False)
        rows, partner, dist = rows[keep], partner[keep], dist[keep]
    if result.pair is not None and min_distance is not None:  # each is the other's nearest neighbour
        i, j = result.pair
        have = set(rows.tolist())
        extra = [(a, b) for a, b in ((i, j), (j, i)) if a not in have]
        rows = np.concatenate([rows, [a for a, _ in extra]]).astype(np.int64)
        partner = np.concatenate([partner, [b for _, b in extra]]).astype(np.int64)
        dist = np.concatenate([dist, [min_distance] * len(extra)])
    if len(rows) == 0:
        return out
    order = np.argsort(rows, kind="stable")
    rows, partner, dist = rows[order], partner[order], dist[order]
    edits = edit_distances(_sequences(token_ids, rows), _sequences(token_ids, partner)).astype(np.float64)
    ratio = dist / np.maximum(edits, 1.0)
    k = int(np.argmin(ratio))
    out["co_lipschitz"] = {
        "min": float(ratio[k]),
        "p5": float(np.percentile(ratio, 5)),
        "p50": float(np.percentile(ratio, 50)),
        "min_relative": float(ratio[k] / norm_p50) if norm_p50 else None,
        "pair": sorted([int(ids[rows[k]]), int(ids[partner[k]])]),
        "pair_state_distance": float(dist[k]),
        "pair_prompt_distance": int(edits[k]),
        "prompt_distance_p50": float(np.percentile(edits, 50)),
        "n_pairs": int(len(rows)),
        "sampled": bool(sampled or (result.nearest or {}).get("rows") == "sample"),
    }
    return out


def store_diagnostics(store, results: list, max_rows: int = 4096, seed: int = 0) -> dict[int, dict]:
    """{layer: layer_diagnostics} for every search result of ``store`` (a collide Store): reads the prompts'
    token ids (those of the rows it uses), never the states."""
    if not results:
        return {}
    prompts = store.prompts(["prompt_id", "token_ids"])
    table_ids = prompts.column("prompt_id").to_numpy()
    tokens = prompts.column("token_ids")  # an Arrow column: only the rows used are converted
    out = {}
    for r in results:
        ids = np.asarray(r.prompt_ids, np.int64)
        if not np.array_equal(ids, table_ids):
            continue  # the result does not describe these prompts (another store or selection)
        out[int(r.layer)] = layer_diagnostics(r.result, tokens, ids, max_rows, seed)
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
    if not hasattr(store, "prompts"):
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
