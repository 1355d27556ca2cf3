"""The extraction stage on Ray: ``extract_to_store_ray`` makes the store ``extract_to_store`` makes.

Who does what:

- **The driver** (this process) holds the store's writer lock and the prompt stream. It cuts the
  stream into shard specs exactly as a local run does (``DistinctPrompts``: the same dedup, the
  same shard boundaries, the same stream facts per shard), hands them to the workers, and lists
  each finished shard in the manifest (``StoreWriter.record_shard``), exactly once and in order:
  a shard that finishes early waits in memory (its manifest entry only) for the ones before it.
- **The workers** are the run's warm Ray actors (``collide.cluster.pool``), one per GPU (or per
  ``cluster.cpus_per_worker`` CPUs), each loading the model once (``identity["model"]``, the config
  that names the store) and keeping it for the stages after extraction; the driver holds only the
  tokenizer and the model's shape (``collide.cluster.shell``). A worker computes a whole shard with
  the local code (``forward_shard_adaptive``: the same batch plan, hence on CPU bitwise the same
  states) and writes its files to the shared store itself,
  through the store's own atomic write and sha256 (``StoreWriter.commit_shard`` without the
  manifest half), so states never travel through the driver or the object store.

Why actors and not Ray Data's ``map_batches``: a shard is the unit of atomic writing, of resume
and of the batch plan that makes states bitwise reproducible; it must be computed whole, in one
process, from a spec the driver fixes. Actors keep the model loaded across shards and let the
driver own the order of the manifest; Ray Data would re-block the stream and stream the states
back through the object store, for nothing this stage needs.

Faults: a worker that dies mid-shard (its process, or its node) is restarted, on another node if
need be, with the model reloaded, and its shards are retried; each worker may be restarted
``cluster.max_retries`` times. A retried shard rewrites the same files with the same bytes under the
same names (atomic renames, nothing appended), and the driver lists it once. When the retries
run out, or the driver dies, the shards already listed stay; rerunning the same command resumes
after them (files a dead run left unlisted are removed, as locally).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Iterable

from collide.cluster.pool import Unit, worker_pool
from collide.cluster.session import chaos_point, ray_session, remote_options
from collide.config import ClusterConfig, ExtractConfig, ModelConfig, StoreConfig
from collide.corpus import Prompt
from collide.errors import CollideError
from collide.extract import (DistinctPrompts, auto_batch_tokens, finish_store, forward_shard_adaptive, skip_committed,
                             store_header)
from collide.models import LoadedModel
from collide.store import Store, StoreWriter, open_store, prompt_table
from collide.console import progress

log = logging.getLogger(__name__)


class _ShardFiles(StoreWriter):
    """``commit_shard`` on a worker: writes one shard's files (atomic, sha256 from disk) and returns its
    manifest entry; ``record_shard``, the manifest half, is left to the driver."""

    def record_shard(self, shard: dict, write_s: float = 0.0) -> dict:
        return dict(shard, write_s=write_s)


def write_shard_files(store_dir: str, facts: dict, index: int, first: int, table, states: dict, info: dict,
                      positions: dict | None = None) -> dict:
    """On a worker: write shard ``index`` (prompt ids from ``first``) of the store whose manifest facts (all but
    its shards and counts) are ``facts``; returns its manifest entry plus ``write_s``."""
    snapshot = dict(facts, shards=[{}] * index, counts=dict(n_prompts=first))
    return _ShardFiles(Path(store_dir), snapshot).commit_shard(table, states, info, positions)


def store_facts(writer: StoreWriter) -> dict:
    """What a worker needs to write a shard of ``writer``'s store: its manifest without the shard list."""
    return {k: v for k, v in writer.manifest.items() if k not in ("shards", "counts")}


def batch_budget(worker, model_cfg: ModelConfig, longest: int, n_layers: int, every_position: bool) -> int:
    """Unit: the automatic token budget on this worker's device (``auto_batch_tokens``)."""
    return auto_batch_tokens(worker.model(model_cfg), longest, n_layers, every_position)


def extract_shard(worker, model_cfg: ModelConfig, store_dir: str, facts: dict, spec: dict, budget: int,
                  max_batch: int) -> dict:
    """Unit: forward shard ``spec["index"]`` with the local code and write its files; returns its manifest entry
    (+ write_s). One forward at a time per worker; the files are written outside the lock."""
    lm = worker.model(model_cfg)
    seqs = spec["tokens"]
    with worker.compute:
        t0 = time.perf_counter()
        states, positions, wait, budget = forward_shard_adaptive(
            lm, seqs, facts["layers"], budget, max_batch, None, facts["dtype"], facts["positions"] == "all")
        wait()
        info = dict(spec["info"], batch_tokens=budget, forward_s=round(time.perf_counter() - t0, 6))
    table = prompt_table(spec["first"], seqs, spec["sources"], spec["texts"])
    chaos_point(f"shard-{spec['index']}")
    return write_shard_files(store_dir, facts, spec["index"], spec["first"], table, states, info, positions)


