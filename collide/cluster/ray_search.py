"""The certified search of one store layer on Ray: ``search_store_ray``.

The layer's rows are cut into blocks exactly as ``collide.search.search_store`` cuts them
(``search.block_rows`` rows of the store, NaN/Inf rows left out), and consecutive blocks are
grouped into panels of ``cluster.panel_blocks`` blocks. Two rounds of units on the run's warm
workers (``collide.cluster.pool``: actors that imported torch once and open each store once):

1. **scan**, one unit per panel: its prompt ids, valid and invalid rows, and one fp64 sum per
   block; the driver adds the block sums in block order, as the local pass does, so the mean
   ``mu`` that centres the GEMM operands is bit-identical to a local search's.
2. **tiles**, one unit per panel pair (P, Q), P <= Q (the upper triangle): the worker reads its two
   panels from the store's Parquet files itself (``Store.select_range``, each file sha256-checked
   once per worker), and screens every block pair of P x Q with ``PairSearch.screen``, the local
   engine: the same GEMM bound, fp64 re-ranks and per-row nearest-neighbour certification. The
   tile starts from the driver's current nearest-neighbour distances of its rows (exact
   distances of real pairs, so they only prune; they never hide a closer pair).

At most ``cluster.num_workers`` x 2 units are in flight (the second one of a worker reads its
panels while the first computes), and partial results are reduced as they arrive: each row's
nearest-neighbour distance is the minimum over the tiles that hold it (every pair of rows lies
in exactly one tile), the minimum pair is the smallest (distance, i, j) over tiles, collisions are
the union. All three are certified per tile, so the result equals the local search's: minimum,
pair, collisions and every nn distance bitwise, and ``certified``; ``n_candidates`` may differ (a
tile sees fewer neighbours when it starts).

A tile or scan unit is a pure read: the unit of a lost worker simply runs again on the restarted
worker (``cluster.max_retries`` restarts).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import ray
import torch

from collide.cluster.pool import Unit, worker_pool
from collide.cluster.session import chaos_point, ray_session
from collide.config import ClusterConfig, SearchConfig
from collide.errors import CollideError
from collide.search.api import LayerResult, _check, _result, _search_context, pick_backend, \
    resolve_device
from collide.search.blocks import as_tensor, finite_rows, make_block, right_operand, row_norms, sum_rows
from collide.search.nearest import nearest_mode
from collide.search.symmetric import NO_ROW, PairSearch

log = logging.getLogger(__name__)

@dataclass
class BlockSpec:
    """One search block: store rows [start, stop) of the view, its valid rows, its engine start."""

    start: int  # first row (0 = the view's first prompt) of the block
    stop: int  # one past its last row
    valid: np.ndarray  # (b,) int64 rows of the block (relative to start) searched: kept and without NaN/Inf
    engine: int  # engine index of its first valid row (valid rows of earlier blocks)


def _read(view, layer: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids, float32 states) of rows [start, stop) of a store view."""
    part = view.select_range(view.first_id + start, view.first_id + stop)
    return next(part.iter_blocks(layer, stop - start))


def scan_panel(worker, path: str, first_id: int, stop_id: int, layer: int, start: int, stop: int, block_rows: int):
    """Unit, pass 1 for rows [start, stop) of the view: (ids, [(valid rows, invalid rows, fp64 sum, L2 norms of the
    valid rows)] per block)."""
    ids, states = _read(worker.store(path).select_range(first_id, stop_id), layer, start, stop)
    blocks = []
    with worker.compute:
        for s in range(0, stop - start, block_rows):
            xb = as_tensor(states[s:s + block_rows])
            valid = finite_rows(xb, block_rows)
            blocks.append((torch.nonzero(valid)[:, 0].numpy(), torch.nonzero(~valid)[:, 0].numpy(),
                           sum_rows(xb[valid], block_rows).numpy(), row_norms(xb[valid], block_rows).numpy()))
    return ids, blocks


