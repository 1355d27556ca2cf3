"""The two modes of the exhaustive test, on a finished run with its model loaded.

* ``run_exhaustive``: every set (base prompt + each token of the list) is extracted into
  ``RUN_DIR/exhaustive/stores/<content key>/`` shard by shard and searched within itself (resumable), optionally
  across sets; returns exhaustive.json's dict.
* ``run_margin`` (the paper's appendix): per prompt, the minimum distance among ``n_tokens``
  seeded continuations; nothing is stored but the results.

Layer k is HF ``hidden_states[k]``; distances are L2, not squared; timings in seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from collide.config import ExtractConfig, ModelConfig, StoreConfig
from collide.exhaustive.config import ExhaustiveConfig
from collide.console import progress
from collide.continuations import continuation_states, input_groups
from collide.errors import CollideError
from collide.exhaustive.inputs import STORES_DIR, RunInputs, auto_batch_size, decode_tokens, margin_tokens, token_list
from collide.exhaustive.sets import (PromptSet, SetResults, n_pairs, pair_entry, search_across, search_kwargs,
                                     search_set, summarize_layers)
from collide.extract import ShardPipeline, store_header
from collide.models import LoadedModel
from collide.search import LayerResult, min_pairwise
from collide.store.identity import identity_hash

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1.0"  # of exhaustive.json and margin.json
# The paper's appendix (GPT-2 Small): min distance among 1000 single-token continuations of a
# prompt, mean over 100 prompts, layers 1..12. The number to check with hub access (model=gpt2).
PAPER_GPT2_MARGIN = {1: 1.850, 2: 1.957, 3: 2.064, 4: 2.241, 5: 2.382, 6: 2.500, 7: 2.705, 8: 2.886, 9: 3.025,
                     10: 3.331, 11: 3.918, 12: 4.640}


def store_identity(inputs: RunInputs, sets: list[PromptSet], layers: list[int], vocab) -> dict:
    """What makes the exhaustive store (and so its location): a resumed store must match every key."""
    return {"mode": "exhaustive", "model": asdict(inputs.model_cfg), "run_identity": inputs.store.manifest["identity"],
            "base_prompt_ids": [s.base_prompt_id for s in sets], "vocab": vocab, "n_tokens": len(sets[0].tokens),
            "tokens_sha256": hashlib.sha256(sets[0].tokens.tobytes()).hexdigest(), "layers": layers}


def store_location(out_dir: Path, identity: dict) -> Path:
    """``RUN_DIR/exhaustive/stores/sets<S>-tokens<N>-<hash>``: one store per identity, never overwritten."""
    name = f"sets{len(identity['base_prompt_ids'])}-tokens{identity['n_tokens']}-{identity_hash(identity)}"
    return out_dir / STORES_DIR / name


def serving_store(out_dir: Path, identity: dict):
    """A complete exhaustive store of this run that holds this test's sets, or None.

    It serves when it was made by the same model from the same run with the same token list, its
    base prompts start with this test's (in the same order: set s holds rows s*n..(s+1)*n-1, so the
    first sets are this test's) and it holds every layer asked for.
    """
    from collide.store import Store, read_manifest

    ids, layers = identity["base_prompt_ids"], set(identity["layers"])
    for path in [store_location(out_dir, identity)] + sorted((out_dir / STORES_DIR).glob("*")):
        try:
            manifest = read_manifest(path)
        except CollideError:
            continue
        stored = manifest.get("identity", {})
        if (manifest.get("status") == "complete" and stored.get("base_prompt_ids", [])[:len(ids)] == ids
                and layers <= set(stored.get("layers", [])) and set(stored) == set(identity)
                and all(stored[k] == identity[k] for k in identity if k not in ("base_prompt_ids", "layers"))):
            return Store(path)
    return None


def extract_set(lm: LoadedModel, writer, pset: PromptSet, layers: list[int], batch_size: int, shard_rows: int,
                texts: list[str], groups: tuple[np.ndarray, np.ndarray], show_progress: bool) -> None:
    """Extract set ``pset`` into the store from the row where it stopped, in shards of whole blocks.

    A shard holds whole continuation blocks (so a resume starts where a block starts and recomputes
    the same blocks) and never crosses the set's end. The writer thread commits a shard while
    the next one is computed (building its prompts table too). ``groups``: ``input_groups`` of the
    tokens, shared by all sets.
    """
    from collide.store import prompt_table

    n = len(pset.tokens)
    first = pset.index * n
    done = writer.n_rows - first
    if done >= n:
        return
    text_of = dict(zip(pset.tokens.tolist(), texts))
    bar = progress(total=n, initial=done, unit="cont", desc=f"set {pset.index} (prompt {pset.base_prompt_id})",
                   disable=not show_progress)
    blocks, rows, next_id, t0 = [], 0, first + done, time.perf_counter()

    def commit(first_id: int, blocks: list, forward_s: float) -> None:  # runs on the writer thread
        tokens = np.concatenate([b.tokens for b in blocks])
        listed = tokens.tolist()
        table = prompt_table(first_id, [pset.prefix + [t] for t in listed],
                             [f"continuation:{pset.base_prompt_id}+{t}" for t in listed], None,
                             set_index=np.full(len(tokens), pset.index, np.int32),
                             base_prompt_id=np.full(len(tokens), pset.base_prompt_id, np.int64),
                             appended_token=tokens.astype(np.int32), appended_text=[text_of[t] for t in listed])
        states = {k: torch.cat([b.states[k] for b in blocks]).numpy() for k in layers}
        writer.commit_shard(table, states, {"set_index": pset.index, "forward_s": round(forward_s, 6)})

    try:
        # at most one shard in flight; a shard being written completes, also on Ctrl-C
        with ShardPipeline("collide-exhaustive-writer") as pipeline:
            for block in continuation_states(lm, pset.prefix, pset.tokens, layers, batch_size, start=done,
                                             progress=bar, groups=groups):
                blocks.append(block)
                rows += len(block.tokens)
                if rows >= shard_rows or next_id + rows == first + n:
                    pipeline.submit(commit, next_id, blocks, time.perf_counter() - t0)
                    blocks, next_id, rows, t0 = [], next_id + rows, 0, time.perf_counter()
    finally:
        bar.close()


def set_extract_seconds(store, first_id: int, stop_id: int) -> float:
    """Forward seconds of a set's shards, as recorded in the manifest (survives resumes)."""
    return sum(float(s.get("forward_s", 0.0)) for s in store.manifest["shards"]
               if first_id <= int(s["first_prompt_id"]) < stop_id)


