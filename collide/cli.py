"""``collide COMMAND ...``: the one command line of collide, and its one way to compose a config.

``COMMANDS`` maps each name to the function that runs it (``collide.commands.<name>.run``) and its
schema, a dataclass of ``collide.config``. ``collide run`` is a Hydra app (multirun ``-m``,
``hydra.run.dir=``, ``--cfg job`` as usual); every other subcommand takes positional arguments
(a store, a run directory, a states file) and ``key=value`` overrides, composed through Hydra's
compose API from ``collide/conf/<command>.yaml``. Both go through ``compose``, so every command has the
same override grammar (``layers=1:3`` is the range 1..3 everywhere), ``--help`` (its keys,
defaults and comments), ``--cfg`` and the same one-line errors (``collide: error: ...``, status 2).
"""

from __future__ import annotations

import inspect
import logging
import shlex
import sys
import typing
from dataclasses import MISSING as NO_DEFAULT, dataclass, fields, is_dataclass
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import Callable

from collide.commands import audit, compare, exhaustive, invert, lens, models, myopic_lm, precache, probe, run, search, verify
from collide.config import register_configs
from collide.errors import CollideError

log = logging.getLogger(__name__)

USAGE = """usage: collide COMMAND [ARGS] [key=value ...] [--help] [--cfg]

Commands:
{commands}

`collide COMMAND --help` lists the command's keys with their defaults.
Examples:
  collide run model=llama3 corpus=c4 n_prompts=100000      extract, search, report
  collide run -m model=gpt2,mistral corpus=mix              a sweep (Hydra multirun)
  collide search runs/stores/<store> layers=1:3 threshold=1e-5
  collide compare runs/multirun/<date>
"""


@dataclass(frozen=True)
class Command:
    """One subcommand: the function that runs it, its schema, and where its positional arguments go."""

    fn: Callable  # run(cfg, command) of collide.commands.<name>
    schema: type  # the dataclass of collide.config its config is composed into
    positional: str | None  # the key that receives positional arguments (a list key takes several)
    summary: str  # one line for `collide --help`
    rerun: str  # what running the same command again does after Ctrl-C (the interrupted line's advice)


def _command(name: str, module: ModuleType) -> Command:
    rerun = getattr(module, "RERUN", f"what was complete is kept: run the same `collide {name}` command again "
                                     "to resume")
    return Command(module.run, module.SCHEMA, getattr(module, "POSITIONAL", None), module.SUMMARY, rerun)


COMMANDS: dict[str, Command] = {name: _command(name, module) for name, module in (
    ("run", run), ("search", search), ("verify", verify), ("compare", compare), ("exhaustive", exhaustive),
    ("invert", invert), ("audit", audit), ("lens", lens), ("models", models), ("probe", probe), ("precache", precache),
    ("myopic-lm", myopic_lm))}


def register_schemas() -> None:
    """Register every command's schema in Hydra's ConfigStore: ``collide_schema`` (run), ``<command>_schema``."""
    from hydra.core.config_store import ConfigStore

    register_configs()
    for name, command in COMMANDS.items():
        if name != "run":
            ConfigStore.instance().store(name=f"{name}_schema", node=command.schema)
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("path_safe"):
        OmegaConf.register_new_resolver("path_safe", path_safe)


def path_safe(text: str) -> str:
    """A run-directory name from Hydra's override_dirname: a path in an override must not nest directories."""
    return text.replace("/", "%2F")


def field_comments(cls: type) -> dict[str, str]:
    """{field: the comment on its line, or on the comment lines just above it} from the class source."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    names = {f.name for f in fields(cls)}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
            continue
        name = text.split(":", 1)[0].strip()
        if name in names:
            trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            out[name] = " ".join(above + ([trailing] if trailing else []))
        above = []
    return out


def describe(cls: type, prefix: str = "") -> list[str]:
    """``key=default  # comment`` lines for a dataclass schema, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows: list[str] = []
    for f in fields(cls):
        kind = hints[f.name]
        if is_dataclass(kind) and f.default_factory is not NO_DEFAULT:
            rows += describe(kind, f"{prefix}{f.name}.")
            continue
        value = f.default if f.default is not NO_DEFAULT else (
            f.default_factory() if f.default_factory is not NO_DEFAULT else "???")
        value = value.value if isinstance(value, Enum) else value
        choices = f"  [{' | '.join(m.value for m in kind)}]" if isinstance(kind, type) and issubclass(kind, Enum) else ""
        rows.append(f"  {prefix}{f.name}={value!s}{choices}  # {comments.get(f.name, '')}".rstrip(" #"))
    return rows


