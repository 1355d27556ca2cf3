"""``make bench``: run the benchmark modules, keep their history, gate on ratios and exactness.

Each ``benchmarks/bench_*.py`` exposes ``run(quick: bool = True) -> dict`` returning
``{"ratios": {name: {"value", "better": "higher"|"lower", "target"}}, "exact": {name: value},
"figures": {name: float}}`` (see benchmarks/README.md). This script:

1. runs every module (or ``--only NAME``) in its own Python process, quick size unless ``--full``
   (a fresh process per module keeps peak-RSS figures and thread pools independent);
2. compares each result with the previous passing result of the same module, on the same machine
   (name, CPU, cores, GPU), in the same mode: the gate fails when a ratio is more than 10% worse
   (``--tolerance``) or when any ``exact`` entry changed or disappeared; absolute times are never gated
   (this machine is shared and noisy);
3. appends one JSON line per module to ``benchmarks/results/history.jsonl`` (machine, commit, date),
   writes ``results/latest.md`` and redraws ``results/history.png``;
4. exits 1 if the gate failed (or a module crashed), else 0.

``--accept`` records a failing run as the new baseline, after an intended change.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TOLERANCE = 0.10  # a ratio more than this fraction worse than its baseline fails the gate

# Runs one module in a fresh interpreter, as `python benchmarks/bench_X.py` would (its folder first on
# sys.path), and writes {"result": run(quick), "peak_rss_mib": ...} to the file named by argv[3].
DRIVER = """
import importlib.util, json, resource, sys
from pathlib import Path
path, mode, out = sys.argv[1:4]
sys.path.insert(0, str(Path(path).parent))
spec = importlib.util.spec_from_file_location(Path(path).stem, path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
result = module.run(quick=mode == "quick")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
Path(out).write_text(json.dumps({"result": result, "peak_rss_mib": peak}))
"""


@dataclass
class Finding:
    bench: str  # module name without "bench_"
    kind: str  # ratio | exact | target | error
    name: str  # the ratio / exact entry it is about ("" for a module error)
    message: str  # one line for the console and latest.md
    failed: bool  # True if this finding fails the gate


# --------------------------------------------------------------------------- running


def discover(bench_dir: Path, only: list[str] | None = None) -> dict[str, Path]:
    """{name: path} of bench_*.py in ``bench_dir``; ``only`` keeps the named ones (with or without "bench_")."""
    found = {p.stem.removeprefix("bench_"): p for p in sorted(Path(bench_dir).glob("bench_*.py"))}
    if only:
        wanted = [n.removeprefix("bench_").removesuffix(".py") for n in only]
        unknown = [n for n in wanted if n not in found]
        if unknown:
            sys.exit(f"run.py: error: no benchmark named {', '.join(unknown)}; choose from {', '.join(found)}")
        found = {n: found[n] for n in wanted}
    return found


def check_result(result: dict, name: str) -> None:
    """Raise ValueError naming the module and the bad entry if ``result`` breaks the module convention."""
    if not isinstance(result, dict) or set(result) - {"ratios", "exact", "figures"}:
        raise ValueError(f"bench_{name}.run() must return a dict with keys ratios, exact, figures; got {result!r:.200}")
    for key, ratio in result.get("ratios", {}).items():
        if not isinstance(ratio, dict) or not isinstance(ratio.get("value"), (int, float)) \
                or ratio.get("better") not in ("higher", "lower"):
            raise ValueError(f"bench_{name}: ratio {key!r} must be {{'value': float, 'better': 'higher'|'lower', "
                             f"'target': float|None}}; got {ratio!r}")


def run_module(path: Path, quick: bool) -> tuple[dict, float, float]:
    """(result, wall seconds, peak RSS MiB) of one module run in a fresh process; raises RuntimeError if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", DRIVER, str(path), "quick" if quick else "full", str(out)],
                              cwd=REPO, env={**os.environ, "MPLBACKEND": "Agg"})
        seconds = time.perf_counter() - start
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{path.name} exited with status {proc.returncode} (its traceback is above)")
        payload = json.loads(out.read_text())
    return payload["result"], seconds, payload["peak_rss_mib"]


