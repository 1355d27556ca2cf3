"""The subcommands of ``collide``: one module each, holding its schema (or naming the stage's) and its
one ``run(cfg, command)``.

``collide.cli`` registers these functions; each composes nothing itself and prints its own results
through ``collide.console``. The stages they call (``collide.pipeline``, ``collide.search``,
``collide.exhaustive``, ``collide.invert``, ``collide.experiments``, ``collide.report``) never
import a command or the CLI.
"""
