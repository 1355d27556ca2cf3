"""``collide COMMAND ...``: the one command line of collide, and its one override parser.

``collide run [overrides]`` is the Hydra app of ``collide.__main__`` (multirun ``-m``,
``hydra.run.dir=``, ``--cfg job`` as usual). Every other subcommand takes positional arguments
(a store, a run directory, a states file) and ``key=value`` overrides of a typed dataclass of
``collide.config``, composed through Hydra's compose API from ``conf/<command>.yaml``. So every
subcommand has ``--help`` (its keys, defaults and comments), ``--cfg`` (the composed config), the
same override grammar (``layers=1:3`` is the range 1..3 everywhere) and the same one-line errors.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import shlex
import sys
import typing
from dataclasses import MISSING as NO_DEFAULT, dataclass, fields, is_dataclass
from enum import Enum
from pathlib import Path

from collide.errors import CollideError

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
    """One subcommand: its schema (a dataclass of collide.config), where its positional arguments go,
    and the function that runs it (``module:function``, called with the config object)."""

    schema: str  # name of the dataclass in its module (see `schema_module`)
    positional: str | None  # the key that receives positional arguments (a list key takes several)
    entry: str  # "module:function" taking the composed config object
    summary: str  # one line for `collide --help`
    schema_module: str = "collide.config"


COMMANDS: dict[str, Command] = {
    "run": Command("CollideConfig", None, "collide.__main__:main",
                   "corpus -> model -> store -> certified search -> report (the default of `python -m collide`)"),
    "search": Command("SearchCommandConfig", "store", "collide.search.__main__:run",
                      "search a store again (no model): search.json + collisions Parquet"),
    "verify": Command("VerifyConfig", "stores", "collide.verify:run",
                      "re-check every shard's sha256, size, rows and prompt ids"),
    "compare": Command("CompareConfig", "runs", "collide.compare:run",
                       "one table and figure for several runs or a sweep"),
    "exhaustive": Command("ExhaustiveConfig", "run_dir", "collide.exhaustive:run_command",
                          "the paper's exhaustive continuation test on a finished run"),
    "invert": Command("InvertConfig", "source", "collide.invert.__main__:run",
                      "recover prompts exactly from their states at every position (SIPIT, certified)"),
    "probe": Command("ProbeConfig", "source", "collide.probe:run",
                     "linear probes: what each layer's state at t says about the token at t+tau"),
    "precache": Command("PrecacheConfig", None, "collide.precache:run",
                        "the synthetic pre-caching experiment (arXiv 2404.00859): vanilla vs myopic"),
}


def _schema(command: Command) -> type:
    return getattr(importlib.import_module(command.schema_module), command.schema)


def register_schemas() -> None:
    """Register every subcommand's schema in Hydra's ConfigStore as ``<command>_schema``."""
    from hydra.core.config_store import ConfigStore

    from collide.config import register_configs

    register_configs()
    for name, command in COMMANDS.items():
        if name != "run":
            ConfigStore.instance().store(name=f"{name}_schema", node=_schema(command))


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
    cls = _schema(command)
    arg = (command.positional or "").upper()
    head = f"usage: collide {name} {arg + ' ' if arg else ''}{'... ' if arg.endswith('S') else ''}[key=value ...]"
    return "\n".join([head, "", (cls.__doc__ or "").strip(), "", "keys (key=default  # meaning):",
                      *[row for row in describe(cls) if not row.startswith(f"  {command.positional}=")]])


def compose(name: str, argv: list[str]):
    """The typed config object of ``collide NAME argv`` (positional arguments and key=value overrides)."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    command = COMMANDS[name]
    # run directories are named key=value,...: an existing path is positional even with '=' in its name
    positional = [a for a in argv if "=" not in a or Path(a).exists()]
    overrides = [a for a in argv if a not in positional]
    if command.positional is None:
        if positional:
            raise CollideError(f"`collide {name}` takes only key=value overrides, got {positional}; "
                               f"see `collide {name} --help`")
        list_key = False
    else:
        hint = typing.get_type_hints(_schema(command))[command.positional]
        list_key = typing.get_origin(hint) in (list, typing.List)
        if not positional or (len(positional) > 1 and not list_key):
            wanted = f"one or more {command.positional.upper()}" if list_key else f"one {command.positional.upper()}"
            raise CollideError(f"`collide {name}` takes {wanted} argument, got {positional or 'none'}; "
                               f"see `collide {name} --help`")
    register_schemas()
    try:
        with initialize_config_module(config_module="collide.conf", version_base="1.3"):
            cfg = hydra_compose(config_name=name, overrides=overrides)
        if command.positional is not None:  # set after composing: a path is data, not override grammar
            OmegaConf.update(cfg, command.positional, positional if list_key else positional[0], merge=False)
        return OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException, ValueError, AssertionError) as exc:
        cause = exc.__cause__ or exc.__context__
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        detail = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
        raise CollideError((first if detail in first else f"{first}: {detail}")
                           + f"; see `collide {name} --help` for the keys and their types") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``collide`` console script; returns the exit status."""
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
        from collide.__main__ import main as run_main

        sys.argv = [sys.argv[0]] + rest
        run_main()
        return 0
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
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        module, function = COMMANDS[name].entry.split(":")
        result = getattr(importlib.import_module(module), function)(cfg, command=shlex.join(["collide", name, *rest]))
    except CollideError as exc:
        print(f"collide: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"collide: error: interrupted; what was complete is kept: run the same `collide {name}` command "
              "again to resume", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


def module_main(name: str) -> None:
    """``python -m collide.<name> ...`` = ``collide <name> ...`` (kept for the module forms)."""
    sys.exit(main([name, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
