"""Warm Ray workers shared by every stage of a run: ``worker_pool(cfg)`` and ``Pool.run``.

One Ray actor per worker (``cluster.num_workers`` of them, each holding ``cluster.cpus_per_worker``
CPUs and ``cluster.gpus_per_worker`` GPUs) lives as long as the driver's Ray session: extraction,
every layer's search and inversion run on the same actors. An actor imports torch and collide's
stages once, when it starts; opens each store once (``Worker.store``, opened again only when the
store's manifest changes, so each file's sha256 is checked once per worker); loads a model on first
use (``Worker.model``), keeping it until a unit asks for another config; and keeps what a unit
builds on that model (``Worker.cached``: an inverter with its lens).

A unit of work is a module-level function ``fn(worker, *args)`` of a stage module (``ray_extract``,
``ray_search``, ``ray_invert``). ``Pool.run`` sends units to the actors, at most
IN_FLIGHT_PER_WORKER per actor and the least busy actor first, and yields each result as it
finishes. Two units may run at once in one actor (one reading or writing while the other computes);
a unit takes ``Worker.compute`` around its heavy part, so one computes at a time.

Faults: a lost actor (its process or its node) is restarted, on another node if need be, up to
``cluster.max_retries`` times, and the calls it held run again there (every unit is idempotent: a
pure read, or files rewritten with the same bytes under the same names). Past that, or when a unit
raises, the run stops with one line naming the unit (``session.task_failed``) and the pool's actors
are killed (the next stage or run starts fresh ones).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

import ray

from collide.cluster.session import remote_options, task_failed
from collide.config import ClusterConfig, ModelConfig

log = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2  # units given to an actor at once: one computing, one reading its inputs or writing
WARM_IMPORTS = ("collide.extract", "collide.search.api", "collide.invert.sipit")  # torch and the stages


class Worker:
    """The state of one warm actor: a compute lock, its open stores, its model (see the module docstring)."""

    def __init__(self):
        for module in WARM_IMPORTS:  # imported once, when the actor starts, not by its first unit
            importlib.import_module(module)
        self.compute = threading.Lock()  # held by a unit around its heavy part: one computes at a time
        self._lock = threading.RLock()  # guards the caches below (a ``cached`` maker may load the model)
        self._stores: dict = {}  # store path -> (manifest (mtime_ns, size), Store)
        self._model: tuple[str, Any] | None = None  # (config key, LoadedModel)
        self._made: dict = {}  # key -> what a unit built on the model (an inverter with its lens); dropped with it

    def call(self, fn: Callable, *args):
        """Run the unit ``fn(self, *args)`` and return its result."""
        return fn(self, *args)

    def pid(self) -> int:
        """This actor's process id (tests and logs)."""
        return os.getpid()

    def store(self, path: str):
        """The store at ``path``, opened once per version of its manifest (a store rewritten or grown in place is
        opened again)."""
        from collide.store import MANIFEST, open_store

        stat = os.stat(os.path.join(path, MANIFEST))
        version = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._stores.get(path)
            if cached is None or cached[0] != version:
                cached = self._stores[path] = (version, open_store(path))
            return cached[1]

    def model(self, cfg: ModelConfig):
        """The model of ``cfg``, loaded on first use and kept (another config replaces it)."""
        from collide.models import load_model

        key = repr(asdict(cfg))
        with self._lock:
            if self._model is None or self._model[0] != key:
                self._model, self._made = None, {}  # the old model and what was built on it go before the new loads
                self._model = (key, load_model(cfg))
                log.info("worker %d loaded model %s", os.getpid(), cfg.name)
            return self._model[1]

    def cached(self, key: str, make: Callable):
        """``make()``, built once per ``key`` while the worker keeps its model (``make`` may call ``model``)."""
        with self._lock:
            if key not in self._made:
                self._made[key] = make()
            return self._made[key]


RayWorker = ray.remote(max_concurrency=IN_FLIGHT_PER_WORKER)(Worker)


@dataclass
class Unit:
    """One unit of work for ``Pool.run``."""

    tag: Any  # what the result is yielded with (a shard index, a tile, a prompt index)
    fn: Callable  # module-level function fn(worker, *args)
    args: tuple  # its arguments (large ones as ObjectRefs, resolved by Ray on the worker)
    what: str  # the unit in words, for a one-line error: "tile (0, 3) of layer 12"


class Pool:
    """The actors of one Ray session and resource shape."""

    def __init__(self, cfg: ClusterConfig, key: tuple):
        self.key = key  # (session, workers, CPUs, GPUs, retries): a pool serves only its own
        self.max_retries = cfg.max_retries  # restarts of a lost actor before the run stops
        opts = remote_options(cfg)
        self.actors = [RayWorker.options(**opts).remote() for _ in range(cfg.num_workers)]

    @property
    def size(self) -> int:
        return len(self.actors)

    def run(self, units: Iterable[Unit]) -> Iterator[tuple[Any, Any]]:
        """Yield ``(unit.tag, result)`` as units finish. ``units`` is read lazily, one unit whenever an actor has
        room, so a unit's arguments may depend on the results merged so far."""
        pending = iter(units)
        in_flight: dict = {}  # ref -> (actor slot, unit)
        load = [0] * len(self.actors)
        more = True
        while True:
            while more and len(in_flight) < IN_FLIGHT_PER_WORKER * len(self.actors):
                unit = next(pending, None)
                if unit is None:
                    more = False
                    break
                slot = load.index(min(load))
                load[slot] += 1
                in_flight[self.actors[slot].call.remote(unit.fn, *unit.args)] = (slot, unit)
            if not in_flight:
                return
            done, _ = ray.wait(list(in_flight), num_returns=1)
            slot, unit = in_flight.pop(done[0])
            load[slot] -= 1
            try:
                result = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - Ray wraps every remote failure
                self.close()  # the units still in flight stop; the next worker_pool starts fresh actors
                raise task_failed(exc, unit.what, self.max_retries) from None
            yield unit.tag, result

    def first(self, fn: Callable, *args, what: str):
        """Run one unit on the first actor and return its result."""
        for _, result in self.run([Unit(None, fn, args, what)]):
            return result

    def close(self) -> None:
        """Kill the actors (their resources go back to the cluster)."""
        for actor in self.actors:
            with contextlib.suppress(Exception):  # a session already shut down took them with it
                ray.kill(actor)
        self.actors = []


_POOL: Pool | None = None  # this process's pool


def worker_pool(cfg: ClusterConfig) -> Pool:
    """The warm pool of this Ray session for ``cfg``'s workers; another shape (or a new session) replaces it.

    Call inside ``session.ray_session``."""
    global _POOL
    context = ray.get_runtime_context()
    key = (context.get_job_id(), context.get_node_id(), cfg.num_workers, cfg.cpus_per_worker, cfg.gpus_per_worker,
           cfg.max_retries)
    if _POOL is None or _POOL.key != key or not _POOL.actors:
        close_pool()
        _POOL = Pool(cfg, key)
        log.info("started %d Ray workers (%g CPUs, %g GPUs each)", cfg.num_workers, cfg.cpus_per_worker,
                 cfg.gpus_per_worker)
    return _POOL


def close_pool() -> None:
    """Kill this process's pool, if any (the next ``worker_pool`` starts cold workers)."""
    global _POOL
    if _POOL is not None:
        _POOL.close()
        _POOL = None
