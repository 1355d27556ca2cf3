"""The gate of ``make bench``: this commit's asv results against the previous recorded commit, factor 1.1.

    python benchmarks/gate.py --machine NAME [--commit HASH] [--factor 1.1]

Run after ``asv run --python=same --set-commit-hash=HEAD --machine NAME`` (the Makefile does both).
The baseline is the nearest first-parent ancestor of ``--commit`` (default HEAD) that has results
for ``NAME`` in ``benchmarks/results/asv/``; the comparison is ``asv compare``'s table (every suite
benchmark is a cost ratio, lower is better). Exit status 1 when a benchmark got worse by more than
the factor (asv's ``+``: a regression over 10%) or newly failed (``!``); 0 otherwise, also when no
ancestor has results yet (this run is then the first baseline). ``asv compare`` itself always
exits 0, hence this script.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FACTOR = 1.1


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def recorded_commits(results_dir: Path, machine: str) -> set[str]:
    """Full hashes of the commits with asv results for ``machine`` under ``results_dir``."""
    from asv.results import iter_results_for_machine

    return {r.commit_hash for r in iter_results_for_machine(str(results_dir), machine)}


def baseline_commit(commit: str, recorded: set[str]) -> str | None:
    """The nearest first-parent ancestor of ``commit`` (itself excluded) in ``recorded``, or None."""
    for ancestor in git("rev-list", "--first-parent", commit).splitlines()[1:]:
        if ancestor in recorded:
            return ancestor
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machine", required=True, help="asv machine name the results were recorded under")
    parser.add_argument("--commit", default="HEAD", help="the commit whose results are gated (default HEAD)")
    parser.add_argument("--factor", type=float, default=FACTOR, help="allowed cost ratio between the runs")
    parser.add_argument("--config", type=Path, default=REPO / "asv.conf.json")
    args = parser.parse_args(argv)

    from asv.commands.compare import Compare
    from asv.config import Config

    conf = Config.load(str(args.config))
    commit = git("rev-parse", args.commit)
    recorded = recorded_commits(Path(conf.results_dir), args.machine)
    if commit not in recorded:
        print(f"gate: no results for commit {commit[:8]} on machine {args.machine!r} in {conf.results_dir}; "
              "run `make bench` (asv run --set-commit-hash) first", file=sys.stderr)
        return 2
    base = baseline_commit(commit, recorded)
    if base is None:
        print(f"gate: no earlier commit has results on machine {args.machine!r}: nothing to compare, "
              f"{commit[:8]} is the first baseline")
        return 0
    print(f"gate: {commit[:8]} against {base[:8]} on machine {args.machine!r}, factor {args.factor}")
    worsened, _ = Compare.print_table(conf, base, commit, factor=args.factor, split=False, machine=args.machine,
                                      sort="name", commit_names={base: base[:8], commit: commit[:8]})
    if worsened:
        print(f"gate FAILED: a cost ratio rose by more than {args.factor - 1:.0%} (+) or a benchmark newly "
              f"failed (!) since {base[:8]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
