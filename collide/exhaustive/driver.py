"""The exhaustive test of a finished run, end to end (``collide exhaustive``): ``exhaustive_test(cfg)``;
the test itself is described in ``collide.exhaustive``."""


from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

from collide.atomic import write_outputs
from collide.exhaustive.config import ExhaustiveConfig
from collide.errors import CollideError
from collide.exhaustive.inputs import OUT_DIR, base_prompts, open_run, select_closest, validate
from collide.exhaustive.modes import run_exhaustive, run_margin
from collide.layers import layers_in_words, parse_layers
from collide.models import load_model
from collide.report import add_section, figures
from collide.report.markdown import render_exhaustive, render_margin

log = logging.getLogger(__name__)

REPORT_KEYS = {"exhaustive": "exhaustive", "margin": "exhaustive_margin"}  # the run's report.json key per mode


def exhaustive_test(cfg: ExhaustiveConfig, command: str = "") -> dict:
    """The whole test on the finished run ``cfg.run_dir``; writes RUN_DIR/exhaustive/ and adds a
    section to the run's report; returns exhaustive.json's (or margin.json's) dict.

    ``command`` is recorded in the result (the command line that ran it)."""
    t_start = time.perf_counter()
    validate(cfg)
    inputs = open_run(Path(cfg.run_dir), cfg)
    store, timings = inputs.store, {}
    spec = cfg.layers if cfg.layers is not None else (store.manifest["n_layers"] if cfg.mode == "exhaustive" else "all")
    layers = parse_layers(spec, int(store.manifest["n_layers"]))
    tic = time.perf_counter()
    if cfg.prompt_ids:
        ids, selection = [int(i) for i in cfg.prompt_ids], {"method": "explicit"}
    elif cfg.mode == "exhaustive":
        layer = cfg.layer_for_selection if cfg.layer_for_selection is not None else max(store.layers)
        ids, selection = select_closest(store, layer, cfg.n_prompts, inputs.threshold, cfg.search)
    else:
        if cfg.n_prompts > store.n_rows:
            raise CollideError(f"n_prompts={cfg.n_prompts} but the run's store holds {store.n_rows} prompts; "
                               f"set n_prompts<={store.n_rows}")
        ids, selection = list(range(cfg.n_prompts)), {"method": "first"}
    selection["prompt_ids"] = ids
    prompts = base_prompts(store, ids)  # bad ids fail before the model loads
    timings["select_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    lm = load_model(inputs.model_cfg)
    timings["load_model_s"] = time.perf_counter() - tic
    if lm.d != store.d or lm.n_layers != int(store.manifest["n_layers"]):
        raise CollideError(f"the model loaded from the run's config has d={lm.d}, L={lm.n_layers}, the run's store "
                           f"d={store.d}, L={store.manifest['n_layers']}; the model.* overrides must keep the model")
    log.info("model %s loaded in %.1f s on %s; %s test of %d prompts at %s", lm.name, timings["load_model_s"],
             lm.device, cfg.mode, len(ids), layers_in_words(layers))
    if cfg.mode == "exhaustive":
        result = run_exhaustive(inputs, lm, layers, prompts, selection, cfg, timings)
    else:
        result = run_margin(inputs, lm, layers, prompts, selection, cfg, timings)
    out_dir = inputs.out_dir
    name = cfg.mode
    m = inputs.model_cfg
    result.update(created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), command=command,
                  run_dir=str(inputs.run_dir), device=str(lm.device),
                  model={"name": m.name, "source": m.source, "family": m.family, "dtype": m.dtype,
                         "final_norm": m.final_norm, "n_layers": lm.n_layers, "d": lm.d,
                         "vocab_size": int(lm.model.get_input_embeddings().weight.shape[0])},
                  timings=timings)
    total = sum(s["n_continuations"] for s in result["sets"])
    searched = sum(e["n_pairs"] for e in result["per_layer"])
    result["throughput"] = {"continuations_per_s": total / max(timings["extract_s"], 1e-9),
                            "pairs_per_s": searched / max(timings["search_s"], 1e-9)}
    tic = time.perf_counter()
    title = (f"{m.name}: {result['n_sets']} prompts x {result['sets'][0]['n_continuations']:,} continuations, "
             f"{cfg.mode}, {m.dtype}")
    figures.exhaustive_figure(result, out_dir / f"{name}.png", title)
    timings["report_s"] = time.perf_counter() - tic
    timings["wall_s"] = time.perf_counter() - t_start
    render = partial(render_exhaustive, json_file=f"{OUT_DIR}/{name}.json") if name == "exhaustive" else render_margin
    write_outputs(out_dir, name, result, f"# collide {name} test: {m.name}\n\n" + render(result, f"{name}.png", True))
    summary = {k: v for k, v in result.items() if k != "sets"}
    summary["files"] = {"json": f"{OUT_DIR}/{name}.json", "markdown": f"{OUT_DIR}/{name}.md",
                        "figure": f"{OUT_DIR}/{name}.png"}
    add_section(inputs.run_dir, REPORT_KEYS[cfg.mode], summary, render(result, f"{OUT_DIR}/{name}.png", False),
                f"{OUT_DIR}/{name}.png")
    log.info("%s test written to %s in %.1f s (extraction %.1f s, search %.1f s)", name, out_dir / f"{name}.json",
             timings["wall_s"], timings["extract_s"], timings["search_s"])
    return result
