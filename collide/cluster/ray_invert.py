"""Inversion of a whole SOURCE on Ray: ``invert_source_ray``, ``collide invert``'s work spread over workers.

Who does what:

- **The driver** checks SOURCE and the settings (``collide.invert.driver.plan``, no model), holds only the
  tokenizer and the model's shape (``collide.cluster.shell``), writes ``inversion.json`` and ``inversion.md``
  (``collide.invert.output``) and resumes an earlier output as the local command does.
- **The workers** are the run's warm actors (``collide.cluster.pool``). Each loads the model once and builds
  one ``Inverter`` (its lens and position-0 table read or fit once), then inverts whole prompts. The first
  unit places the states (layer and norm convention, ``collide.invert.driver.place``), the second measures
  SOURCE's noise on its known rows and fits the lens if it is not cached yet, both on one worker, before the
  prompts are spread.

Order and resume: prompts are handed out in SOURCE order and may finish in any order; a prompt that finishes
before those ahead of it waits in the driver's memory, and ``inversion.json`` is rewritten (atomically) each
time the prompts done form a longer prefix of SOURCE order. A driver killed mid-run therefore leaves a file
listing a prefix of the prompts, and the same call resumes after it without redoing them. The random
policies seed their generator per prompt (``cfg.seed``), so a prompt's result does not depend on the worker
or on the order: the prompt records equal a local inversion's except ``seconds``.

Faults: a worker lost mid-prompt is restarted (``cluster.max_retries`` times) and the prompt runs again there
from its start; past that, one line names the prompt, and every prompt listed so far stays in the file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from collide.cluster.pool import Unit, worker_pool
from collide.cluster.session import chaos_point, ray_session
from collide.cluster.shell import model_shell
from collide.config import ClusterConfig, ModelConfig
from collide.errors import CollideError
from collide.invert import output
from collide.invert.config import InvertConfig
from collide.invert.driver import (MEASURED, applied_noise, check_out, default_out, first_token, header,
                                   lens_record, place, plan)
from collide.invert.sipit import epsilon_choice

log = logging.getLogger(__name__)


def _loadable(model: ModelConfig) -> ModelConfig:
    """The config a worker loads: ``final_norm=auto`` loads as ``post`` (``collide.invert.driver.load``)."""
    return replace(model, final_norm="post") if str(model.final_norm) == "auto" else model


def place_unit(worker, model_cfg: ModelConfig, facts: SimpleNamespace, bos) -> tuple:
    """Unit: (layer, location record or None, final_norm) of SOURCE's states (``collide.invert.driver.place``)."""
    lm = worker.model(_loadable(model_cfg))
    with worker.compute:
        layer, location = place(facts, lm, bos)
    return layer, location, lm.final_norm


def _inverter(worker, spec: dict):
    """This worker's Inverter of ``spec`` (model, final_norm, layer, settings), built once with its lens."""
    from collide.invert.sipit import Inverter

    lm = worker.model(_loadable(spec["cfg"].model))
    lm.final_norm = spec["final_norm"]  # as place() set it on the driver's model in a local run
    return worker.cached(repr(sorted(spec.items())), lambda: Inverter(
        lm, spec["layer"], spec["cfg"], stored_dtype=spec["stored_dtype"], epsilon=spec["epsilon"], bos=spec["bos"]))


def setup_unit(worker, spec: dict, rows) -> tuple:
    """Unit: (noise measured on SOURCE's known rows, lens record, distinct input rows) with this worker's inverter."""
    from collide.invert.locate import measure_noise

    with worker.compute:
        inverter = _inverter(worker, spec)
        return measure_noise(inverter, rows), lens_record(inverter), inverter.n_distinct