def run_exhaustive(inputs: RunInputs, lm: LoadedModel, layers: list[int], prompts: dict[int, dict],
                   selection: dict, cfg: ExhaustiveConfig, timings: dict) -> dict:
    """Extract and search every set (resumable), optionally across sets; returns exhaustive.json's dict.

    ``prompts``: ``base_prompts`` of the selected ids, in set order."""
    from collide.store import Store, StoreWriter

    out_dir = inputs.out_dir
    tokens = token_list(lm.model.get_input_embeddings().weight.shape[0], cfg.vocab, cfg.seed)
    sets = [PromptSet(index=s, base_prompt_id=pid, prefix=list(prompt["token_ids"]), text=prompt["text"],
                      tokens=tokens) for s, (pid, prompt) in enumerate(prompts.items())]
    n = len(tokens)
    tic = time.perf_counter()
    token_texts = decode_tokens(lm, tokens)
    texts = dict(zip(tokens.tolist(), token_texts))
    first, group = input_groups(lm, tokens)
    counts = np.bincount(group)
    dup_groups = [tokens[group == g].tolist() for g in np.nonzero(counts > 1)[0]]
    timings["decode_s"] = time.perf_counter() - tic

    identity = store_identity(inputs, sets, layers, cfg.vocab)
    results = SetResults(out_dir, "exhaustive", {"store": identity, "threshold": inputs.threshold,
                                                 "search": search_kwargs(cfg.search)})
    representatives = tokens[first] if len(first) < n else None

    def result_of(store, pset: PromptSet) -> dict:
        result = results.get(pset.index)
        if result is None:
            result = search_set(store, pset, layers, inputs.threshold, cfg, texts, representatives)
            result["extract_s"] = round(set_extract_seconds(store, pset.index * n, (pset.index + 1) * n), 3)
            results.put(pset.index, result)
        return result

    store = serving_store(out_dir, identity)
    if store is not None:
        batch = int(store.manifest["max_batch_size"])
        log.info("the complete store %s holds these %d sets x %d continuations at layers %s: searching it without "
                 "extracting", store.path, len(sets), n, layers)
        set_results = [result_of(store, pset) for pset in sets]
    else:
        longest = max(len(s.prefix) for s in sets)
        batch = cfg.batch_size or auto_batch_size(lm, longest, len(layers))
        header = store_header(lm, layers, n * len(sets), StoreConfig(shard_rows=cfg.shard_rows, keep_text=False),
                              ExtractConfig(max_batch_size=batch))
        writer = StoreWriter.open(store_location(out_dir, identity), identity, header)
        with contextlib.closing(writer):  # the lock on the store is released however this ends
            batch, shard_rows = int(writer.batching("max_batch_size")), int(writer.batching("shard_rows"))
            log.info("%d sets x %d continuations (%d distinct input rows), %d pairs per set and layer, layers %s, "
                     "%d continuations per step", len(sets), n, len(first), n_pairs(n), layers, batch)
            set_results = []
            for pset in sets:
                if results.get(pset.index) is None and writer.n_rows < (pset.index + 1) * n:
                    extract_set(lm, writer, pset, layers, batch, shard_rows, token_texts, (first, group), cfg.progress)
                set_results.append(result_of(Store(writer.path, verified=writer.written), pset))
            if not writer.complete:
                writer.finish(sum(r["extract_s"] for r in set_results))
        store = Store(writer.path, verified=writer.written)  # this run's files are hashed already
    timings["extract_s"] = sum(r["extract_s"] for r in set_results)
    timings["search_s"] = sum(r["search_s"] for r in set_results)
    across = None
    if cfg.across_sets:
        tic = time.perf_counter()
        across = search_across(store, sets, layers, inputs.threshold, cfg, texts)
        timings["across_sets_s"] = time.perf_counter() - tic
    return {"schema_version": SCHEMA_VERSION, "mode": "exhaustive", "threshold": inputs.threshold, "layers": layers,
            "selection": selection,
            "tokens": {"vocab": cfg.vocab, "seed": cfg.seed if cfg.vocab != "all" else None, "n_tokens": n,
                       "n_distinct_inputs": len(first), "duplicate_input_groups": dup_groups[:cfg.max_listed],
                       "n_duplicate_input_groups": len(dup_groups)},
            "n_sets": len(sets), "n_pairs_per_layer": n_pairs(n) * len(sets),
            "per_layer": summarize_layers(set_results, layers),
            "across_sets": across,
            "sets": [{**r, "base_text": pset.text, "prefix_tokens": len(pset.prefix)}
                     for r, pset in zip(set_results, sets)],
            "batch_size": batch, "store": str(store.path.relative_to(inputs.run_dir))}


