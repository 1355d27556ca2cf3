"""``python -m collide [overrides]``: corpus -> model -> store -> certified search -> report.

Hydra entry point: ``--help``, ``--cfg job``, ``-m`` multirun and ``hydra.run.dir=DIR`` work as
usual. The run directory receives ``store/``, ``report.json``, ``report.md``, ``collisions/``
and ``figures/``. The default run directory is named by the command, so running the same
command again resumes an interrupted store, or searches a complete one without loading the model.
"""

from __future__ import annotations

import logging
import re
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from collide.config import CollideConfig, register_configs
from collide.errors import CollideError

log = logging.getLogger("collide")

def validate(cfg: CollideConfig) -> None:
    """Checks that need no model, so that bad values fail before anything is loaded."""
    from collide.search.api import BACKENDS

    if cfg.n_prompts < 2:
        raise CollideError(f"n_prompts={cfg.n_prompts}: at least 2 prompts are needed to form a pair")
    if not cfg.threshold > 0:
        raise CollideError(f"threshold={cfg.threshold}: must be a positive L2 distance, e.g. threshold=1e-6")
    if cfg.search.backend not in BACKENDS:
        raise CollideError(f"search.backend={cfg.search.backend!r}: use one of {list(BACKENDS)}")
    if cfg.store.shard_rows < 1 or cfg.search.block_rows < 1:
        raise CollideError("store.shard_rows and search.block_rows must be >= 1")


def identity(cfg: CollideConfig, layers: list[int]) -> dict:
    """What makes a store: a resumed store must match every key (see collide.extract)."""
    return {"model": asdict(cfg.model), "corpus": asdict(cfg.corpus), "layers": layers,
            "n_prompts": cfg.n_prompts, "keep_text": cfg.store.keep_text, "shard_rows": cfg.store.shard_rows}


def finished_store(cfg: CollideConfig, store_dir: Path):
    """(store, layers) when ``store_dir`` holds a complete store made by this very config, else None.

    Such a store needs neither the model nor the corpus: a rerun only searches and reports.
    """
    from collide.models import parse_layers
    from collide.store import MANIFEST, identity_diff, open_store

    if not (store_dir / MANIFEST).is_file():
        return None
    try:
        store = open_store(store_dir)
    except CollideError:
        return None  # the extraction stage reports what is wrong with it
    if not store.complete:
        return None
    layers = parse_layers(cfg.layers, store.manifest["n_layers"])
    if identity_diff(store.manifest["identity"], identity(cfg, layers)):
        return None  # the extraction stage names the differing key
    return store, layers


def run(cfg: CollideConfig, run_dir: Path, command: str) -> dict:
    """The whole pipeline on a validated config; returns the report dict."""
    from collide.corpus import iter_prompts
    from collide.extract import extract_to_store
    from collide.models import load_model, parse_layers
    from collide.report import print_summary, write_report
    from collide.search import search_store

    validate(cfg)
    timings: dict[str, float] = {"load_model": 0.0, "extract": 0.0}
    store_dir = Path(cfg.store.path) if Path(cfg.store.path).is_absolute() else run_dir / cfg.store.path
    finished = finished_store(cfg, store_dir)
    if finished is not None:
        store, layers = finished
        log.info("store %s is complete (%d prompts, layers %s): searching it without loading the model",
                 store_dir, store.n_rows, layers if len(layers) < 8 else f"{layers[0]}..{layers[-1]}")
    else:
        tic = time.perf_counter()
        log.info("loading model %s (%s)", cfg.model.name, cfg.model.source)
        lm = load_model(cfg.model)
        layers = parse_layers(cfg.layers, lm.n_layers)
        timings["load_model"] = time.perf_counter() - tic
        log.info("model loaded in %.1f s: L=%d blocks, d=%d, layers %s", timings["load_model"], lm.n_layers, lm.d,
                 layers if len(layers) < 8 else f"{layers[0]}..{layers[-1]} ({len(layers)})")
        tic = time.perf_counter()
        store = extract_to_store(lm, iter_prompts(cfg.corpus, lm.tokenizer), layers, store_dir, cfg.n_prompts,
                                 identity(cfg, layers), cfg.store, cfg.extract)
        timings["extract"] = time.perf_counter() - tic
        del lm  # free the model before the search needs memory

    tic = time.perf_counter()
    results = []
    for layer in layers:
        results.append(search_store(store, layer, cfg.threshold, cfg.search))
        res = results[-1].result
        log.info("layer %d: min distance %.6g (%s), %d collisions, %.1f s", layer, res.distance,
                 "certified" if res.certified else "NOT certified", res.n_collisions, res.seconds)
    timings["search"] = time.perf_counter() - tic

    model_info = {**{k: getattr(cfg.model, k) for k in ("name", "source", "revision", "family", "dtype",
                                                         "final_norm")},
                  "n_layers": store.manifest["n_layers"], "d": store.d}
    run_info = {"model": model_info, "corpus": asdict(cfg.corpus), "n_prompts": store.n_rows,
                "n_duplicates": store.manifest["counts"]["n_duplicates"], "threshold": cfg.threshold,
                "layers": layers, "timings": timings, "store": str(Path(cfg.store.path)), "command": command}
    report = write_report(run_dir, run_info, results, store, cfg.report)
    print_summary(report)
    log.info("report written to %s", run_dir / "report.md")
    return report


