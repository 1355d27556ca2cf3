"""Store identity: what determines a store's states, and so where it lives and which store serves a run.

A store lives at ``<store.root>/<model>-<corpus>-n<N>-<hash>/``, the hash covering everything
that determines its states (``store_identity``), so runs that differ only in search or report
settings share one store, and a rerun resumes an interrupted one. A complete store that holds more
prompts (the same deterministic stream) or more layers serves a run that asks for a subset
(``serving_store``), without loading the model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from collide.errors import CollideError
from collide.layers import canonical_spec, parse_layers
from collide.quant import is_default, noise_record
from collide.store.layout import MANIFEST, read_manifest
from collide.store.quantized import BITS as QUANTIZED
from collide.store.reader import open_store

# Keys of the model config that say where or how it runs, not what it computes: left out of a store's identity.
RUNTIME_MODEL_KEYS = ("device", "device_map")


def store_identity(cfg) -> dict:
    """What determines a store's states (and so its location): a resumed store must match every key.

    Model: name, source, revision, family, GGUF file, compute dtype, final-norm convention, seed
    (random models), trust_remote_code, the quantized forward (``model.quant``, only when it
    quantizes something) and the added noise (``model.noise`` and ``noise_scale``, only when it is
    not none); not its device or device map. Corpus: every key but its
    name. Then n_prompts, the layer spec as given (resolved layers are in the manifest), positions,
    the storage dtype (auto resolved to the compute dtype) with, for int8 / int4, its scale
    granularity (``quant_granularity``), and keep_text and shard_rows (shard boundaries fix which
    prompts share a forward batch, so a resume stays bit-identical).
    """
    if noise_record(cfg.model) and cfg.store.positions != "last":  # the settings checked before a model loads
        raise CollideError(f"model.noise adds noise to last-token states only, not store.positions="
                           f"{cfg.store.positions}; set store.positions=last (or model.noise=none)")
    model = {k: v for k, v in asdict(cfg.model).items() if k not in RUNTIME_MODEL_KEYS}
    if is_default(model.get("quant")):
        model.pop("quant", None)  # the unquantized model: its stores keep the identity they had before quant
    if model.get("noise", "none") == "none":  # likewise without noise
        model.pop("noise", None)
        model.pop("noise_scale", None)
    corpus = {k: v for k, v in asdict(cfg.corpus).items() if k != "name"}
    stored = cfg.model.dtype if cfg.store.dtype == "auto" else cfg.store.dtype
    storage = {"dtype": stored}
    if stored in QUANTIZED:  # the stored values depend on which values share a scale
        storage["quant_granularity"] = cfg.store.quant_granularity
    return json.loads(json.dumps({
        "model": model, "corpus": corpus, "n_prompts": cfg.n_prompts, "layers": canonical_spec(cfg.layers),
        "positions": cfg.store.positions, **storage, "keep_text": cfg.store.keep_text,
        "shard_rows": cfg.store.shard_rows}))


def identity_hash(identity: dict) -> str:
    """12 hex digits of the sha256 of the identity's canonical JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def store_location(cfg, identity: dict) -> Path:
    """``store.path`` when set, else ``<store.root>/<model>-<corpus>-n<N>-<hash>``."""
    if cfg.store.path:
        return Path(cfg.store.path)
    return Path(cfg.store.root) / f"{cfg.model.name}-{cfg.corpus.name}-n{cfg.n_prompts}-{identity_hash(identity)}"


def serves(manifest: dict, identity: dict, cfg) -> list[int] | None:
    """The layers a complete store's manifest would give this run, or None if it cannot serve it.

    A store serves when its identity equals this run's in every key but ``n_prompts`` (it holds at
    least as many: its first N prompts are the first N distinct prompts of the same deterministic
    stream) and ``layers`` (it holds every layer asked for: the same forward passes computed them).
    A ``quant_granularity=tensor`` store serves fewer prompts only as whole shards.
    """
    stored = manifest.get("identity", {})
    if manifest.get("status") != "complete" or set(stored) != set(identity):
        return None
    if any(stored[k] != identity[k] for k in identity if k not in ("n_prompts", "layers")):
        return None
    rows = int(manifest["counts"]["n_prompts"])
    if rows < cfg.n_prompts:
        return None
    if identity.get("quant_granularity") == "tensor" and cfg.n_prompts != rows and cfg.n_prompts % cfg.store.shard_rows:
        return None  # one scale per shard file: the first N prompts of a larger store end inside a shard of other scale
    try:
        layers = parse_layers(cfg.layers, int(manifest["n_layers"]))
    except CollideError:
        return None
    return layers if set(layers) <= {int(k) for k in manifest["layers"]} else None


def serving_store(cfg, identity: dict, location: Path):
    """(store, layers, how) for a complete store that serves this run without the model, else None.

    ``how`` is "exact" (the store at ``location``) or "subset" (a larger store under store.root).
    """
    candidates = [location] + ([] if cfg.store.path else sorted(p for p in Path(cfg.store.root).glob("*")
                                                                 if p != location))
    for path in candidates:
        if not (path / MANIFEST).is_file():
            continue
        try:
            manifest = read_manifest(path)
        except CollideError:
            continue  # a damaged store is reported where it is extracted into, not here
        layers = serves(manifest, identity, cfg)
        if layers is None:
            continue
        store = open_store(path)
        if store.n_rows == cfg.n_prompts:
            return store, layers, "exact" if path == location else "subset"
        return store.select(cfg.n_prompts), layers, "subset"
    return None
