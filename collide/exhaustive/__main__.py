"""``python -m collide.exhaustive RUN_DIR [key=value ...]`` = ``collide exhaustive RUN_DIR ...`` (collide.cli)."""

from collide.cli import module_main

if __name__ == "__main__":
    module_main("exhaustive")