def command_help(name: str) -> str:
    command = COMMANDS[name]
    cls = command.schema
    arg = (command.positional or "").upper()
    head = f"usage: collide {name} {arg + ' ' if arg else ''}{'... ' if arg.endswith('S') else ''}[key=value ...]"
    return "\n".join([head, "", (cls.__doc__ or "").strip(), "", "keys (key=default  # meaning):",
                      *[row for row in describe(cls) if not row.startswith(f"  {command.positional}=")]])


def compose(name: str, argv: list[str]):
    """The typed config object of ``collide NAME argv``: ``collide/conf/<name>.yaml`` with argv's key=value overrides,
    and its positional arguments set on the command's positional key after composing (a path is data, not
    override grammar; ``run`` takes none, so every argument is an override there, ``~key`` included).
    Every failure is a CollideError of one line naming the key and ``--help``: the one place where collide
    composes a config (the commands, the checks before a Hydra run, the tests)."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    from collide.corpus import available

    command = COMMANDS[name]
    positional, overrides = ([], list(argv)) if name == "run" else split_arguments(name, argv)
    _check_group_choices(overrides, config_groups(name))
    register_schemas()
    try:
        with initialize_config_module(config_module="collide.conf", version_base="1.3"):
            cfg = hydra_compose(config_name=name, overrides=list(overrides))
        if positional:
            OmegaConf.update(cfg, command.positional, positional if takes_many(command) else positional[0],
                             merge=False)
        return OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException, ValueError, AssertionError) as exc:
        group = exc.full_key if isinstance(exc, MissingMandatoryValue) else None
        if group in config_groups(name):  # a group left unset (model= of lens): name its choices
            raise CollideError(f"`collide {name}` needs {group}=NAME, one of: {', '.join(available(group))}") from None
        cause = exc.__cause__ or exc.__context__
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        detail = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
        keys = "collide run --cfg job" if name == "run" else f"collide {name} --help"
        raise CollideError((first if detail in first else f"{first}: {detail}")
                           + f"; see `{keys}` for the keys and their types") from None


def takes_many(command: Command) -> bool:
    """Whether the command's positional key is a list (several STORES or RUN_DIRS), not one path."""
    return typing.get_origin(typing.get_type_hints(command.schema)[command.positional]) in (list, typing.List)


def split_arguments(name: str, argv: list[str]) -> tuple[list[str], list[str]]:
    """(positional, overrides) of ``collide NAME argv``, checked against the command's positional key.

    Run directories are named key=value,...: an existing path is positional even with '=' in its name.
    """
    command = COMMANDS[name]
    positional = [a for a in argv if "=" not in a or Path(a).exists()]
    overrides = [a for a in argv if a not in positional]
    if command.positional is None:
        if positional:
            raise CollideError(f"`collide {name}` takes only key=value overrides, got {positional}; "
                               f"see `collide {name} --help`")
        return [], overrides
    list_key = takes_many(command)
    if not positional or (len(positional) > 1 and not list_key):
        wanted = f"one or more {command.positional.upper()}" if list_key else f"one {command.positional.upper()}"
        raise CollideError(f"`collide {name}` takes {wanted} argument, got {positional or 'none'}; "
                           f"see `collide {name} --help`")
    return positional, overrides


# --------------------------------------------------------------------------- collide run (a Hydra app)