def machine_info(name: str | None = None) -> dict:
    """The machine a result was measured on; results compare only between equal machines (see same_machine)."""
    sys.path.insert(0, str(REPO))
    from collide.report import hardware_info

    hw = hardware_info()
    return {"name": name or socket.gethostname(), "cpu": hw["cpu"], "cores": hw["cores"], "gpu": hw["gpu"]}


def same_machine(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("name", "cpu", "cores", "gpu"))


# --------------------------------------------------------------------------- history and gate


def load_history(path: Path) -> list[dict]:
    """The history records, oldest first (one JSON object per line)."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def baseline(history: list[dict], bench: str, machine: dict, mode: str) -> dict | None:
    """The latest passing (or accepted) record of ``bench`` on ``machine`` in ``mode``, or None."""
    for record in reversed(history):
        if record["bench"] == bench and record["mode"] == mode and record["gate"] in ("pass", "accepted") \
                and same_machine(record["machine"], machine):
            return record
    return None


def _worse_by(value: float, previous: float, better: str) -> float:
    """How much worse ``value`` is than ``previous``, as a fraction of |previous| (negative = better)."""
    if previous == 0:  # no scale to compare against: any move in the bad direction counts as infinitely worse
        moved_worse = value < 0 if better == "higher" else value > 0
        return float("inf") if moved_worse else (0.0 if value == 0 else -float("inf"))
    change = (value - previous) / abs(previous)
    return -change if better == "higher" else change


def gate(bench: str, result: dict, previous: dict | None, tolerance: float = TOLERANCE) -> list[Finding]:
    """Compare ``result`` with the baseline record ``previous``: ratio regressions and exactness changes fail."""
    findings = []
    prev_ratios = previous["ratios"] if previous else {}
    prev_exact = previous["exact"] if previous else {}
    for name, ratio in result.get("ratios", {}).items():
        value, better, target = float(ratio["value"]), ratio["better"], ratio.get("target")
        if name not in prev_ratios:
            findings.append(Finding(bench, "ratio", name, f"{value:.4g} (no baseline yet)", False))
        else:
            before = float(prev_ratios[name]["value"])
            worse = _worse_by(value, before, better)
            failed = worse > tolerance
            findings.append(Finding(bench, "ratio", name, f"{value:.4g} vs {before:.4g} ({better} is better): "
                                    f"{'worse' if worse > 0 else 'better'} by {abs(worse):.1%}"
                                    + (f" > {tolerance:.0%}: REGRESSION" if failed else ""), failed))
        if target is not None and (value < target if better == "higher" else value > target):
            findings.append(Finding(bench, "target", name, f"{value:.4g} misses its target {target:g}", False))
    for name in sorted(set(prev_ratios) - set(result.get("ratios", {}))):
        findings.append(Finding(bench, "ratio", name, "no longer measured", False))
    exact = result.get("exact", {})
    for name, value in exact.items():
        before = prev_exact.get(name)
        if name in prev_exact and (type(value) is not type(before) or value != before):
            findings.append(Finding(bench, "exact", name, f"{value!r}, was {before!r}: EXACTNESS CHANGED", True))
        else:
            note = "" if name in prev_exact else " (new)"
            findings.append(Finding(bench, "exact", name, f"{value!r}{note}", False))
    for name in sorted(set(prev_exact) - set(exact)):
        findings.append(Finding(bench, "exact", name, f"missing, was {prev_exact[name]!r}: EXACTNESS LOST", True))
    return findings


# --------------------------------------------------------------------------- output


def render_latest(records: list[dict], findings: list[Finding], machine: dict) -> str:
    """latest.md: this run's ratios, exactness entries and figures, with the machine named."""
    gpu = f", {machine['gpu']}" if machine["gpu"] else ""
    lines = [f"# Latest benchmark run", "",
             f"Machine `{machine['name']}` ({machine['cpu']}, {machine['cores']} cores{gpu}); "
             f"commit {(records[0]['commit'] or 'unknown')[:12]}{' (dirty)' if records[0]['dirty'] else ''}; "
             f"{records[0]['date']}; {records[0]['mode']} mode. Reproduce: `make bench`"
             f"{' ARGS=--full' if records[0]['mode'] == 'full' else ''}.", "",
             "| benchmark | kind | name | result | gate |", "|---|---|---|---|---|"]
    for f in findings:
        lines.append(f"| {f.bench} | {f.kind} | {f.name} | {f.message} | {'**FAIL**' if f.failed else 'ok'} |")
    lines += ["", "Informational figures (absolute, not gated):", "",
              "| benchmark | figure | value |", "|---|---|---:|"]
    for r in records:
        figures = {**r.get("figures", {}), "module_wall_seconds": r["seconds"],
                   "module_peak_rss_mib": r["peak_rss_mib"]}
        lines += [f"| {r['bench']} | {k} | {v:.4g} |" for k, v in figures.items() if v is not None]
    return "\n".join(lines) + "\n"


