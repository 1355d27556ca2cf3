"""``python -m collide.invert ...``: the old name of ``collide invert``."""

import sys

from collide.cli import main

if __name__ == "__main__":
    sys.exit(main(["invert", *sys.argv[1:]]))
