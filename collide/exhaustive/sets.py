"""The unit of the exhaustive test: a prompt set (one base prompt and the tokens appended to it),
its certified search, its results in words, and their file, which is the unit of resume.

Rows of a set are its continuations in prompt-id order; a search result's rows are turned into
appended tokens (and sets) here. Distances are L2, not squared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from collide.atomic import atomic_write_json
from collide.config import SearchConfig
from collide.exhaustive.config import ExhaustiveConfig
from collide.search import LayerResult, min_pairwise, search_store

log = logging.getLogger(__name__)

# The fields of a search restricted to pairs whose appended tokens have different input embeddings.
DISTINCT_KEYS = ("n_pairs", "min_distance", "certified", "n_collisions", "closest_pair")
RESULTS_FORMAT = 2  # of a set's results file: set files of another format are searched again


@dataclass
class PromptSet:
    """One base prompt and the tokens appended to it."""

    index: int  # set number s (0-based); in the exhaustive store it holds ids s * n .. (s + 1) * n - 1
    base_prompt_id: int  # prompt id in the run's store
    prefix: list[int]  # the base prompt's token ids, BOS included: what the model saw
    text: str | None  # the base prompt's text (None when the run's store keeps none)
    tokens: np.ndarray  # appended token ids, sorted


def n_pairs(n: int) -> int:
    """C(n, 2): unordered pairs among n continuations (exact integer)."""
    return n * (n - 1) // 2


def search_kwargs(search: SearchConfig) -> dict:
    """SearchConfig -> keyword arguments of collide.search.min_pairwise, without a progress bar."""
    return {**asdict(search), "progress": False}


def pair_entry(found: LayerResult, row_tokens: np.ndarray, texts: dict[int, str], max_listed: int,
               row_sets: np.ndarray | None = None, set_bases: list[int] | None = None) -> dict:
    """One layer's search result: ``LayerResult.to_dict`` (the fields and names of report.json's
    layers), with its pairs in words: ``collisions`` (the first ``max_listed``) and ``closest_pair``
    name the two appended tokens (and their sets) instead of prompt ids.

    ``row_tokens[r]`` is the token appended in row r of ``found``, ``texts`` maps token id -> decoded
    text; ``row_sets``/``set_bases`` (across-sets search) give each row's set and each set's base prompt.
    """
    def describe(i: int, j: int, distance: float) -> dict:
        out = {"tokens": [int(row_tokens[i]), int(row_tokens[j])],
               "token_texts": [texts[int(row_tokens[i])], texts[int(row_tokens[j])]], "distance": float(distance)}
        if row_sets is not None:
            out["sets"] = [int(row_sets[i]), int(row_sets[j])]
            out["base_prompt_ids"] = [set_bases[int(row_sets[i])], set_bases[int(row_sets[j])]]
        return out

    res = found.result
    return {**found.to_dict(max_listed),
            "collisions": [describe(i, j, x) for i, j, x in res.collisions.tolist(max_listed)],
            "closest_pair": describe(*res.pair, res.distance) if res.pair is not None else None}


def digest(obj) -> str:
    """A short sha256 of a JSON-able dict (keys sorted): the key of a set's results."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class SetResults:
    """Per-set results on disk (``RUN_DIR/exhaustive/sets/<mode>-NNNNN.json``), the unit of resume.

    A file counts only if its ``key`` (a digest of everything that determines the result, and of
    RESULTS_FORMAT) equals the current run's; otherwise the set is searched again.
    """

    def __init__(self, out_dir: Path, mode: str, inputs: dict):
        self.dir = out_dir / "sets"  # where the files live
        self.mode = mode  # exhaustive | margin
        # digest of the inputs, extraction and search settings (``inputs``, JSON-able)
        self.key = digest({**inputs, "results_format": RESULTS_FORMAT})
        self.dir.mkdir(parents=True, exist_ok=True)

    def _file(self, index: int) -> Path:
        return self.dir / f"{self.mode}-{index:05d}.json"

    def get(self, index: int) -> dict | None:
        file = self._file(index)
        if not file.is_file():
            return None
        result = json.loads(file.read_text())
        if result.get("key") != self.key:
            log.info("set %d: stored result was made with other settings; searching again", index)
            return None
        return result

    def put(self, index: int, result: dict) -> None:
        atomic_write_json(self._file(index), {"key": self.key, **result})


