"""The Ray tests (tests/cluster) run here, inside a network namespace that holds only loopback.

Ray looks for its node address by reaching towards a public DNS server and otherwise binds the
machine's external interface; in a fresh namespace (``unshare -n``, loopback up) nothing can
leave the machine, and Ray binds 127.0.0.1. The inner pytest gets its own HOME (Ray writes its
token to ~/.ray/auth_token) and RAY_TMPDIR, both removed afterwards. Skipped, with the reason,
where no namespace can be made (not root, no unshare) or ray is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INNER_TIMEOUT_S = 900  # the inner suite takes a few minutes on 2 cores


def namespace_problem() -> str | None:
    """Why a loopback-only network namespace cannot be made here, or None."""
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install 'collide[ray]')"
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return "a loopback-only network namespace needs root, unshare and ip (the Ray tests must not reach the network)"
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -n failed here: {probe.stderr.strip()[:200]}"
    return None


def test_cluster_local_never_imports_ray():
    code = ("import sys, collide.cluster, collide.extract, collide.search, collide.__main__; "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_ray_suite_in_a_loopback_only_namespace():
    problem = namespace_problem()
    if problem:
        pytest.skip(problem)
    token = Path.home() / ".ray" / "auth_token"
    token_before = token.exists()
    scratch = Path(tempfile.mkdtemp(prefix="collide-ray-"))  # short: Ray's socket paths live under it
    env = dict(os.environ, HOME=str(scratch / "home"), RAY_TMPDIR=str(scratch / "ray"), RAY_USAGE_STATS_ENABLED="0",
               COLLIDE_RAY_NETNS="1", PYTHONDONTWRITEBYTECODE="1")
    (scratch / "home").mkdir()
    (scratch / "ray").mkdir()
    inner = 'ip link set lo up && exec "$0" -m pytest -q -p no:cacheprovider --basetemp="$1" tests/cluster'
    try:
        proc = subprocess.run(["unshare", "-n", "sh", "-c", inner, sys.executable, str(scratch / "pytest")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=INNER_TIMEOUT_S)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert proc.returncode == 0, f"the Ray tests failed inside the namespace:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-2000:]
    assert token.exists() == token_before  # no Ray token left in the real home
