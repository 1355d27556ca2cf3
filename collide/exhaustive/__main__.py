"""``python -m collide.exhaustive ...``: the old name of ``collide exhaustive``."""

import sys

from collide.cli import main

if __name__ == "__main__":
    sys.exit(main(["exhaustive", *sys.argv[1:]]))
