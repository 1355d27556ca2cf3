"""The ``collide run`` pipeline: corpus -> model -> store -> certified search -> report.

``run_pipeline(cfg, run_dir, command)`` takes a composed ``CollideConfig``. The store is found by
its content (``collide.store.identity``): a complete store that serves the run is searched again
without loading the model; otherwise the model is loaded and the store extracted, or resumed after
its last complete shard. The run directory receives ``report.json``, ``report.md``, ``collisions/``,
``figures/`` and ``store.json``, the record of the store it used. ``cluster.kind=ray`` runs the
extraction and the search on a Ray cluster (``collide.cluster``) with the same results; the driver
then holds only the model's tokenizer and shape (``collide.cluster.shell``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from collide.atomic import atomic_write_json
from collide.config import CollideConfig
from collide.errors import CollideError
from collide.layers import parse_layers
from collide.quant import as_dict as quant_dict, describe as describe_quant, noise_record
from collide.store.identity import identity_hash, serving_store, store_identity, store_location

log = logging.getLogger(__name__)


def validate(cfg: CollideConfig) -> None:
    """Checks that need no model, so that bad values fail before anything is loaded."""
    if cfg.n_prompts < 2:
        raise CollideError(f"n_prompts={cfg.n_prompts}: at least 2 prompts are needed to form a pair")
    if not cfg.threshold > 0:
        raise CollideError(f"threshold={cfg.threshold}: must be a positive L2 distance, e.g. threshold=1e-6")
    if cfg.store.shard_rows < 1 or cfg.search.block_rows < 1:
        raise CollideError("store.shard_rows and search.block_rows must be >= 1")


def extract(cfg: CollideConfig, identity: dict, location: Path, timings: dict):
    """Load the model and extract (or resume) the store at ``location``; returns (store, layers)."""
    from collide.corpus import check_corpus, iter_prompts
    from collide.models import load_model

    check_corpus(cfg.corpus)  # a bad corpus file fails before the model loads and the store is created
    tic = time.perf_counter()
    log.info("loading model %s (%s)", cfg.model.name, cfg.model.source)
    if cfg.cluster.kind == "ray":  # the driver tokenizes and writes the manifest; the Ray workers hold the weights
        from collide.cluster.shell import model_shell

        lm = model_shell(cfg.model)
    else:
        lm = load_model(cfg.model)
    layers = parse_layers(cfg.layers, lm.n_layers)
    timings["load_model"] = time.perf_counter() - tic
    log.info("model loaded in %.1f s: L=%d blocks, d=%d, layers %s", timings["load_model"], lm.n_layers, lm.d,
             layers if len(layers) < 8 else f"{layers[0]}..{layers[-1]} ({len(layers)})")
    tic = time.perf_counter()
    args = (lm, iter_prompts(cfg.corpus, lm.tokenizer), layers, location, cfg.n_prompts, identity, cfg.store,
            cfg.extract)
    if cfg.cluster.kind == "ray":
        from collide.cluster import extract_to_store_ray

        store = extract_to_store_ray(*args, cfg.cluster)
    else:
        from collide.extract import extract_to_store

        store = extract_to_store(*args)
    timings["extract"] = time.perf_counter() - tic
    return store, layers


def search(store, layers: list[int], cfg: CollideConfig) -> list:
    """The certified search of every layer (collide.search.search_store, or on Ray with cluster=ray)."""
    from collide.search import search_store

    results = []
    for layer in layers:
        if cfg.cluster.kind == "ray":
            from collide.cluster import search_store_ray

            results.append(search_store_ray(store, layer, cfg.threshold, cfg.search, cfg.cluster))
        else:
            results.append(search_store(store, layer, cfg.threshold, cfg.search))
        res = results[-1].result
        log.info("layer %d: min distance %.6g (%s), %d collisions, %.1f s", layer, res.distance,
                 "certified" if res.certified else "NOT certified", res.n_collisions, res.seconds)
    return results


def run_pipeline(cfg: CollideConfig, run_dir: Path, command: str) -> dict:
    """The whole pipeline on a composed config, into ``run_dir``; returns the report dict (also in
    ``run_dir/report.json``)."""
    from collide.report import write_report

    validate(cfg)
    timings: dict[str, float] = {"load_model": 0.0, "extract": 0.0}
    identity = store_identity(cfg)
    location = store_location(cfg, identity)
    served = serving_store(cfg, identity, location)
    if served is not None:
        store, layers, how = served
        log.info("store %s is complete (%s: %d prompts, layers %s): searching it without loading the model",
                 store.path, how, store.n_rows, layers if len(layers) < 8 else f"{layers[0]}..{layers[-1]}")
    else:
        store, layers = extract(cfg, identity, location, timings)
        how = "exact"
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "store.json", {
        "path": str(store.path.resolve()), "identity_hash": identity_hash(store.manifest["identity"]),
        "served": how, "n_prompts": store.n_rows, "layers": layers})

    tic = time.perf_counter()
    results = search(store, layers, cfg)
    timings["search"] = time.perf_counter() - tic
    model_info = {**{k: getattr(cfg.model, k) for k in ("name", "source", "revision", "family", "dtype",
                                                         "final_norm")},
                  "n_layers": store.manifest["n_layers"], "d": store.d,
                  "quant": {**quant_dict(cfg.model.quant), "description": describe_quant(cfg.model.quant)},
                  **noise_record(cfg.model, store.manifest["n_layers"])}  # model.noise: "noise", "noise_scale"
    counts = store.manifest["counts"]
    run_info = {"model": model_info, "corpus": asdict(cfg.corpus), "n_prompts": store.n_rows,
                # duplicates met before the first N distinct prompts: known only for the store's own N
                "n_duplicates": counts["n_duplicates"] if store.n_rows == counts["n_prompts"] else None,
                "threshold": cfg.threshold, "layers": layers, "timings": timings, "store": str(store.path.resolve()),
                "command": command}
    report = write_report(run_dir, json.loads(json.dumps(run_info)), results, store, cfg.report)
    log.info("report written to %s", run_dir / "report.md")
    return report