def search_tile(worker, path: str, first_id: int, stop_id: int, layer: int, panel_p: list[BlockSpec],
                panel_q: list[BlockSpec] | None, mu: np.ndarray, nn_seed: np.ndarray, tau_seed: float,
                threshold: float, cfg: dict, budget: int, threads: int, tag: str):
    """Unit: screen every pair of rows in panels P x Q with the local engine (``panel_q=None``: the pairs
    within P, each once). The panels are read before the worker's compute lock is taken.

    ``nn_seed``: squared exact nn distances known so far for the rows of P then Q, engine order;
    ``tau_seed``: the smallest squared exact distance known so far (used with ``nearest`` off).
    Returns the partial result that ``_Reduction.merge`` takes.
    """
    view = worker.store(path).select_range(first_id, stop_id)
    dev = resolve_device(cfg["device"])
    same = panel_q is None
    specs = panel_p if same else panel_p + panel_q
    read = []
    for spec in specs:
        _, states = _read(view, layer, spec.start, spec.stop)
        read.append(states if len(spec.valid) == len(states) else states[spec.valid])
    chaos_point(tag)
    with worker.compute, _search_context(dev, cfg["precision"], threads):
        mu_t = torch.from_numpy(mu).to(dev)
        blocks, local = [], 0
        for spec, states in zip(specs, read):
            xv = as_tensor(states).to(dev)
            blocks.append(make_block(xv, torch.from_numpy(spec.valid + spec.start).to(dev), local, mu_t))
            local += len(spec.valid)
        state = PairSearch(local, view.d, dev, threshold, cfg["precision"], budget, cfg["block_rows"],
                           nearest=cfg["nearest"])
        if cfg["nearest"]:
            state.nn_exact.copy_(torch.tensor(nn_seed))
        else:  # minimum and collisions only: prune with the best exact distance known so far
            state.tau = tau_seed
        for blk in blocks:
            state.centred2[blk.index] = blk.norm2
        left, right = blocks[:len(panel_p)], blocks if same else blocks[len(panel_p):]
        for jb, bj in enumerate(right):
            rhs = right_operand(bj.left, view.d)
            for ib, bi in enumerate(left):
                if same and ib >= jb:
                    break
                state.screen(bi, bj, rhs, "cross")
            if same:
                state.screen(bj, bj, rhs, "diag")
        return dict(tau=state.tau, pair=state.pair, coll=state.coll, nn=state.nn_exact.cpu().numpy(),
                    nn_row=state.nn_row.cpu().numpy(), centred2=state.centred2.cpu().numpy(),
                    n_candidates=state.n_candidates, n_skipped=state.n_skipped, reason=state.reason,
                    gemm_s=state.gemm_s)


def _engine_rows(panel: list[BlockSpec]) -> np.ndarray:
    """Engine indices of the valid rows of a panel's blocks, in order."""
    return np.concatenate([np.arange(b.engine, b.engine + len(b.valid)) for b in panel] or [np.empty(0, np.int64)])


class _Reduction:
    """The running merge of tile results, held in a PairSearch so that the local ``_result`` builds the answer."""

    def __init__(self, m: int, d: int, threshold: float, cfg: SearchConfig):
        self.state = PairSearch(m, d, torch.device("cpu"), threshold, cfg.precision, cfg.max_candidates, 1,
                                nearest=nearest_mode(cfg.nearest) != "none")
        self.nn = np.full(m, math.inf)  # squared exact nn distance per engine row, so far
        self.nn_row = np.full(m, NO_ROW, np.int64)  # its nearest neighbour's row (smallest among exact ties)
        self.centred2 = np.full(m, math.nan)  # its squared centred norm (blocks.centred_sq_norms)

    def merge(self, part: dict, rows: np.ndarray) -> None:
        st = self.state
        d2, row = part["nn"], part["nn_row"]  # a panel pair's rows are distinct: plain fancy indexing
        self.centred2[rows] = part["centred2"]  # the same values from every tile that holds a row
        better = (d2 < self.nn[rows]) | ((d2 == self.nn[rows]) & (row < self.nn_row[rows]))
        self.nn[rows[better]], self.nn_row[rows[better]] = d2[better], row[better]
        if part["pair"] is not None and (part["tau"], part["pair"]) < (st.tau, st.pair or (math.inf,)):
            st.tau, st.pair = part["tau"], part["pair"]
        st.coll.extend(part["coll"])
        st.n_candidates += part["n_candidates"]
        st.n_skipped += part["n_skipped"]
        st.reason = st.reason or part["reason"]
        st.gemm_s += part["gemm_s"]

    def finish(self) -> PairSearch:
        self.state.nn_exact, self.state.nn_row = torch.from_numpy(self.nn), torch.from_numpy(self.nn_row)
        self.state.centred2 = torch.from_numpy(self.centred2)
        return self.state


