"""What every command shows on the terminal: rich tables, ``tqdm.auto`` progress bars, log lines.

One look for all commands: ``print_table`` for results, ``progress`` for long loops (on stderr,
disabled with ``progress=false`` keys), and ``setup_logging`` for the ``[time][module][level]``
log lines of ``logging.getLogger(__name__)`` loggers.
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def setup_logging() -> None:
    """INFO log lines on stderr (a no-op where logging is already configured, e.g. by Hydra)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


def progress(**kwargs):
    """A ``tqdm.auto`` progress bar (``total=``, ``unit=``, ``desc=``, ``disable=`` ... as tqdm takes them)."""
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, **kwargs)


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]], left: Sequence[str] = (),
                console=None) -> None:
    """A rich table on stdout (or ``console``): every column right-aligned but those named in ``left``."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in left else "right")
    for row in rows:
        table.add_row(*row)
    (console or Console()).print(table)


def say(markup: str, console=None) -> None:
    """One line of rich markup on stdout (or ``console``), e.g. ``"[red]collisions found[/red]: ..."``."""
    from rich.console import Console

    (console or Console()).print(markup, highlight=False, soft_wrap=True)
