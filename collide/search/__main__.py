"""``python -m collide.search ...``: the old name of ``collide search``."""

import sys

from collide.cli import main

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
