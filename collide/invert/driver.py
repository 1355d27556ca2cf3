"""Inversion of a whole SOURCE (``collide invert``): open it, load the model, invert prompt after prompt.

``invert_source(cfg)`` takes a ``collide.config.InvertConfig``. SOURCE and the algorithm:
``collide.invert.sources`` and ``collide.invert.sipit``; outputs: ``collide.invert.output``;
the whole story with measured figures: ``docs/inversion.md``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from collide.config import InvertConfig, ModelConfig
from collide.errors import CollideError
from collide.invert import output
from collide.invert.sources import Source, open_source

log = logging.getLogger(__name__)


def model_config(model: dict, overrides: Optional[list[str]] = None) -> ModelConfig:
    """A validated ModelConfig from a dict (a store's record or a collide/conf/model YAML) and ``key=value`` overrides."""
    base = OmegaConf.merge(OmegaConf.structured(ModelConfig), model)
    if overrides:
        base = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_object(base)


def default_out(source: Source, layer: int, policy: str) -> Path:
    """Beside SOURCE: ``<SOURCE without suffix>-inversion-L<layer>-<policy>``."""
    path = source.path.resolve()
    stem = path.name if path.is_dir() else path.stem
    return path.parent / f"{stem}-inversion-L{layer}-{policy}"


def check(source: Source, lm, layer: Optional[int]) -> int:
    """The layer to invert, after checking SOURCE against the model (one-line errors naming the fix)."""
    if layer is None:
        raise CollideError(f"{source.path} does not say which layer its states come from; pass layer=K "
                           f"(HF hidden_states index, 0..{lm.n_layers} for model {lm.name!r})")
    if not 0 <= layer <= lm.n_layers:
        raise CollideError(f"layer={layer} is out of range for model {lm.name!r} (layers 0..{lm.n_layers}: 0 = "
                           f"embeddings, {lm.n_layers} = last); pass the layer the states were taken at")
    if source.d != lm.d:
        raise CollideError(f"{source.path} holds states of width {source.d} but model {lm.name!r} has d={lm.d}; "
                           "name the model the states came from (model=...)")
    return layer


def header(cfg: InvertConfig, source: Source, lm, layer: int, bos: Optional[int]) -> dict:
    """What identifies an inversion (a resume must match it) and the settings it ran with."""
    from collide.invert.sipit import ATOL, QUANT_RTOL, RTOL, STORAGE_RTOL

    act = (getattr(lm, "quant", None) or {}).get("activations", "none")
    rule = (f"fixed {cfg.epsilon}" if cfg.epsilon is not None else
            f"({RTOL[lm.dtype]:g} [{lm.dtype} compute] + {STORAGE_RTOL.get(source.dtype, 0):.3g} [{source.dtype} "
            f"storage]" + (f" + {QUANT_RTOL[act]:g} [{act} activations]" if act != "none" else "")
            + f") * ||h_t|| + {ATOL:g} * sqrt(d)")
    return {"schema_version": output.SCHEMA_VERSION, "source": str(source.path), "source_kind": source.kind,
            "model": {k: str(v) if hasattr(v, "value") else v for k, v in asdict(cfg.model).items()},
            "layer": layer, "n_layers": lm.n_layers, "final_norm": lm.final_norm, "compute_dtype": lm.dtype,
            "stored_dtype": source.dtype, "bos": bos, "epsilon_rule": rule,
            "policy": {"policy": str(cfg.policy), "batch": cfg.batch, "batch_first": cfg.batch_first,
                       "batch_max": cfg.batch_max, "lr": cfg.lr, "grad_steps": cfg.grad_steps,
                       "snap_every": cfg.snap_every, "seed": cfg.seed, "on_miss": str(cfg.on_miss)}}


def lens_record(inverter) -> Optional[dict]:
    """What the ranking lens and table were fit on, and where the bundle lives (None without one)."""
    lens = inverter.lens
    if lens is None:
        return None
    return {**lens.info, "path": None if lens.path is None else str(lens.path),
            "weights": lens.identity["model"]["weights"]}


def first_token(cfg: InvertConfig, tokenizer) -> Optional[int]:
    """The BOS the tokenizer prepends (verified, not searched, at position 0), or None."""
    if cfg.bos is False:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    prepends = bos is not None and tokenizer("a").input_ids[:1] == [bos]
    if cfg.bos and bos is None:
        raise CollideError("bos=true but the tokenizer has no BOS token; drop bos=true")
    return bos if (prepends or cfg.bos) else None


def invert_source(cfg: InvertConfig, command: Optional[str] = None) -> dict:
    """Invert every prompt of ``cfg.source``; returns the ``inversion.json`` object (also written to ``out``)."""
    import torch

    from collide.invert.sipit import Inverter
    from collide.models import load_model

    source = open_source(cfg.source, cfg.layer)
    if cfg.model is None:
        if source.model is None:
            raise CollideError(f"{source.path} does not record its model; name the model the states came from with "
                               "model=<name> (see collide/conf/model/), and its norm convention with model.final_norm=pre|post")
        cfg.model = model_config(source.model)
    if cfg.batch < 1:
        raise CollideError(f"batch={cfg.batch} must be at least 1")
    lm = load_model(cfg.model)
    layer = check(source, lm, cfg.layer if cfg.layer is not None else source.layer)
    bos = first_token(cfg, lm.tokenizer)
    out = Path(cfg.out) if cfg.out else default_out(source, layer, str(cfg.policy))
    out.mkdir(parents=True, exist_ok=True)
    inverter = Inverter(lm, layer, cfg, stored_dtype=source.dtype, epsilon=cfg.epsilon, bos=bos)
    head = {**header(cfg, source, lm, layer, bos), "lens": lens_record(inverter), "command": command}
    done = output.load_previous(out, {k: v for k, v in head.items() if k != "command"})
    n_total = source.n_prompts if cfg.n_prompts is None else min(cfg.n_prompts, source.n_prompts)
    if done:
        log.info("resuming: %d of %d prompts already inverted in %s", len(done), n_total, out)
    prompts = list(done)
    doc = output.write(out, head, prompts, n_total, inverter.n_distinct)

    def progress(res) -> None:
        if cfg.progress:
            log.info("  position %d: token %d %s d=%.3g eps=%.3g tried %d (%.2f s)", res.position, res.token,
                     "ok" if res.recovered else "NOT RECOVERED", res.distance, res.epsilon, res.tried, res.seconds)

    with torch.inference_mode(False):
        for index, target in enumerate(source.targets()):
            if index >= n_total:
                break
            if index < len(done):
                if done[index]["key"] != target.key:
                    raise CollideError(f"{out / output.JSON_NAME} lists prompt {done[index]['key']!r} where SOURCE "
                                       f"has {target.key!r}; pass another out=DIR or delete {out}")
                continue
            t0 = time.perf_counter()
            results = inverter.invert(target.states, stop_on_miss=cfg.on_miss == "stop", progress=progress)
            prompts.append(output.prompt_record(target.key, results, lm.tokenizer, len(target.states),
                                                target.true_ids, target.text))
            doc = output.write(out, head, prompts, n_total, inverter.n_distinct)
            log.info("prompt %s: %d positions in %.1f s, %s", target.key, len(target.states),
                     time.perf_counter() - t0, prompts[-1].get("exact", "complete" if prompts[-1]["complete"]
                                                               else "incomplete"))
    log.info("%s -> %s", output.outcome_text(doc), out)
    return doc

