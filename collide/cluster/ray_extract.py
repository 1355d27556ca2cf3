"""The extraction stage on Ray: ``extract_to_store_ray`` makes the store ``extract_to_store`` makes.

Who does what:

- **The driver** (this process) holds the store's writer lock and the prompt stream. It cuts the
  stream into shard specs exactly as a local run does (``DistinctPrompts``: the same dedup, the
  same shard boundaries, the same stream facts per shard), hands them to the workers, and lists
  each finished shard in the manifest (``StoreWriter.record_shard``), exactly once and in order:
  a shard that finishes early waits in memory (its manifest entry only) for the ones before it.
- **The workers** are Ray actors, one per GPU (or per ``cluster.cpus_per_worker`` CPUs), each
  holding the model (loaded from ``identity["model"]``, the config that names the store). A
  worker computes a whole shard with the local code (``forward_shard_adaptive``: the same batch
  plan, hence on CPU bitwise the same states) and writes its files to the shared store itself,
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
import threading
import time
from pathlib import Path
from typing import Iterable

import ray

from collide.cluster.session import chaos_point, ray_session, remote_options, task_failed
from collide.config import ClusterConfig, ExtractConfig, ModelConfig, StoreConfig
from collide.corpus import Prompt
from collide.errors import CollideError
from collide.extract import (DistinctPrompts, auto_batch_tokens, finish_store, forward_shard_adaptive, skip_committed,
                             store_header)
from collide.models import LoadedModel, load_model
from collide.store import Store, StoreWriter, open_store, prompt_table
from collide.console import progress

log = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2  # shards given to a worker at once: one in its forward passes, one being written
STORE_FACTS = ("layers", "d", "dtype", "positions", "keep_text")  # what a worker needs to write a shard


class _ShardFiles(StoreWriter):
    """``commit_shard`` on a worker: writes one shard's files (atomic, sha256 from disk) and returns its
    manifest entry; ``record_shard``, the manifest half, is left to the driver."""

    def record_shard(self, shard: dict, write_s: float = 0.0) -> dict:
        return dict(shard, write_s=write_s)


@ray.remote(max_concurrency=IN_FLIGHT_PER_WORKER)
class ExtractWorker:
    """A Ray actor holding the model; computes and writes whole shards.

    Two calls run at once, as the local writer thread does: one shard's files are written while
    the next shard's forward passes run (one forward at a time: ``_forward`` is a lock).
    """

    def __init__(self, model_cfg: ModelConfig):
        self.lm = load_model(model_cfg)
        self._forward = threading.Lock()

    def budget(self, longest: int, n_layers: int) -> int:
        """The automatic token budget on this worker's device (``auto_batch_tokens``)."""
        return auto_batch_tokens(self.lm, longest, n_layers)

    def shard(self, store_dir: str, facts: dict, spec: dict, budget: int, max_batch: int) -> dict:
        """Forward shard ``spec["index"]`` and write its files; returns its manifest entry (+ write_s)."""
        seqs = spec["tokens"]
        with self._forward:
            t0 = time.perf_counter()
            states, positions, wait, budget = forward_shard_adaptive(
                self.lm, seqs, facts["layers"], budget, max_batch, None, facts["dtype"], facts["positions"] == "all")
            wait()
            info = dict(spec["info"], batch_tokens=budget, forward_s=round(time.perf_counter() - t0, 6))
        table = prompt_table(spec["first"], seqs, spec["sources"], spec["texts"])
        chaos_point(f"shard-{spec['index']}")
        snapshot = dict(facts, shards=[{}] * spec["index"], counts=dict(n_prompts=spec["first"]))
        return _ShardFiles(Path(store_dir), snapshot).commit_shard(table, states, info, positions)


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

    ``lm`` is the driver's copy (its tokenizer made ``prompts``; its facts head the manifest); the
    workers load ``model_cfg``, by default ``ModelConfig(**identity["model"])``. ``store_dir``
    must be on storage every Ray node mounts at the same path (checked before any work).
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
    opts = remote_options(cluster_cfg, retries=False)
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
        facts = {key: writer.manifest[key] for key in STORE_FACTS}
        workers = [ExtractWorker.options(**opts).remote(model_cfg) for _ in range(cluster_cfg.num_workers)]
        bar = progress(total=n_prompts, initial=start_id, unit="prompt", desc="extract (ray)",
                   disable=not extract_cfg.progress)
        try:
            first_id = _run(writer, workers, specs, facts, str(Path(store_dir).resolve()), len(layers), bar,
                            cluster_cfg.max_retries)
        finally:
            bar.close()
            for worker in workers:
                ray.kill(worker)
        seconds = time.perf_counter() - t_start
        store = finish_store(writer, first_id, n_prompts, store_dir, seconds)
        log.info("extracted %d prompts into %s on %d Ray workers (%d this run) in %.1f s: %.1f prompts/s",
                 store.n_rows, os.fspath(store_dir), len(workers), first_id - start_id, seconds,
                 (first_id - start_id) / max(seconds, 1e-9))
        return store


def _run(writer: StoreWriter, workers: list, specs, facts: dict, store_dir: str, n_layers: int, bar,
         max_retries: int) -> int:
    """Dispatch the specs to the workers, list finished shards in order; returns the next prompt id."""
    budget, max_batch = writer.batching("batch_tokens"), writer.batching("max_batch_size")
    first = next(specs, None)
    if first is None:
        return writer.n_rows
    if budget is None:
        try:
            budget = ray.get(workers[0].budget.remote(max(len(s) for s in first["tokens"]), n_layers))
        except Exception as exc:  # noqa: BLE001 - Ray wraps every remote failure
            raise task_failed(exc, "loading the model on a Ray worker", max_retries) from None
    pending = itertools.chain([first], specs)
    in_flight: dict = {}  # ref -> (worker slot, shard index)
    load = [0] * len(workers)
    finished: dict[int, dict] = {}  # shard index -> entry, waiting for the shards before it
    while True:
        for spec in itertools.islice(pending, IN_FLIGHT_PER_WORKER * len(workers) - len(in_flight)):
            slot = load.index(min(load))
            load[slot] += 1
            ref = workers[slot].shard.remote(store_dir, facts, spec, budget, max_batch)
            in_flight[ref] = (slot, spec["index"])
        if not in_flight:
            return writer.n_rows
        done, _ = ray.wait(list(in_flight), num_returns=1)
        slot, index = in_flight.pop(done[0])
        load[slot] -= 1
        try:
            finished[index] = ray.get(done[0])
        except Exception as exc:  # noqa: BLE001 - Ray wraps every remote failure
            raise task_failed(exc, f"extraction of shard {index} of {store_dir}", max_retries) from None
        while len(writer.shards) in finished:
            entry = finished.pop(len(writer.shards))
            write_s = entry.pop("write_s")
            writer.record_shard(entry, write_s)
            bar.update(entry["rows"])