def run_margin(inputs: RunInputs, lm: LoadedModel, layers: list[int], prompts: dict[int, dict],
               selection: dict, cfg: ExhaustiveConfig, timings: dict) -> dict:
    """The paper's margin variant: per prompt, the min distance among ``n_tokens`` continuations.

    ``prompts``: ``base_prompts`` of the selected ids, in order."""
    vocab_size = lm.model.get_input_embeddings().weight.shape[0]
    ids = list(prompts)
    identity = {"mode": "margin", "model": asdict(inputs.model_cfg), "run_identity": inputs.store.manifest["identity"],
                "n_tokens": cfg.n_tokens, "seed": cfg.seed, "layers": layers}
    results = SetResults(inputs.out_dir, "margin", {"identity": identity, "threshold": inputs.threshold,
                                                    "search": search_kwargs(cfg.search)})
    set_results = []
    timings.setdefault("extract_s", 0.0)
    timings.setdefault("search_s", 0.0)
    bar = progress(total=len(ids), unit="prompt", desc="margin", disable=not cfg.progress)
    for s, pid in enumerate(ids):
        result = results.get(s)
        if result is None or result["base_prompt_id"] != pid:
            prefix = list(prompts[pid]["token_ids"])
            tokens = margin_tokens(vocab_size, cfg.n_tokens, cfg.seed, pid)
            texts = dict(zip(tokens.tolist(), decode_tokens(lm, tokens)))
            tic = time.perf_counter()
            blocks = list(continuation_states(lm, prefix, tokens, layers, cfg.batch_size or
                                              auto_batch_size(lm, len(prefix), len(layers))))
            extract_s = time.perf_counter() - tic
            row_tokens = np.concatenate([b.tokens for b in blocks])
            entries = []
            for k in layers:
                res = min_pairwise(torch.cat([b.states[k] for b in blocks]), inputs.threshold,
                                   **search_kwargs(cfg.search))
                # the rows' ids are their appended tokens (a margin set has no store)
                entries.append(pair_entry(LayerResult(k, row_tokens, res), row_tokens, texts, cfg.max_listed))
            result = {"set": s, "base_prompt_id": pid, "prefix_tokens": len(prefix), "n_continuations": len(tokens),
                      "extract_s": round(extract_s, 3), "search_s": round(time.perf_counter() - tic - extract_s, 3),
                      "layers": entries}
            results.put(s, result)
        set_results.append(result)
        timings["extract_s"] += result["extract_s"]
        timings["search_s"] += result["search_s"]
        bar.update(1)
    bar.close()
    per_layer = []
    for slot, k in enumerate(layers):
        mins = np.array([r["layers"][slot]["min_distance"] for r in set_results], dtype=np.float64)
        per_layer.append({"layer": k, "mean_min_distance": float(mins.mean()), "std_min_distance": float(mins.std()),
                          "min_min_distance": float(mins.min()), "max_min_distance": float(mins.max()),
                          "n_pairs": sum(r["layers"][slot]["n_pairs"] for r in set_results),
                          "certified": all(r["layers"][slot]["certified"] for r in set_results),
                          "n_collisions": sum(r["layers"][slot]["n_collisions"] for r in set_results),
                          "paper_gpt2_small": PAPER_GPT2_MARGIN.get(k) if is_gpt2_small(inputs.model_cfg) else None})
    return {"schema_version": SCHEMA_VERSION, "mode": "margin", "threshold": inputs.threshold, "layers": layers,
            "selection": selection,
            "tokens": {"n_tokens": cfg.n_tokens, "seed": cfg.seed,
                       "sample": "seeded per prompt: rng([seed, prompt_id])"},
            "n_sets": len(ids), "per_layer": per_layer,
            "sets": [{**r, "base_text": prompts[r["base_prompt_id"]]["text"]} for r in set_results]}


def is_gpt2_small(model_cfg: ModelConfig) -> bool:
    """True for the model of the paper's margin numbers (GPT-2 Small)."""
    return model_cfg.source in ("openai-community/gpt2", "gpt2") or model_cfg.name == "gpt2"