def invert_unit(worker, spec: dict, noise, target) -> dict:
    """Unit: the ``inversion.json`` record of one prompt (``target``: a ``collide.invert.sources.Target``)."""
    import torch

    chaos_point(f"invert-{target.key}")
    with worker.compute, torch.inference_mode(False):
        inverter = _inverter(worker, spec)
        inverter.noise = noise
        t0 = time.perf_counter()
        results = inverter.invert(target.states, stop_on_miss=spec["cfg"].on_miss == "stop")
        return output.prompt_record(target.key, results, inverter.lm.tokenizer, len(target.states), target.true_ids,
                                    target.text, time.perf_counter() - t0)


def invert_source_ray(cfg: InvertConfig, cluster_cfg: ClusterConfig, command: str | None = None) -> dict:
    """Invert the prompts of ``cfg.source`` on Ray workers (module docstring); returns the ``inversion.json``
    object, also written to ``out``. The output directory must be on storage the driver writes; SOURCE is read
    by the driver only."""
    t0 = time.perf_counter()
    p = plan(cfg)
    cfg = replace(cfg, model=p.model, progress=False)  # the workers log no position
    shell = model_shell(_loadable(p.model))
    bos = first_token(cfg, shell.tokenizer)
    facts = SimpleNamespace(source=SimpleNamespace(path=p.source.path, d=p.source.d, layer=p.source.layer),
                            rows=p.rows, model=p.model, layer=p.layer)
    with ray_session(cluster_cfg, None):  # the driver alone reads SOURCE and writes out
        pool = worker_pool(cluster_cfg)
        layer, location, shell.final_norm = pool.first(place_unit, p.model, facts, bos,
                                                       what=f"placing the states of {p.source.path}")
        out = check_out(Path(cfg.out) if cfg.out else default_out(p.source, layer, str(cfg.policy)))
        out.mkdir(parents=True, exist_ok=True)
        spec = dict(cfg=cfg, final_norm=shell.final_norm, layer=layer, stored_dtype=p.source.dtype,
                    epsilon=epsilon_choice(cfg.epsilon)[1], bos=bos)
        noise, lens, n_distinct = pool.first(setup_unit, spec, p.rows, what=f"the inverter of layer {layer}")
        head = {**header(cfg, p.source, shell, layer, bos, noise), "lens": lens, "command": command, "noise": noise,
                "location": location, "setup_seconds": round(time.perf_counter() - t0, 2)}
        prompts = _resumed(out, head, p)
        doc = output.write(out, head, prompts, len(p.indices), n_distinct)
        applied = applied_noise(cfg, shell, noise)
        units = (Unit(i, invert_unit, (spec, applied, target), f"inversion of prompt {target.key} of {p.source.path}")
                 for i, target in enumerate(p.source.targets(p.indices[len(prompts):]), len(prompts)))
        finished: dict[int, dict] = {}  # SOURCE position -> record, waiting for the prompts ahead of it
        for i, record in pool.run(units):
            finished[i] = record
            if len(prompts) in finished:
                while len(prompts) in finished:
                    prompts.append(finished.pop(len(prompts)))
                doc = output.write(out, head, prompts, len(p.indices), n_distinct)
            log.info("prompt %s: %d positions in %.1f s on a Ray worker", record["key"], record["n_positions"],
                     record["seconds"])
    log.info("%s -> %s", output.outcome_text(doc), out)
    return doc


def _resumed(out: Path, head: dict, p) -> list[dict]:
    """The prompts an earlier run of the same inversion listed in ``out`` (they must be SOURCE's first ones)."""
    done = output.load_previous(out, {k: v for k, v in head.items() if k not in MEASURED})
    for previous, index in zip(done, p.indices):
        if previous["key"] != p.source.keys[index]:
            raise CollideError(f"{out / output.JSON_NAME} lists prompt {previous['key']!r} where SOURCE has "
                               f"{p.source.keys[index]!r}; pass another out=DIR or delete {out}")
    if done:
        log.info("resuming: %d of %d prompts already inverted in %s", len(done), len(p.indices), out)
    return list(done)
