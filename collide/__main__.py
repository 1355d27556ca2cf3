"""``collide run [overrides]`` (= ``python -m collide``): corpus -> model -> store -> search -> report.

Hydra entry point: ``--help``, ``--cfg job``, ``-m`` multirun and ``hydra.run.dir=DIR`` work as
usual. Stores are keyed by their content, not by the run: a store lives at
``<store.root>/<model>-<corpus>-n<N>-<hash>/`` where the hash covers everything that determines
its states (see ``store_identity``), so runs that differ only in search or report settings share
one store, and a rerun resumes an interrupted one. A complete store that holds more prompts (the
same deterministic stream) or more layers serves a run that asks for a subset, without loading the
model. The run directory (named by the command) receives ``report.json``, ``report.md``,
``collisions/``, ``figures/`` and ``store.json``, the record of the store it used.

``python -m collide COMMAND ...`` with another command of ``collide.cli`` (search, verify, ...)
runs that command.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from collide.config import CollideConfig, register_configs
from collide.errors import CollideError

log = logging.getLogger("collide")

# Keys of the model config that say where or how it runs, not what it computes: left out of a store's identity.
RUNTIME_MODEL_KEYS = ("device", "device_map")


def validate(cfg: CollideConfig) -> None:
    """Checks that need no model, so that bad values fail before anything is loaded."""
    if cfg.n_prompts < 2:
        raise CollideError(f"n_prompts={cfg.n_prompts}: at least 2 prompts are needed to form a pair")
    if not cfg.threshold > 0:
        raise CollideError(f"threshold={cfg.threshold}: must be a positive L2 distance, e.g. threshold=1e-6")
    if cfg.store.shard_rows < 1 or cfg.search.block_rows < 1:
        raise CollideError("store.shard_rows and search.block_rows must be >= 1")


def layer_spec(spec) -> str:
    """A canonical text of the ``layers`` config ("all", "a:b", or "0,5,30") for store identities."""
    if isinstance(spec, (list, tuple)):
        return ",".join(str(k) for k in sorted({int(k) for k in spec}))
    return str(spec)


def store_identity(cfg: CollideConfig) -> dict:
    """What determines a store's states (and so its location): a resumed store must match every key.

    Model: name, source, revision, family, GGUF file, compute dtype, final-norm convention, seed
    (random models) and trust_remote_code; not its device or device map. Corpus: every key but its
    name. Then n_prompts, the layer spec as given (resolved layers are in the manifest), positions,
    the storage dtype (auto resolved to the compute dtype), and keep_text and shard_rows (shard
    boundaries fix which prompts share a forward batch, so a resume stays bit-identical).
    """
    model = {k: v for k, v in asdict(cfg.model).items() if k not in RUNTIME_MODEL_KEYS}
    corpus = {k: v for k, v in asdict(cfg.corpus).items() if k != "name"}
    stored = cfg.model.dtype if cfg.store.dtype == "auto" else cfg.store.dtype
    return json.loads(json.dumps({
        "model": model, "corpus": corpus, "n_prompts": cfg.n_prompts, "layers": layer_spec(cfg.layers),
        "positions": cfg.store.positions, "dtype": stored, "keep_text": cfg.store.keep_text,
        "shard_rows": cfg.store.shard_rows}))


def identity_hash(identity: dict) -> str:
    """12 hex digits of the sha256 of the identity's canonical JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def store_location(cfg: CollideConfig, identity: dict) -> Path:
    """``store.path`` when set, else ``<store.root>/<model>-<corpus>-n<N>-<hash>``."""
    if cfg.store.path:
        return Path(cfg.store.path)
    return Path(cfg.store.root) / f"{cfg.model.name}-{cfg.corpus.name}-n{cfg.n_prompts}-{identity_hash(identity)}"


def serves(manifest: dict, identity: dict, cfg: CollideConfig) -> list[int] | None:
    """The layers a complete store's manifest would give this run, or None if it cannot serve it.

    A store serves when its identity equals this run's in every key but ``n_prompts`` (it holds at
    least as many: its first N prompts are the first N distinct prompts of the same deterministic
    stream) and ``layers`` (it holds every layer asked for: the same forward passes computed them).
    """
    from collide.models import parse_layers

    stored = manifest.get("identity", {})
    if manifest.get("status") != "complete" or set(stored) != set(identity):
        return None
    if any(stored[k] != identity[k] for k in identity if k not in ("n_prompts", "layers")):
        return None
    if int(manifest["counts"]["n_prompts"]) < cfg.n_prompts:
        return None
    try:
        layers = parse_layers(cfg.layers, int(manifest["n_layers"]))
    except CollideError:
        return None
    return layers if set(layers) <= {int(k) for k in manifest["layers"]} else None