def _panels(pool, view, layer: int, block_rows: int, panel_rows: int):
    """Scan round: (prompt ids, valid rows, invalid rows, mu, panels of BlockSpecs, L2 norms of the valid rows)."""
    path, first, stop = str(view.path.resolve()), view.first_id, view.stop_id
    bounds = [(s, min(s + panel_rows, view.n_rows)) for s in range(0, view.n_rows, panel_rows)]
    parts = dict(pool.run(Unit(i, scan_panel, (path, first, stop, layer, a, b, block_rows),
                               f"scan of rows {a}..{b - 1}") for i, (a, b) in enumerate(bounds)))
    total = torch.zeros(view.d, dtype=torch.float64)
    ids, valid_rows, invalid_rows, norms, panels, engine = [], [], [], [], [], 0
    for i, (a, _) in enumerate(bounds):
        p_ids, blocks = parts[i]
        ids.append(p_ids)
        panel = []
        for n, (valid, invalid, block_sum, block_norms) in enumerate(blocks):
            start = a + n * block_rows
            total += torch.tensor(block_sum)  # block by block, in order: the local pass's additions
            valid_rows.append(valid + start)
            invalid_rows.append(invalid + start)
            norms.append(block_norms)
            if len(valid):
                panel.append(BlockSpec(start, min(start + block_rows, view.n_rows), valid.astype(np.int64), engine))
                engine += len(valid)
        if panel:
            panels.append(panel)
    cat = lambda parts: np.concatenate(parts) if parts else np.empty(0, np.int64)  # noqa: E731
    valid_rows = cat(valid_rows)
    return (cat(ids), valid_rows, cat(invalid_rows), (total / max(len(valid_rows), 1)).numpy(), panels,
            np.concatenate(norms) if norms else np.empty(0))


def search_store_ray(store, layer: int, threshold: float, search_cfg: SearchConfig,
                     cluster_cfg: ClusterConfig) -> LayerResult:
    """``collide.search.search_store`` on a Ray cluster: the same LayerResult (see the module docstring).

    ``store``: an opened store (or a view of one) on storage every Ray node mounts at the same
    path. Only the torch engine is distributed; ``search.backend=faiss`` is refused. The search runs on
    the run's warm workers (``collide.cluster.pool``): one scan unit per panel, one tile unit per panel pair.
    """
    tic = time.perf_counter()
    if pick_backend(search_cfg.backend, search_cfg.device) != "torch":
        raise CollideError("search.backend=faiss does not run on a Ray cluster; use search.backend=auto (or torch) "
                           "with cluster=ray, or cluster=local for the faiss engine")
    _check(threshold, search_cfg.block_rows, search_cfg.precision, search_cfg.k, search_cfg.max_k,
           search_cfg.max_candidates, torch.device("cuda" if cluster_cfg.gpus_per_worker else "cpu"))
    if cluster_cfg.panel_blocks < 1:
        raise CollideError(f"cluster.panel_blocks={cluster_cfg.panel_blocks} must be >= 1")
    block_rows = search_cfg.block_rows
    cfg = dict(device=search_cfg.device, precision=str(search_cfg.precision), block_rows=block_rows,
               nearest=nearest_mode(search_cfg.nearest) != "none")  # auto: every row (brute-force panels)
    threads = search_cfg.threads or max(1, int(cluster_cfg.cpus_per_worker))
    with ray_session(cluster_cfg, store.path):
        pool = worker_pool(cluster_cfg)
        prompt_ids, valid_rows, invalid_rows, mu, panels, norms = _panels(
            pool, store, layer, block_rows, block_rows * cluster_cfg.panel_blocks)
        red = _Reduction(len(valid_rows), store.d, threshold, search_cfg)
        pairs = [(p, q) for q in range(len(panels)) for p in range(q + 1)]
        engine = [_engine_rows(panel) for panel in panels]
        path, first, stop, mu_ref = str(store.path.resolve()), store.first_id, store.stop_id, ray.put(mu)
        bar = None
        if search_cfg.progress:
            from collide.console import progress

            bar = progress(total=len(pairs), unit="tile", desc=f"layer {layer} tiles")

        def units():  # read lazily: each tile starts from the nn distances merged so far
            for p, q in pairs:
                rows = engine[p] if p == q else np.concatenate([engine[p], engine[q]])
                budget = max(search_cfg.max_candidates - red.state.n_candidates, 0)
                yield Unit(rows, search_tile, (path, first, stop, layer, panels[p], None if p == q else panels[q],
                                               mu_ref, red.nn[rows], red.state.tau, threshold, cfg, budget, threads,
                                               f"tile-{p}-{q}"), f"tile ({p}, {q}) of layer {layer}")

        for rows, part in pool.run(units()):
            red.merge(part, rows)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    res = _result(red.finish(), len(prompt_ids), valid_rows, invalid_rows, "torch", tic, norms)
    return LayerResult(layer=layer, prompt_ids=prompt_ids, result=res)