def _check_group_choices(argv: list[str]) -> None:
    """One-line error for an unknown model=/corpus= name, listing the choices (before Hydra starts)."""
    from collide.corpus import available

    for arg in argv:
        match = re.fullmatch(r"\+?(model|corpus)=(.+)", arg)
        if match:
            group, value = match.groups()
            for name in value.split(","):  # multirun sweeps list several
                if name and name not in available(group):
                    raise CollideError(f"unknown {group} {name!r}; choose one of: {', '.join(available(group))}"
                                       + (" (or set model.source=<hub id or local dir>)" if group == "model"
                                          else " (or corpus=files corpus.data_files=...)"))


def _sweep_variants(overrides: list[str]) -> list[list[str]]:
    """The override lists to compose for a sweep: the first value of every swept key, then each
    other value of each key alone (every value is checked without composing the whole product)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - a sweep syntax Hydra's own parser rejects: Hydra reports it
        return []
    if any(o.is_sweep_override() and not o.is_discrete_sweep() for o in parsed):
        return []  # interval sweeps are for sweeper plugins: they check their own arguments
    options = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in parsed]
    base = [opts[0] for opts in options]
    return [base] + [base[:k] + [v] + base[k + 1:] for k, opts in enumerate(options) for v in opts[1:]]


def _check_composes(argv: list[str]) -> None:
    """Compose the config before Hydra starts, so a bad key or value is one line (runs and sweeps)."""
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    if any(arg.startswith("-") and arg not in ("-m", "--multirun") for arg in argv):
        return  # --help, --cfg, --config-dir ...: Hydra handles these itself
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    overrides = [arg for arg in argv if not arg.startswith("-")
                 and not arg.lstrip("+~").startswith(("hydra.", "hydra/"))]
    for variant in _sweep_variants(overrides) if multirun else [overrides]:
        try:
            with initialize_config_module(config_module="collide.conf", version_base="1.3"):
                OmegaConf.to_object(compose(config_name="config", overrides=variant))
        except (HydraException, ValueError) as exc:
            cause = exc.__cause__ or exc.__context__
            first = str(exc).splitlines()[0]
            detail = str(cause).splitlines()[0] if cause is not None and str(cause) else ""
            raise CollideError((first if detail in first else f"{first} {detail}")
                               + "; see `python -m collide --cfg job` for the keys and their types") from None


def _hydra_app():
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    @hydra.main(version_base="1.3", config_path="pkg://collide.conf", config_name="config")
    def app(dcfg: DictConfig) -> None:
        cfg: CollideConfig = OmegaConf.to_object(dcfg)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            run(cfg, run_dir, "python -m collide " + shlex.join(sys.argv[1:]))
        except CollideError as exc:
            sys.exit(_fail(str(exc)))
        except KeyboardInterrupt:
            again = ("the same command" if HydraConfig.get().mode == RunMode.RUN
                     else f"this job alone: python -m collide {shlex.join(HydraConfig.get().overrides.task)}")
            sys.exit(_fail(f"interrupted; the complete shards in {run_dir / cfg.store.path} are kept: run {again} "
                           f"with hydra.run.dir={run_dir} to resume", status=130))

    return app


def _fail(message: str, status: int = 2) -> int:
    """Print the one-line error (and keep it in the job's log file, if Hydra opened one); returns status."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(f"collide: error: {message}", file=sys.stderr)
    return status


def main() -> None:
    register_configs()
    try:
        _check_group_choices(sys.argv[1:])
        _check_composes(sys.argv[1:])
    except CollideError as exc:
        sys.exit(_fail(str(exc)))
    _hydra_app()()


if __name__ == "__main__":
    main()
