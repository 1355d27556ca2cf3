"""``python -m collide.report RUN_DIR ...``: the old name of ``collide compare``.

Its old flags still work: ``--absolute`` is ``depth_axis=absolute``, ``--out DIR`` is ``out=DIR``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """``collide compare`` with the old flags translated; returns the exit status."""
    from collide.cli import main as cli_main

    rest, args = list(sys.argv[1:] if argv is None else argv), []
    while rest:
        arg = rest.pop(0)
        if arg == "--absolute":
            args.append("depth_axis=absolute")
        elif arg == "--out" and rest:
            args.append(f"out={rest.pop(0)}")
        elif arg.startswith("--out="):
            args.append("out=" + arg.split("=", 1)[1])
        else:
            args.append(arg)
    return cli_main(["compare", *args])


if __name__ == "__main__":
    sys.exit(main())
