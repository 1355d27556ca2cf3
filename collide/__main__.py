"""``python -m collide [overrides]`` is ``collide run [overrides]``; ``python -m collide COMMAND ...`` is ``collide COMMAND ...``."""

import sys

from collide.cli import COMMANDS, main

if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main(argv if argv and argv[0] in COMMANDS else ["run", *argv]))
