"""Joining a Ray cluster, checking that every node sees the store, and Ray failures as one-line errors.

``ray_session(cluster_cfg, store_path)`` joins the cluster (``cluster.address``: ``auto``, a running
cluster or else a local instance; a ``ray://`` client address; or None for a Ray instance in this
process), or reuses the Ray
session this process is already in, and checks that every alive node can read and write
``store_path`` (one zero-CPU task pinned to each node): a store that some node cannot reach is a
one-line CollideError before any work starts.

Chaos switch (for fault tests, and for anyone who wants to see what a lost worker does): when
the environment variable ``COLLIDE_CHAOS`` names a directory, a worker reaching the unit
``TAG`` (``shard-3``, ``tile-0-1``, ``invert-KEY``) while ``$COLLIDE_CHAOS/TAG.kill`` exists renames that file
(only one process can) and SIGKILLs itself; with ``TAG.hang`` it writes its node id into
``TAG.hung`` and blocks until its node is removed. Without the variable nothing happens.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from collide.config import ClusterConfig
from collide.errors import CollideError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 120  # seconds every node gets to answer the store check (a busy node queues it)
CHAOS_ENV = "COLLIDE_CHAOS"  # directory of chaos files, see the module docstring
_CHECKED: set = set()  # (session, directory, alive nodes) whose reachability was checked


@contextlib.contextmanager
def ray_session(cfg: ClusterConfig, store_path: str | os.PathLike | None):
    """Join (or reuse) a Ray session and check ``store_path`` from every node (None: a stage whose files only
    the driver reads and writes).

    The session stays joined for the rest of the process (a run extracts, then searches every
    layer: one join, one local instance, one pool of warm workers), and Ray leaves it at exit. The
    check runs once per directory while the cluster's nodes stay the same.
    """
    if not ray.is_initialized():
        join(cfg)
    if store_path is None:
        yield
        return
    path = Path(store_path).resolve()
    context = ray.get_runtime_context()
    key = (context.get_job_id(), context.get_node_id(), str(path),
           frozenset(n["NodeID"] for n in ray.nodes() if n.get("Alive")))
    if key not in _CHECKED:  # once per session, directory and set of nodes (a node that joins is checked)
        check_reachable(path)
        _CHECKED.add(key)
    yield


def join(cfg: ClusterConfig) -> None:
    """``ray.init`` as ``cluster.address`` says, with one log line saying what it did.

    ``auto`` joins a running cluster (``ray start``) and, where none runs, starts a local Ray instance
    in this process, as ``ray.init()`` does; None always starts a local instance; any other address
    (``ray://host:10001``, ``host:6379``) must answer, or the run stops with one line.
    """
    def start_local() -> None:  # no dashboard: it would serve on the network
        ray.init(address="local", log_to_driver=True, include_dashboard=False,
                 object_store_memory=int(cfg.object_store_mb) << 20 or None)

    try:
        if not cfg.address:
            start_local()
            log.info("cluster.address=null: started a local Ray instance in this process")
            return
        try:
            ray.init(address=cfg.address, log_to_driver=True)
            log.info("cluster.address=%s: joined the Ray cluster (%d nodes)", cfg.address,
                     sum(1 for n in ray.nodes() if n.get("Alive")))
        except ConnectionError:
            if cfg.address != "auto":
                raise
            start_local()
            log.info("cluster.address=auto: no running Ray cluster found, started a local Ray instance in this "
                     "process")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise CollideError(f"cannot join the Ray cluster at cluster.address={cfg.address!r}: "
                           f"{str(exc).splitlines()[0]}; start it with `ray start --head`, fix the address, "
                           "or set cluster.address=auto to start a local Ray instance when none runs") from None


@ray.remote(num_cpus=0, max_retries=0)
def _probe(path: str, name: str) -> str | None:
    """On one node: None if ``path`` holds the probe file ``name`` and is writable, else what is wrong."""
    if not os.path.isfile(os.path.join(path, name)):
        return f"{path} does not hold the probe file the driver wrote there (not the same storage)"
    if not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None


def check_reachable(path: Path) -> None:
    """CollideError naming the first Ray node that cannot read and write the directory ``path``."""
    path = path.resolve()
    name = f".collide-probe-{uuid.uuid4().hex}"
    probe = path / name
    try:
        probe.write_text("collide store probe\n")
    except OSError as exc:
        raise CollideError(f"cannot write {probe} ({exc.strerror}); set store.path to a writable directory on "
                           "storage every Ray node mounts") from None
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = {_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(path), name): n for n in nodes}
        done, late = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        for ref in late:
            raise CollideError(f"Ray node {refs[ref]['NodeManagerAddress']} did not answer the store check within "
                               f"{PROBE_TIMEOUT_S} s; check `ray status` and that node's logs")
        for ref in done:
            problem = ray.get(ref)
            if problem:
                raise CollideError(f"the store {path} is not reachable from Ray node "
                                   f"{refs[ref]['NodeManagerAddress']}: {problem}; put the store on storage every "
                                   "node mounts at the same path (NFS, Lustre, a cloud file system) and point "
                                   "store.path at it")
    finally:
        probe.unlink(missing_ok=True)


def remote_options(cfg: ClusterConfig) -> dict:
    """Resources of one worker (a Ray actor of ``collide.cluster.pool``), and Ray's retry options:
    ``max_restarts`` restarts of a lost actor, and its calls retried for as long as it can restart (a
    call that fails while a dead node is not yet detected must not use up the budget: only losses count).
    """
    if cfg.num_workers < 1 or cfg.cpus_per_worker < 0 or cfg.gpus_per_worker < 0 or cfg.max_retries < 0:
        raise CollideError(f"cluster.num_workers={cfg.num_workers} must be >= 1 and cluster.cpus_per_worker, "
                           "cluster.gpus_per_worker, cluster.max_retries >= 0")
    return dict(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker, max_restarts=cfg.max_retries,
                max_task_retries=-1)


def task_failed(exc: Exception, what: str, max_retries: int | None = None) -> CollideError:
    """The one-line CollideError for a Ray failure while running ``what`` (a CollideError raised
    on the worker is passed through as it is)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, CollideError):
        return cause
    if isinstance(exc, ray.exceptions.RayTaskError):
        first = str(cause).splitlines()[0] if cause is not None else type(exc).__name__
        return CollideError(f"{what} failed on a Ray worker: {type(cause).__name__}: {first}")
    retries = f" after cluster.max_retries={max_retries} retries" if max_retries is not None else ""
    return CollideError(f"{what}: a Ray worker or node was lost{retries} ({type(exc).__name__}); check `ray status` "
                        "and the nodes' logs, raise cluster.max_retries, and rerun the same command (a store "
                        "resumes from its complete shards)")


def chaos_point(tag: str) -> None:
    """Kill or hang this worker at unit ``tag`` if ``$COLLIDE_CHAOS`` asks for it (module docstring)."""
    directory = os.environ.get(CHAOS_ENV)
    if not directory:
        return
    base = Path(directory) / tag
    with contextlib.suppress(FileNotFoundError):
        os.rename(f"{base}.kill", f"{base}.killed")
        os.kill(os.getpid(), signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        os.rename(f"{base}.hang", f"{base}.hung.tmp")
        Path(f"{base}.hung.tmp").write_text(ray.get_runtime_context().get_node_id())
        os.rename(f"{base}.hung.tmp", f"{base}.hung")
        while True:
            time.sleep(1)