def serving_store(cfg: CollideConfig, identity: dict, location: Path):
    """(store, layers, how) for a complete store that serves this run without the model, else None.

    ``how`` is "exact" (the store at ``location``) or "subset" (a larger store under store.root).
    """
    from collide.store import MANIFEST, open_store, read_manifest

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


def extract(cfg: CollideConfig, identity: dict, location: Path, timings: dict):
    """Load the model and extract (or resume) the store at ``location``; returns (store, layers)."""
    from collide.corpus import iter_prompts
    from collide.models import load_model, parse_layers

    tic = time.perf_counter()
    log.info("loading model %s (%s)", cfg.model.name, cfg.model.source)
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


def run(cfg: CollideConfig, run_dir: Path, command: str) -> dict:
    """The whole pipeline on a validated config; returns the report dict."""
    from collide.atomic import atomic_write_json
    from collide.report import print_summary, write_report

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
                  "n_layers": store.manifest["n_layers"], "d": store.d}
    counts = store.manifest["counts"]
    run_info = {"model": model_info, "corpus": asdict(cfg.corpus), "n_prompts": store.n_rows,
                # duplicates met before the first N distinct prompts: known only for the store's own N
                "n_duplicates": counts["n_duplicates"] if store.n_rows == counts["n_prompts"] else None,
                "threshold": cfg.threshold, "layers": layers, "timings": timings, "store": str(store.path.resolve()),
                "command": command}
    report = write_report(run_dir, json.loads(json.dumps(run_info)), results, store, cfg.report)
    print_summary(report)
    log.info("report written to %s", run_dir / "report.md")
    return report


def _check_group_choices(argv: list[str]) -> None:
    """One-line error for an unknown model=/corpus=/cluster= name, listing the choices (before Hydra starts)."""
    import re

    from collide.corpus import available

    for arg in argv:
        match = re.fullmatch(r"\+?(model|corpus|cluster)=(.+)", arg)
        if match:
            group, value = match.groups()
            for name in value.split(","):  # multirun sweeps list several
                if name and name not in available(group):
                    raise CollideError(f"unknown {group} {name!r}; choose one of: {', '.join(available(group))}"
                                       + {"model": " (or set model.source=<hub id or local dir>)",
                                          "corpus": " (or corpus=files corpus.data_files=...)"}.get(group, ""))


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
                               + "; see `collide run --cfg job` for the keys and their types") from None


def _hydra_app():
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    @hydra.main(version_base="1.3", config_path="pkg://collide.conf", config_name="config")
    def app(dcfg: DictConfig) -> None:
        cfg: CollideConfig = OmegaConf.to_object(dcfg)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            run(cfg, run_dir, "collide run " + shlex.join(sys.argv[1:]))
        except CollideError as exc:
            sys.exit(_fail(str(exc)))
        except KeyboardInterrupt:
            again = ("the same command" if HydraConfig.get().mode == RunMode.RUN
                     else f"this job alone: collide run {shlex.join(HydraConfig.get().overrides.task)}")
            sys.exit(_fail(f"interrupted; the store's complete shards are kept: run {again} to resume", status=130))

    return app


def _fail(message: str, status: int = 2) -> int:
    """Print the one-line error (and keep it in the job's log file, if Hydra opened one); returns status."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(f"collide: error: {message}", file=sys.stderr)
    return status


def path_safe(text: str) -> str:
    """A run-directory name from Hydra's override_dirname: a path in an override must not nest directories."""
    return text.replace("/", "%2F")


def main() -> None:
    """``python -m collide [overrides]`` runs the pipeline; ``python -m collide COMMAND ...`` another command."""
    from collide.cli import COMMANDS, main as cli_main

    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS and sys.argv[1] != "run":
        sys.exit(cli_main(sys.argv[1:]))
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        sys.argv = [sys.argv[0]] + sys.argv[2:]
    register_configs()
    if not OmegaConf.has_resolver("path_safe"):
        OmegaConf.register_new_resolver("path_safe", path_safe)
    try:
        _check_group_choices(sys.argv[1:])
        _check_composes(sys.argv[1:])
    except CollideError as exc:
        sys.exit(_fail(str(exc)))
    _hydra_app()()


if __name__ == "__main__":
    main()