def config_groups(name: str) -> tuple[str, ...]:
    """The config groups (directories of collide/conf: model, corpus, cluster) that ``collide NAME`` composes:
    the group entries of the defaults list of collide/conf/<name>.yaml."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    conf = files("collide.conf")
    defaults = OmegaConf.to_container(OmegaConf.load(str(conf.joinpath(f"{name}.yaml")))).get("defaults", [])
    keys = [key.removeprefix("optional ").strip() for entry in defaults if isinstance(entry, dict) for key in entry]
    return tuple(key for key in keys if conf.joinpath(key).is_dir())


def _check_group_choices(argv: list[str], groups: tuple[str, ...]) -> None:
    """One-line error for an unknown name of a config group (model=, corpus=, cluster=), listing the choices,
    before Hydra composes anything (it would report an unknown model as a missing one)."""
    import re

    from collide.corpus import available

    for arg in argv:
        match = re.fullmatch(r"\+?(\w+)=(.+)", arg)
        if match and match.group(1) in groups:
            group, value = match.groups()
            for name in value.split(","):  # multirun sweeps list several
                if name and name not in available(group):
                    raise CollideError(f"unknown {group} {name!r}; choose one of: {', '.join(available(group))}"
                                       + {"model": " (a model not listed: model=<a listed model of its family> "
                                                   "model.source=<hub id or local dir>)",
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
    """Compose the run config before Hydra starts, so a bad key or value is one line (runs and sweeps)."""
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    if any(arg.startswith("-") and arg not in ("-m", "--multirun") for arg in argv):
        return  # --help, --cfg, --config-dir ...: Hydra handles these itself
    overrides = [arg for arg in argv if not arg.startswith("-")
                 and not arg.lstrip("+~").startswith(("hydra.", "hydra/"))]
    for variant in _sweep_variants(overrides) if multirun else [overrides]:
        compose("run", variant)


def _hydra_app():
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    @hydra.main(version_base="1.3", config_path="pkg://collide.conf", config_name="run")
    def app(dcfg) -> None:
        from omegaconf import OmegaConf

        try:
            COMMANDS["run"].fn(OmegaConf.to_object(dcfg), command="collide run " + shlex.join(sys.argv[1:]),
                               run_dir=Path(HydraConfig.get().runtime.output_dir))
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


def run_hydra(argv: list[str]) -> int:
    """``collide run argv``: check the overrides, then hand them to the Hydra app; returns the exit status."""
    try:
        _check_group_choices(argv, config_groups("run"))
        _check_composes(argv)
    except CollideError as exc:
        return _fail(str(exc))
    register_schemas()
    saved = sys.argv
    sys.argv = [saved[0], *argv]
    try:
        _hydra_app()()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0


# --------------------------------------------------------------------------- every command


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``collide`` console script (and of ``python -m collide``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(commands="\n".join(f"  {n:<11}{c.summary}" for n, c in COMMANDS.items())))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        if "=" in name or name.startswith("-"):  # `collide model=gpt2 ...` is `collide run model=gpt2 ...`
            name, rest = "run", argv
        else:
            print(f"collide: error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)} "
                  "(see `collide --help`)", file=sys.stderr)
            return 2
    if name == "run":
        return run_hydra(rest)
    if any(a in ("-h", "--help") for a in rest):
        print(command_help(name))
        return 0
    show_cfg = any(a.startswith("--cfg") for a in rest)
    unknown = [a for a in rest if a.startswith("-") and not a.startswith("--cfg")]
    rest = [a for a in rest if not a.startswith("-")]
    try:
        if unknown:
            raise CollideError(f"unknown option {unknown[0]!r}; `collide {name}` takes --help, --cfg and key=value")
        if show_cfg:
            from omegaconf import OmegaConf

            rest = rest if rest or COMMANDS[name].positional is None else ["<unset>"]
            print(OmegaConf.to_yaml(OmegaConf.structured(compose(name, rest))))
            return 0
        cfg = compose(name, rest)
        from collide.console import setup_logging

        setup_logging()
        result = COMMANDS[name].fn(cfg, command=shlex.join(["collide", name, *rest]))
    except CollideError as exc:
        print(f"collide: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"collide: error: interrupted; {COMMANDS[name].rerun}", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
