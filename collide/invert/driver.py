"""Inversion of a whole SOURCE (``collide invert``): check it, load the model, find the layer, invert prompt after prompt.

``invert_source(cfg)`` takes a ``collide.invert.config.InvertConfig``. Everything that needs no model is checked
first (``plan``: SOURCE's every prompt read and checked for shape, dtype and NaN/Inf, ``n_prompts``, ``out``,
the model named), so a bad input is one line before the model loads. Then ``open_model`` loads the model
and finds the layer and norm convention of a file from its first rows (``collide.invert.locate``), and
``invert_prompts`` inverts (``collide.audit`` calls these two for each layer it audits). SOURCE and the
algorithm: ``collide.invert.sources``, ``collide.invert.sipit`` and ``collide.invert.context``; outputs:
``collide.invert.output``; the whole story with measured figures: ``docs/inversion.md``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
from omegaconf import OmegaConf

from collide.config import ModelConfig
from collide.invert.config import InvertConfig
from collide.errors import CollideError
from collide.invert import output
from collide.invert.sipit import epsilon_choice
from collide.invert.sources import Source, open_source

log = logging.getLogger(__name__)

# header entries that are measurements (the lens fit or read and the noise measure: setup_seconds), not settings
MEASURED = ("command", "noise", "location", "setup_seconds")


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


def check_out(out: Path, key: str = "out") -> Path:
    """``out`` may be a directory or absent; anything else is one line naming it."""
    if out.exists() and not out.is_dir():
        raise CollideError(f"{key}={out} is an existing file, not a directory; pass {key}=DIR (a new or an earlier "
                           "output directory), or move that file away")
    return out


def layer_choice(value) -> Optional[int]:
    """``layer=``: None or auto -> None (found), an integer -> itself; anything else is one line."""
    if value is None or str(value) == "auto":
        return None
    try:
        return int(str(value))
    except ValueError:
        raise CollideError(f"layer={value!r} is not a layer; pass layer=K (HF hidden_states index) or layer=auto"
                           ) from None


@dataclass
class Plan:
    """What ``invert_source`` checked before loading anything."""

    source: Source
    indices: list[int]  # prompts of SOURCE to invert, in SOURCE order
    rows: np.ndarray  # (n, 1 or 2, d): the first rows of the first prompts (to find the layer, measure the noise)
    model: ModelConfig  # the model to load (final_norm may be auto)
    layer: Optional[int]  # the layer asked for (None = the store's, or found)


def plan(cfg: InvertConfig, source: Optional[Source] = None, indices: Optional[list[int]] = None) -> Plan:
    """Open and check SOURCE and the settings; no model is loaded (one-line CollideErrors naming the fix)."""
    layer = layer_choice(cfg.layer)
    epsilon_choice(cfg.epsilon)
    for key in ("batch", "batch_first"):
        if getattr(cfg, key) < 1:
            raise CollideError(f"{key}={getattr(cfg, key)} must be at least 1")
    if cfg.n_prompts is not None and cfg.n_prompts < 1:
        raise CollideError(f"n_prompts={cfg.n_prompts} inverts nothing; pass n_prompts=N with N >= 1, or leave it "
                           "out to invert every prompt")
    if cfg.out:
        check_out(Path(cfg.out))
    source = source or open_source(cfg.source, layer)
    if indices is None:
        indices = list(range(source.n_prompts if cfg.n_prompts is None else min(cfg.n_prompts, source.n_prompts)))
    rows = source.check(indices)
    model = cfg.model
    if model is None:
        if source.model is None:
            raise CollideError(f"{source.path} does not record its model; name the model the states came from with "
                               "model=<name> (see collide/conf/model/), and its norm convention with "
                               "model.final_norm=pre|post|auto")
        model = model_config(source.model)
    return Plan(source, indices, rows, model, layer)


def first_token(cfg, tokenizer) -> Optional[int]:
    """The BOS the tokenizer prepends (verified, not searched, at position 0), or None."""
    if cfg.bos is False:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    prepends = bos is not None and tokenizer("a").input_ids[:1] == [bos]
    if cfg.bos and bos is None:
        raise CollideError("bos=true but the tokenizer has no BOS token; drop bos=true")
    return bos if (prepends or cfg.bos) else None


def load(model: ModelConfig):
    """The model, loaded as ``post`` when its norm convention is still to be found (auto)."""
    from collide.models import load_model

    return load_model(replace(model, final_norm="post") if str(model.final_norm) == "auto" else model)


def place(p: Plan, lm, bos: Optional[int]) -> tuple[int, Optional[dict]]:
    """(layer, location record or None): the layer of the states, checked against the model; a file's layer and
    an auto norm convention are found from its first rows (``collide.invert.locate``), ``lm.final_norm`` set."""
    from collide.invert.locate import locate

    if p.source.d != lm.d:
        raise CollideError(f"{p.source.path} holds states of width {p.source.d} but model {lm.name!r} has "
                           f"d={lm.d}; name the model the states came from (model=...)")
    layer = p.layer if p.layer is not None else p.source.layer
    auto_norm = str(p.model.final_norm) == "auto"
    if layer is not None and not 0 <= layer <= lm.n_layers:
        raise CollideError(f"layer={layer} is out of range for model {lm.name!r} (layers 0..{lm.n_layers}: 0 = "
                           f"embeddings, {lm.n_layers} = last); pass the layer the states were taken at")
    if layer is not None and not (auto_norm and layer == lm.n_layers):
        return layer, None
    found = locate(lm, p.rows, bos, layer, None if auto_norm else lm.final_norm)
    lm.final_norm = found.final_norm
    return found.layer, found.as_dict()


def header(cfg: InvertConfig, source: Source, lm, layer: int, bos: Optional[int], noise: Optional[dict]) -> dict:
    """What identifies an inversion (a resume must match it) and the settings it ran with."""
    from collide.invert.sipit import ATOL, NOISE_FACTOR, QUANT_RTOL, RTOL, STORAGE_RTOL

    act = (getattr(lm, "quant", None) or {}).get("activations", "none")
    mode, fixed = epsilon_choice(cfg.epsilon)
    base = f"{RTOL[lm.dtype]:g} [{lm.dtype} compute] + {STORAGE_RTOL.get(source.dtype, 0):.3g} [{source.dtype} storage]"
    if mode == "auto" and act == "none" and noise and noise.get("relative") is not None:
        base = f"max({base}, {NOISE_FACTOR:g} x {noise['relative']:.3g} [measured])"
    rule = (f"fixed {fixed}" if mode == "fixed" else f"({base}" + (f" + {QUANT_RTOL[act]:g} [{act} activations]"
                                                                    if act != "none" else "")
            + f") * ||h_t|| + {ATOL:g} * sqrt(d)")
    model = {k: str(v) if hasattr(v, "value") else v for k, v in asdict(cfg.model).items()}
    model["final_norm"] = lm.final_norm
    return {"schema_version": output.SCHEMA_VERSION, "source": str(source.path), "source_kind": source.kind,
            "model": model, "layer": layer, "n_layers": lm.n_layers, "final_norm": lm.final_norm,
            "compute_dtype": lm.dtype, "stored_dtype": source.dtype, "bos": bos, "epsilon_rule": rule,
            "policy": {"policy": str(cfg.policy), "batch": cfg.batch, "batch_first": cfg.batch_first,
                       "batch_max": cfg.batch_max, "lr": cfg.lr, "grad_steps": cfg.grad_steps,
                       "snap_every": cfg.snap_every, "seed": cfg.seed, "on_miss": str(cfg.on_miss),
                       "confirm": cfg.confirm, "backtrack": cfg.backtrack, "epsilon": str(cfg.epsilon)}}


def applied_noise(cfg: InvertConfig, lm, noise: dict) -> Optional[float]:
    """The measured noise ε_noise is widened to: with ``epsilon=auto`` and an unquantized forward only (under
    quantized activations the known rows' gap is a rounding flip, which QUANT_RTOL already allows for)."""
    act = (getattr(lm, "quant", None) or {}).get("activations", "none")
    return noise["relative"] if epsilon_choice(cfg.epsilon)[0] == "auto" and act == "none" else None


def lens_record(inverter) -> Optional[dict]:
    """What the ranking lens and table were fit on, and where the bundle lives (None without one)."""
    lens = inverter.lens
    if lens is None:
        return None
    return {**lens.info, "path": None if lens.path is None else str(lens.path),
            "weights": lens.identity["model"]["weights"]}


def invert_prompts(cfg: InvertConfig, p: Plan, lm, layer: int, out: Path, command: Optional[str] = None,
                   location: Optional[dict] = None, deadline: Optional[float] = None) -> dict:
    """Invert the prompts ``p.indices`` of ``p.source`` at ``layer`` into ``out`` (resuming what is there); stops
    before a prompt once ``time.monotonic()`` passes ``deadline``. Returns the ``inversion.json`` object."""
    import torch

    from collide.invert.locate import measure_noise
    from collide.invert.sipit import Inverter

    t0 = time.perf_counter()
    bos = first_token(cfg, lm.tokenizer)
    fixed = epsilon_choice(cfg.epsilon)[1]
    check_out(out).mkdir(parents=True, exist_ok=True)
    inverter = Inverter(lm, layer, cfg, stored_dtype=p.source.dtype, epsilon=fixed, bos=bos)
    noise = measure_noise(inverter, p.rows)
    inverter.noise = applied_noise(cfg, lm, noise)
    head = {**header(cfg, p.source, lm, layer, bos, noise), "lens": lens_record(inverter), "command": command,
            "noise": noise, "location": location, "setup_seconds": round(time.perf_counter() - t0, 2)}
    done = output.load_previous(out, {k: v for k, v in head.items() if k not in MEASURED})
    for previous, index in zip(done, p.indices):  # an earlier run's prompts must be the first ones asked for now
        if previous["key"] != p.source.keys[index]:
            raise CollideError(f"{out / output.JSON_NAME} lists prompt {previous['key']!r} where SOURCE has "
                               f"{p.source.keys[index]!r}; pass another out=DIR or delete {out}")
    n_total = len(p.indices)
    if done:
        log.info("resuming: %d of %d prompts already inverted in %s", len(done), n_total, out)
    prompts = list(done)
    doc = output.write(out, head, prompts, n_total, inverter.n_distinct)

    def progress(res) -> None:
        if cfg.progress:
            log.info("  position %d: token %d %s d=%.3g eps=%.3g tried %d (%.2f s)", res.position, res.token,
                     "ok" if res.recovered else "NOT RECOVERED", res.distance, res.epsilon, res.tried, res.seconds)

    with torch.inference_mode(False):
        for target in p.source.targets(p.indices[len(done):]):
            if deadline is not None and time.monotonic() > deadline:
                log.info("time budget spent: %d of %d prompts inverted at layer %d", len(prompts), n_total, layer)
                break
            t0 = time.perf_counter()
            results = inverter.invert(target.states, stop_on_miss=cfg.on_miss == "stop", progress=progress)
            prompts.append(output.prompt_record(target.key, results, lm.tokenizer, len(target.states),
                                                target.true_ids, target.text, time.perf_counter() - t0))
            doc = output.write(out, head, prompts, n_total, inverter.n_distinct)
            log.info("prompt %s: %d positions in %.1f s, %s", target.key, len(target.states),
                     time.perf_counter() - t0, prompts[-1].get("exact", "complete" if prompts[-1]["complete"]
                                                               else "incomplete"))
    return doc


def invert_source(cfg: InvertConfig, command: Optional[str] = None) -> dict:
    """Invert the prompts of ``cfg.source``; returns the ``inversion.json`` object (also written to ``out``)."""
    p = plan(cfg)
    lm = load(p.model)
    cfg.model = p.model
    bos = first_token(cfg, lm.tokenizer)
    layer, location = place(p, lm, bos)
    out = check_out(Path(cfg.out) if cfg.out else default_out(p.source, layer, str(cfg.policy)))
    doc = invert_prompts(cfg, p, lm, layer, out, command, location)
    log.info("%s -> %s", output.outcome_text(doc), out)
    return doc