def print_findings(findings: list[Finding]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="benchmark gate (ratios vs the previous passing run on this machine)")
    for col in ("benchmark", "kind", "name", "result", "gate"):
        table.add_column(col, overflow="fold")  # full names in logs too, however narrow the console
    for f in findings:
        table.add_row(f.bench, f.kind, f.name, f.message, "[red]FAIL[/red]" if f.failed else "ok")
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="nightly size (default: quick, about a minute each)")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only bench_NAME.py (repeatable)")
    parser.add_argument("--machine", help="machine name in the history (default: the hostname)")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results", help="history folder")
    parser.add_argument("--bench-dir", type=Path, default=BENCH_DIR, help="folder holding bench_*.py")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="allowed fraction a ratio may worsen")
    parser.add_argument("--no-save", action="store_true", help="do not append to the history")
    parser.add_argument("--accept", action="store_true", help="record this run as the new baseline even if it fails")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from collide.report import git_commit

    modules = discover(args.bench_dir, args.only)
    mode = "full" if args.full else "quick"
    machine = machine_info(args.machine)
    results_rel = os.path.relpath(args.results.resolve(), REPO)
    commit, dirty = git_commit(REPO, ignore=(results_rel,) if not results_rel.startswith("..") else ())
    history_file = args.results / "history.jsonl"
    history = load_history(history_file)
    records, findings = [], []
    for name, path in modules.items():
        print(f"== bench_{name} ({mode})", flush=True)
        record = {"bench": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit,
                  "dirty": dirty, "machine": machine, "mode": mode}
        try:
            result, seconds, peak = run_module(path, quick=not args.full)
            check_result(result, name)
        except (RuntimeError, ValueError) as exc:
            findings.append(Finding(name, "error", "", str(exc), True))
            records.append({**record, "seconds": None, "peak_rss_mib": None, "ratios": {}, "exact": {},
                            "figures": {}, "error": str(exc), "gate": "fail"})
            continue
        found = gate(name, result, baseline(history, name, machine, mode), args.tolerance)
        findings += found
        failed = any(f.failed for f in found)
        records.append({**record, "seconds": round(seconds, 2), "peak_rss_mib": round(peak, 1),
                        "ratios": result.get("ratios", {}), "exact": result.get("exact", {}),
                        "figures": result.get("figures", {}),
                        "gate": ("accepted" if args.accept else "fail") if failed else "pass"})
    print_findings(findings)
    if not args.no_save and records:
        from collide.figures import history_figure

        args.results.mkdir(parents=True, exist_ok=True)
        with history_file.open("a") as fh:
            for record in records:
                fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        (args.results / "latest.md").write_text(render_latest(records, findings, machine))
        mine = [r for r in load_history(history_file) if r["mode"] == mode and same_machine(r["machine"], machine)]
        gpu = f", {machine['gpu']}" if machine["gpu"] else ""
        history_figure(mine, args.results / "history.png",
                       f"collide benchmarks on {machine['name']} ({machine['cpu']}, {machine['cores']} cores{gpu}), "
                       f"{mode} mode")
        print(f"history: {history_file} ({len(records)} records added), {args.results / 'history.png'}")
    failed = [f for f in findings if f.failed]
    if failed and not args.accept:
        print(f"benchmark gate FAILED: {len(failed)} finding(s); after an intended change rerun with --accept",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
