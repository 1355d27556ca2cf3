"""Running a command where nothing can leave the machine: a loopback-only network namespace.

Ray looks for its node address by reaching towards a public DNS server and otherwise binds the
machine's external interface. Tests and benchmarks that start Ray therefore run inside a fresh
network namespace (``unshare -n``, loopback up): Ray binds 127.0.0.1 and no packet can leave.
``run_isolated`` also gives the command its own HOME (Ray 2.60 writes ~/.ray/auth_token there)
and RAY_TMPDIR, and removes both afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def namespace_problem() -> str | None:
    """Why a loopback-only network namespace cannot be made here (or ray is missing), or None."""
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install 'collide[ray]')"
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return "a loopback-only network namespace needs root, unshare and ip (Ray must not reach the network here)"
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -n failed here: {probe.stderr.strip()[:200]}"
    return None


def run_isolated(argv: list[str], cwd: str | os.PathLike, timeout: float, env: dict | None = None
                 ) -> subprocess.CompletedProcess:
    """Run ``argv`` in a new loopback-only network namespace with a scratch HOME and RAY_TMPDIR (removed
    afterwards), Ray's usage statistics off; returns the completed process (text output captured)."""
    scratch = Path(tempfile.mkdtemp(prefix="collide-ray-"))  # short: Ray's socket paths live under it
    (scratch / "home").mkdir()
    (scratch / "ray").mkdir()
    env = dict(os.environ if env is None else env, HOME=str(scratch / "home"), RAY_TMPDIR=str(scratch / "ray"),
               RAY_USAGE_STATS_ENABLED="0")
    try:
        return subprocess.run(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv], cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