def search_set(store, pset: PromptSet, layers: list[int], threshold: float, cfg: ExhaustiveConfig,
               texts: dict[int, str], representatives: np.ndarray | None = None) -> dict:
    """The certified search within one set at each layer, streaming the set's shards.

    ``representatives``: when some appended tokens have bitwise-identical input embeddings, the
    first token of each group. Those pairs collide by construction (distance exactly 0) and the
    full search finds them; a second search over the representatives alone then gives each
    layer's ``distinct_inputs`` result: the minimum over pairs whose inputs differ.
    """
    n = len(pset.tokens)
    view = store.select_range(pset.index * n, (pset.index + 1) * n)  # whole shards: none crosses a set
    appended = view.prompts(["appended_token"]).column(0).to_numpy().astype(np.int64)  # row r: prompt id base + r
    keep = None if representatives is None else np.isin(appended, representatives)
    entries, t0 = [], time.perf_counter()
    for k in layers:
        found = search_store(view, k, threshold, cfg.search)
        entry = pair_entry(found, appended, texts, cfg.max_listed)
        if keep is None:
            entry["distinct_inputs"] = {key: entry[key] for key in DISTINCT_KEYS}
        else:
            ids, states = view.layer(k)  # rows in prompt id order, as ``appended``
            res = min_pairwise(states[keep], threshold, **search_kwargs(cfg.search))
            distinct = pair_entry(LayerResult(k, ids[keep], res), appended[keep], texts, cfg.max_listed)
            entry["distinct_inputs"] = {key: distinct[key] for key in DISTINCT_KEYS}
        entries.append(entry)
        log.info("set %d (prompt %d) layer %d: min %.6g (%s), %d collisions (distinct inputs: min %.6g, %d), %.1f s",
                 pset.index, pset.base_prompt_id, k, found.result.distance,
                 "certified" if found.result.certified else "NOT certified", found.result.n_collisions,
                 entry["distinct_inputs"]["min_distance"] or 0.0, entry["distinct_inputs"]["n_collisions"],
                 found.result.seconds)
    return {"set": pset.index, "base_prompt_id": pset.base_prompt_id, "prefix_tokens": len(pset.prefix),
            "n_continuations": n, "search_s": round(time.perf_counter() - t0, 3), "layers": entries}


def search_across(store, sets: list[PromptSet], layers: list[int], threshold: float, cfg: ExhaustiveConfig,
                  texts: dict[int, str]) -> list[dict]:
    """The certified search over all sets' continuations together, one layer at a time."""
    table = store.prompts(["prompt_id", "set_index", "appended_token"])
    appended = table.column("appended_token").to_numpy().astype(np.int64)
    set_of = table.column("set_index").to_numpy()
    out = []
    for k in layers:
        found = search_store(store, k, threshold, cfg.search)
        rows = found.prompt_ids  # the store's ids are its row numbers 0..N-1
        out.append(pair_entry(found, appended[rows], texts, cfg.max_listed, set_of[rows],
                              [s.base_prompt_id for s in sets]))
        log.info("across sets, layer %d: min %.6g (%s), %d collisions, %.1f s", k, found.result.distance,
                 "certified" if found.result.certified else "NOT certified", found.result.n_collisions,
                 found.result.seconds)
    return out


def summarize_layers(set_results: list[dict], layers: list[int]) -> list[dict]:
    """Per layer over all sets: exact pair count, min distance and where, certification, collisions."""
    out = []
    for slot, k in enumerate(layers):
        per_set = [(r, r["layers"][slot]) for r in set_results]
        finite = [(r, e) for r, e in per_set if e["min_distance"] is not None]
        best_r, best = min(finite, key=lambda re: (re[1]["min_distance"], re[0]["set"])) if finite else (None, None)
        closest = None
        if best is not None:
            closest = {**best["closest_pair"], "set": best_r["set"], "base_prompt_id": best_r["base_prompt_id"]}
        entry = {"layer": k, "n_pairs": sum(e["n_pairs"] for _, e in per_set),
                 "min_distance": best["min_distance"] if best else None,
                 "certified": all(e["certified"] for _, e in per_set),
                 "n_collisions": sum(e["n_collisions"] for _, e in per_set),
                 "closest_pair": closest,
                 "min_distance_per_set": [e["min_distance"] for _, e in per_set]}
        if "distinct_inputs" in per_set[0][1]:
            distinct = summarize_layers([{**r, "layers": [e["distinct_inputs"]]} for r, (_, e) in
                                         zip(set_results, per_set)], [k])[0]
            entry["n_collisions_identical_inputs"] = entry["n_collisions"] - distinct["n_collisions"]
            entry["distinct_inputs"] = {key: distinct[key] for key in DISTINCT_KEYS + ("min_distance_per_set",)}
        out.append(entry)
    return out