def _specs(stream: DistinctPrompts, index: int, first: int, n_prompts: int, shard_rows: int, keep_text: bool):
    """Shard specs (index, first prompt id, token ids, sources, texts, stream facts) as a local run cuts them."""
    while first < n_prompts:
        wanted = min(shard_rows, n_prompts - first)
        shard = list(itertools.islice(stream, wanted))
        if not shard:
            return
        yield dict(index=index, first=first, tokens=[tokens for _, tokens, _ in shard],
                   sources=[p.source for p, _, _ in shard], texts=[p.text for p, _, _ in shard] if keep_text else None,
                   info=dict(stream_items=stream.n_items, n_duplicates=stream.n_duplicates,
                             tokens_sha256=hashlib.sha256(b"".join(key for _, _, key in shard)).hexdigest()))
        index, first = index + 1, first + len(shard)
        if len(shard) < wanted:
            return


def extract_to_store_ray(lm: LoadedModel, prompts: Iterable[Prompt], layers: list[int], store_dir, n_prompts: int,
                         identity: dict, store_cfg: StoreConfig, extract_cfg: ExtractConfig,
                         cluster_cfg: ClusterConfig, model_cfg: ModelConfig | None = None) -> Store:
    """``collide.extract.extract_to_store`` with the forward passes on Ray workers (module docstring).

    ``lm`` is the driver's copy, which never runs: its tokenizer made ``prompts`` and its facts head the
    manifest, so ``collide.cluster.shell.model_shell`` (no weights) serves. The workers load ``model_cfg``, by
    default ``ModelConfig(**identity["model"])``. ``store_dir`` must be on storage every Ray node mounts at the
    same path (checked before any work). The workers stay up for the stages after this one
    (``collide.cluster.pool``).
    """
    t_start = time.perf_counter()
    layers = sorted({int(k) for k in layers})
    if not layers or layers[0] < 0 or layers[-1] > lm.n_layers:
        raise CollideError(f"layers={layers} is out of range: {lm.name} has layers 0..{lm.n_layers}")
    if n_prompts < 1 or store_cfg.shard_rows < 1 or extract_cfg.max_batch_size < 1 or extract_cfg.batch_tokens < 0:
        raise CollideError(f"n_prompts={n_prompts}, store.shard_rows={store_cfg.shard_rows} and extract.max_batch_size="
                           f"{extract_cfg.max_batch_size} must be >= 1, extract.batch_tokens="
                           f"{extract_cfg.batch_tokens} >= 0 (0 = automatic)")
    if model_cfg is None:
        if not isinstance(identity.get("model"), dict):
            raise CollideError("the store identity has no model config for the Ray workers to load; pass model_cfg")
        model_cfg = ModelConfig(**identity["model"])
    remote_options(cluster_cfg)  # bad cluster values fail before the store is created
    writer = StoreWriter.open(store_dir, identity, store_header(lm, layers, n_prompts, store_cfg, extract_cfg))
    with contextlib.closing(writer), ray_session(cluster_cfg, store_dir):
        if writer.complete:
            log.info("store %s is complete already (%d prompts); nothing to extract", store_dir, writer.n_rows)
            return open_store(store_dir)
        stream = DistinctPrompts(prompts)
        skip_committed(stream, writer.shards, store_dir)
        start_id = writer.n_rows
        specs = _specs(stream, len(writer.shards), start_id, n_prompts, writer.batching("shard_rows"),
                       writer.manifest["keep_text"])
        pool = worker_pool(cluster_cfg)
        bar = progress(total=n_prompts, initial=start_id, unit="prompt", desc="extract (ray)",
                       disable=not extract_cfg.progress)
        try:
            first_id = _run(writer, pool, model_cfg, specs, str(Path(store_dir).resolve()), len(layers), bar)
        finally:
            bar.close()
        seconds = time.perf_counter() - t_start
        store = finish_store(writer, first_id, n_prompts, store_dir, seconds)
        log.info("extracted %d prompts into %s on %d Ray workers (%d this run) in %.1f s: %.1f prompts/s",
                 store.n_rows, os.fspath(store_dir), pool.size, first_id - start_id, seconds,
                 (first_id - start_id) / max(seconds, 1e-9))
        return store


def _run(writer: StoreWriter, pool, model_cfg: ModelConfig, specs, store_dir: str, n_layers: int, bar) -> int:
    """Send the specs to the workers, list finished shards in order; returns the next prompt id.

    A shard that finishes before those ahead of it waits (its manifest entry only) until they are listed."""
    facts = store_facts(writer)
    budget, max_batch = writer.batching("batch_tokens"), writer.batching("max_batch_size")
    first = next(specs, None)
    if first is None:
        return writer.n_rows
    if budget is None:
        budget = pool.first(batch_budget, model_cfg, max(len(s) for s in first["tokens"]), n_layers,
                            facts["positions"] == "all", what="loading the model on a Ray worker")
    units = (Unit(spec["index"], extract_shard, (model_cfg, store_dir, facts, spec, budget, max_batch),
                  f"extraction of shard {spec['index']} of {store_dir}") for spec in itertools.chain([first], specs))
    finished: dict[int, dict] = {}  # shard index -> entry, waiting for the shards before it
    for index, entry in pool.run(units):
        finished[index] = entry
        while len(writer.shards) in finished:
            entry = finished.pop(len(writer.shards))
            write_s = entry.pop("write_s")
            writer.record_shard(entry, write_s)
            bar.update(entry["rows"])
    return writer.n_rows
