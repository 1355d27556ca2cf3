"""``python -m collide.exhaustive RUN_DIR [key=value ...]``: the command line of the exhaustive test.

RUN_DIR and Hydra-style ``key=value`` overrides of ``collide.config.ExhaustiveConfig`` (``--help``
lists them with their defaults); errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import logging
import re
import shlex
import sys
from dataclasses import fields

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from collide import exhaustive
from collide.config import ExhaustiveConfig, ModelConfig
from collide.errors import CollideError
from collide.exhaustive import run_command
from collide.exhaustive.inputs import validate


def parse_args(argv: list[str]) -> ExhaustiveConfig:
    """RUN_DIR and Hydra-style ``key=value`` overrides (OmegaConf dotlist) -> validated config.

    A range ``layers=a:b`` stays the string "a:b" (YAML would read ``1:3`` as the base-60 int 63);
    ``collide.models.parse_layers`` reads it as layers a..b inclusive."""
    run_dirs = [a for a in argv if "=" not in a]
    if len(run_dirs) != 1:
        raise CollideError(f"expected one RUN_DIR and key=value overrides, got {argv}; usage: "
                           "python -m collide.exhaustive RUN_DIR [n_prompts=10] [vocab=all|N] [layers=...] ...")
    overrides = [re.sub(r"^(\+?layers)=(\d*:\d*)$", r"\1='\2'", a) for a in argv if "=" in a]
    schema = OmegaConf.structured(ExhaustiveConfig(run_dir=run_dirs[0]))
    for arg in overrides:
        key = arg.split("=", 1)[0].lstrip("+")
        top = key.split(".")[0]
        if top not in schema or (top == "search" and key.split(".", 1)[-1] not in schema.search):
            known = ", ".join(f.name for f in fields(ExhaustiveConfig) if f.name != "run_dir")
            raise CollideError(f"unknown key {key!r} in {arg!r}; valid keys: {known} (and search.<key>, model.<key>)")
        if top == "model" and key.split(".", 1)[-1] not in {f.name for f in fields(ModelConfig)}:
            raise CollideError(f"unknown key {key!r} in {arg!r}: model.<key> overrides a field of the run's "
                               f"ModelConfig ({', '.join(f.name for f in fields(ModelConfig))})")
    try:
        merged = OmegaConf.merge(schema, OmegaConf.from_dotlist([a.lstrip("+") for a in overrides]))
        cfg: ExhaustiveConfig = OmegaConf.to_object(merged)
    except ConfigKeyError as exc:
        raise CollideError(f"unknown key {exc.full_key!r}; see python -m collide.exhaustive --help") from None
    except OmegaConfBaseException as exc:
        raise CollideError(f"bad value for {getattr(exc, 'full_key', '?')!r}: {exc.msg}") from None
    validate(cfg)
    return cfg


USAGE = """usage: python -m collide.exhaustive RUN_DIR [key=value ...]

Keys (Hydra-style overrides of ExhaustiveConfig; defaults below):
"""


def main(argv: list[str] | None = None) -> int:
    """The command; returns the exit status (0, 2 on a bad input, 130 when interrupted)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(exhaustive.__doc__)
        print(USAGE + OmegaConf.to_yaml(OmegaConf.structured(ExhaustiveConfig)))
        return 0
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        run_command(parse_args(argv), "python -m collide.exhaustive " + shlex.join(argv))
    except CollideError as exc:
        print(f"collide: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("collide: error: interrupted; finished sets and complete shards are kept: rerun the same command "
              "to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
