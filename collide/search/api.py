"""Public API of the certified search: min_pairwise (arrays), search_store (one layer of a store).

Conventions: distances are L2, not squared, computed in fp64 from the rows as given; a collision
is a pair (i, j), i < j, with distance < threshold; rows with NaN/Inf are left out and listed.
Imports only numpy and torch at module level (pyarrow and faiss are imported where needed), so
the engine runs on a machine that has nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from collide.errors import CollideError
from collide.search.blocks import Block, as_tensor, finite_rows, make_block, row_norms, sum_rows
from collide.search.bounds import PRECISIONS
from collide.search.nearest import QUERY_PANEL, SAMPLE_SEED, nearest_mode, nearest_of, record, resolve, sample_rows
from collide.search.prune import check_mode, choose, fits_in_memory, off_info, pruned_search
from collide.search.results import LayerResult, PairwiseResult, Pairs
from collide.search.symmetric import PairSearch, search_blocks

if TYPE_CHECKING:
    from collide.config import SearchConfig

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "faiss")
DEVICE_FRACTION = 0.6  # share of free GPU memory a store layer may take to be held on the device


def pick_backend(backend: str, device) -> str:
    """The engine that runs: "torch" or "faiss".

    Rule for "auto": always "torch" (the symmetric engine), on CPU and on CUDA. It computes each
    unordered pair once where a FAISS self-search computes both triangles, it certifies in one
    pass (no k widening), and it streams layers larger than memory (the measured figures, CPU and
    GPU, are in benchmarks/results/). ``device`` does not change the rule; it is accepted so that a rule for other
    hardware can use it. "faiss" needs the faiss-cpu or faiss-gpu package.
    """
    if backend not in BACKENDS:
        raise CollideError(f"search.backend={backend!r} is not an engine; use one of {list(BACKENDS)}")
    if backend == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError:
            raise CollideError("search.backend=faiss needs FAISS: pip install faiss-cpu (or faiss-gpu), "
                               "or use search.backend=torch") from None
        return "faiss"
    return "torch"


def resolve_device(device, x=None) -> torch.device:
    """The engine device: a CUDA tensor's own device under "auto", else cuda if present, else cpu."""
    if device in (None, "auto"):
        if isinstance(x, torch.Tensor) and x.is_cuda:
            return x.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CollideError(f"search.device={device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CollideError(f"search.device={device!r} but CUDA is not available; use search.device=cpu")
    if dev.type not in ("cpu", "cuda"):
        raise CollideError(f"search.device={device!r}: the engine runs on cpu or cuda")
    return dev


def _check(threshold: float, block_rows: int, precision: str, k: int, max_k: int, max_candidates: int,
           dev: torch.device) -> None:
    if not (threshold >= 0.0 and math.isfinite(threshold)):
        raise CollideError(f"threshold={threshold!r} must be a finite L2 distance >= 0 (e.g. 1e-6)")
    if block_rows < 1:
        raise CollideError(f"search.block_rows={block_rows} must be >= 1 (e.g. 4096)")
    if precision not in PRECISIONS:
        raise CollideError(f"search.precision={precision!r} is not a screening arithmetic; "
                           f"use one of {list(PRECISIONS)}")
    if precision == "tf32x3" and dev.type != "cuda":
        raise CollideError("search.precision=tf32x3 runs on CUDA tensor cores only; use search.precision=fp32 on CPU")
    if k < 1 or max_k < k:
        raise CollideError(f"search.k={k}, search.max_k={max_k}: need 1 <= k <= max_k")
    if max_candidates < 0:
        raise CollideError(f"search.max_candidates={max_candidates} must be >= 0")


@contextlib.contextmanager
def numerics(dev: torch.device, precision: str, threads: int):
    """IEEE fp32 GEMMs (TF32 off) unless precision is tf32x3; CPU threads; all restored on exit.

    On CPU the GEMMs run in numpy's BLAS with ``threads`` threads (0 = all cores) and torch runs
    single-threaded: its ops there are small vector ops, and its OpenMP pool stalls for
    milliseconds per op when another process holds a core.
    """
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.get_num_threads())
    limiter = contextlib.nullcontext()
    if dev.type == "cpu":
        torch.set_num_threads(1)
        if threads:
            try:
                from threadpoolctl import threadpool_limits
                limiter = threadpool_limits(threads, user_api="blas")
            except ImportError:
                log.warning("threadpoolctl is not installed: numpy's BLAS uses all cores despite threads=%d", threads)
    elif threads:
        torch.set_num_threads(threads)
    tf32 = precision == "tf32x3"
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with limiter:
            yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.allow_tf32 = saved[1]
        torch.set_num_threads(saved[2])


@contextlib.contextmanager
def _search_context(dev: torch.device, precision: str, threads: int):
    """numerics() plus the translation of an fp32 overflow into a user-facing error."""
    try:
        with numerics(dev, precision, threads):
            yield
    except OverflowError as exc:
        raise CollideError(f"{exc}; the rows are too large for fp32 screening: rescale them") from None


def _result(state: PairSearch, n: int, valid_rows: np.ndarray, invalid_rows: np.ndarray, backend: str,
            tic: float, norms: np.ndarray | None = None) -> PairwiseResult:
    """Assemble the PairwiseResult of a finished search (rows in the caller's numbering); ``norms``: the
    (m,) L2 norms of the valid rows."""
    state.close()
    m = len(valid_rows)
    ci, cj, cd = state.collisions()
    nn, nn_index, row_norm = np.full(n, np.nan), np.full(n, -1, np.int64), np.full(n, np.nan)
    nn[valid_rows], nn_index[valid_rows] = state.nn_distances(), state.nn_rows()
    centred = np.full(n, np.nan)
    centred[valid_rows] = np.sqrt(state.centred2.cpu().numpy())
    if norms is not None:
        row_norm[valid_rows] = norms
    reason = state.reason
    if reason is not None and state.n_skipped:
        reason += f" ({state.n_skipped} candidates were not re-ranked)"
    res = PairwiseResult(
        distance=math.sqrt(state.tau) if state.pair is not None else math.inf,  # IEEE sqrt, correctly rounded
        pair=state.pair,
        certified=reason is None,
        collisions=Pairs(ci, cj, cd),
        n_collisions=len(ci),
        nn_distance=nn,
        nn_index=nn_index,
        nearest=record("all" if state.nearest else "none", m if state.nearest else 0),
        row_norm=row_norm,
        centred_norm=centred,
        n_pairs=m * (m - 1) // 2,
        invalid_rows=invalid_rows.tolist(),
        threshold=state.threshold,
        backend=backend,
        precision=str(state.precision),
        n_candidates=state.n_candidates,
        uncertified_reason=reason,
        seconds=time.perf_counter() - tic,
    )
    if res.invalid_rows:
        log.warning("%d rows with NaN/Inf left out of the search: %s%s", len(res.invalid_rows),
                    res.invalid_rows[:10], " ..." if len(res.invalid_rows) > 10 else "")
    if not res.certified:
        log.warning("result NOT certified: %s", reason)
    log.info("%s/%s %s: n=%d d=%d, min L2 %.9g at %s, %s, %d collisions, %d re-ranks, %.2f s (%.3g Mpairs/s, "
             "GEMM %.2f s)", backend, state.device, state.precision, m, state.d, res.distance, res.pair,
             "certified" if res.certified else "NOT certified", res.n_collisions, res.n_candidates, res.seconds,
             res.n_pairs / max(res.seconds, 1e-9) / 1e6, state.gemm_s)
    return res


def _add_sampled_nearest(res: PairwiseResult, x: torch.Tensor, rows: torch.Tensor, mu: torch.Tensor, size: int,
                         block_rows: int, max_candidates: int) -> None:
    """Certify the exact nearest neighbours of a seeded sample of ``size`` of the rows x (m, d) (caller rows
    ``rows``, centred on mu) against all of them (nearest.nearest_of), into ``res``: their nn_distance and
    nn_index, its ``nearest`` record, n_candidates, and certified (False if the re-rank budget runs out)."""
    tic = time.perf_counter()
    m, d = x.shape
    sample = torch.from_numpy(sample_rows(m, size)).to(x.device)
    blocks = lambda: (make_block(x[s:s + block_rows], rows[s:s + block_rows], s, mu)  # noqa: E731 - one at a time
                      for s in range(0, m, block_rows))
    budget = max(max_candidates - res.n_candidates, 0)
    for q0 in range(0, len(sample), block_rows):
        part = sample[q0:q0 + block_rows]
        search = PairSearch(len(part), d, x.device, res.threshold, res.precision, budget, QUERY_PANEL)
        nearest_of(make_block(x[part], rows[part], 0, mu), blocks(), search)
        at = rows[part].cpu().numpy()
        res.nn_distance[at], res.nn_index[at] = search.nn_distances(), search.nn_rows()
        res.n_candidates += search.n_candidates
        budget = max(budget - search.n_candidates, 0)
        if search.reason is not None and res.certified:
            res.certified, res.uncertified_reason = False, search.reason
            log.warning("result NOT certified: %s", search.reason)
    res.nearest = record("sample", len(sample), SAMPLE_SEED)
    res.seconds += time.perf_counter() - tic
    log.info("exact nn of %d sampled rows in %.2f s", len(sample), time.perf_counter() - tic)


def min_pairwise(x, threshold: float = 1e-6, backend: str = "auto", *, device="auto", block_rows: int = 4096,
                 precision: str = "fp32", k: int = 8, max_k: int = 1024, max_candidates: int = 50_000_000,
                 threads: int = 0, progress: bool = False, nearest="auto", nearest_sample: int = 4096,
                 nearest_cutoff: int = 20_000, prune: str = "auto") -> PairwiseResult:
    """Certified exact minimum pairwise L2 distance of the rows of x (n, d), every collision, and the
    exact nearest neighbour (distance and row) of every row or of a seeded sample of rows (``nearest``).

    x: numpy array (any byte order) or torch tensor (CPU or CUDA) of fp16, bf16 (torch only), fp32
    or fp64 values, taken exactly (see as_tensor; other dtypes and d = 0 are refused).
    threshold: L2 (not squared) under which a pair is a collision: any finite value >= 0.
    backend: "auto" (see pick_backend), "torch" (symmetric block GEMM engine) or "faiss" (k-NN
    screening, in memory). device: for the torch engine ("auto": the tensor's CUDA device, else
    cuda if present, else cpu). block_rows: rows per block (memory O(block_rows * d +
    block_rows^2)). precision: screening arithmetic, "fp32" or "tf32x3" (CUDA only; its bound rests
    on an undocumented property of tensor-core accumulation, see bounds.py). k, max_k: initial and
    widest k-NN of the faiss engine. max_candidates: exact re-ranks allowed before the result is
    reported uncertified. threads: CPU threads (0 = all). progress: tqdm bar of pairs done (torch
    engine). nearest: True (every row's nearest neighbour), False (none: nn_distance all nan) or
    "auto" (every row's, or with a pruned search of more than ``nearest_cutoff`` rows those of a seeded
    sample of ``nearest_sample`` rows: collide.search.nearest; recorded in ``result.nearest``). prune:
    "auto", "off" or "pca" (torch engine: skip the pairs a certified PCA lower bound rules out, same
    answers; see prune.choose; recorded in ``result.prune``).
    """
    tic = time.perf_counter()
    chosen = pick_backend(backend, device)
    dev = resolve_device(device, x)
    if chosen == "faiss" and precision != "fp32":
        raise CollideError(f"search.precision={precision!r}: the faiss backend screens in fp32 only")
    _check(threshold, block_rows, precision, k, max_k, max_candidates, dev)
    mode = _check_nearest(nearest, nearest_sample, nearest_cutoff)
    check_mode(prune)
    xt = as_tensor(x)
    with _search_context(dev, precision, threads):
        if chosen == "faiss":  # its k-NN screen finds every row's neighbours anyway: auto = all rows
            from collide.search.faiss_engine import faiss_search
            x_np = xt.cpu().numpy()
            state, valid_rows, invalid_rows = faiss_search(x_np, threshold, dev, block_rows=block_rows, k=k,
                                                           max_k=max_k, max_candidates=max_candidates,
                                                           threads=threads, nearest=mode != "none")
            return _result(state, x_np.shape[0], valid_rows, invalid_rows, "faiss", tic,
                           row_norms(xt[torch.from_numpy(valid_rows)], block_rows).numpy())
        xt = xt.to(dev)
        n, d = xt.shape
        valid = finite_rows(xt, block_rows)
        valid_rows = torch.nonzero(valid)[:, 0]
        invalid_rows = torch.nonzero(~valid)[:, 0].cpu().numpy()
        xv = xt if len(invalid_rows) == 0 else xt[valid_rows]
        m = xv.shape[0]
        mu = sum_rows(xv, block_rows) / max(m, 1)
        rows_mode = resolve(mode, m, nearest_cutoff, choose(prune, m, dev, all_nearest=False)[0])
        state = PairSearch(m, d, dev, threshold, precision, max_candidates, block_rows, progress, rows_mode == "all")
        use, why = choose(prune, m, dev, rows_mode == "all")
        if use:
            prune_info = pruned_search(xv, valid_rows, mu, state)
        else:
            blocks = [make_block(xv[s:s + block_rows], valid_rows[s:s + block_rows], s, mu)
                      for s in range(0, m, block_rows)]
            search_blocks(lambda stop: iter(blocks[:stop]), state)
            prune_info = off_info(why)
        res = _result(state, n, valid_rows.cpu().numpy(), invalid_rows, "torch", tic,
                      row_norms(xv, block_rows).cpu().numpy())
        if rows_mode == "sample":
            _add_sampled_nearest(res, xv, valid_rows, mu, nearest_sample, block_rows, max_candidates)
    res.prune = prune_info
    return res


def _check_nearest(nearest, sample: int, cutoff: int) -> str:
    """search.nearest as nearest.MODES names it, after checking nearest_sample and nearest_cutoff."""
    if sample < 1:
        raise CollideError(f"search.nearest_sample={sample} must be >= 1 (e.g. 4096)")
    if cutoff < 0:
        raise CollideError(f"search.nearest_cutoff={cutoff} must be >= 0 (e.g. 20000)")
    return nearest_mode(nearest)


def _store_blocks(store, layer: int, block_rows: int, dev: torch.device, mu: torch.Tensor, stop: int | None
                  ) -> Iterator[Block]:
    """The first ``stop`` (all if None) non-empty blocks of valid rows of a store layer, read afresh, on dev."""
    row = start = done = 0
    if stop == 0:
        return
    for _, states in store.iter_blocks(layer, block_rows):
        xb = as_tensor(states).to(dev)
        valid = torch.nonzero(finite_rows(xb, block_rows))[:, 0]
        if valid.numel():
            xv = xb if valid.numel() == xb.shape[0] else xb[valid]
            yield make_block(xv, valid + row, start, mu)
            start += valid.numel()
            done += 1
            if done == stop:
                return
        row += xb.shape[0]


def _scan_store(store, layer: int, block_rows: int, dev: torch.device, keep: bool):
    """Pass 1 over a layer: prompt ids, valid and invalid rows, the fp64 mean and the L2 norms of the valid
    rows, and (``keep``) the valid rows themselves on ``dev`` (else None)."""
    ids_parts, valid_parts, invalid_parts, norm_parts, row, filled = [], [], [], [], 0, 0
    total = torch.zeros(store.d, dtype=torch.float64, device=dev)
    kept = torch.empty(store.n_rows, store.d, dtype=torch.float32, device=dev) if keep else None
    for ids, states in store.iter_blocks(layer, block_rows):
        xb = as_tensor(states)
        valid = finite_rows(xb, block_rows)
        xv = (xb if bool(valid.all()) else xb[valid]).to(dev)
        total += sum_rows(xv, block_rows)
        norm_parts.append(row_norms(xv, block_rows).cpu().numpy())
        if keep:
            kept[filled:filled + len(xv)] = xv
        filled += len(xv)
        ids_parts.append(np.asarray(ids, np.int64))
        valid_parts.append(torch.nonzero(valid)[:, 0].numpy() + row)
        invalid_parts.append(torch.nonzero(~valid)[:, 0].numpy() + row)
        row += len(ids)
    cat = lambda parts, dt=np.int64: np.concatenate(parts) if parts else np.empty(0, dt)  # noqa: E731
    valid_rows = cat(valid_parts)
    return (cat(ids_parts), valid_rows, cat(invalid_parts), total / max(len(valid_rows), 1),
            cat(norm_parts, np.float64), None if kept is None else kept[:filled])


def _plan(cfg: "SearchConfig", mode: str, m: int, dev: torch.device, fits: bool) -> tuple[str, bool, str | None]:
    """(rows whose nn is certified: all | sample | none, prune?, why not) for m valid rows of a store layer;
    ``fits``: whether the layer can be held in memory (pruning needs it)."""
    rows_mode = resolve(mode, m, cfg.nearest_cutoff, fits and choose(cfg.prune, m, dev, all_nearest=False)[0])
    use, why = choose(cfg.prune, m, dev, all_nearest=rows_mode == "all")
    if use and not fits:
        use, why = False, "the layer is streamed from the store (larger than memory): brute force"
    return rows_mode, use, why


def search_store(store, layer: int, threshold: float, cfg: "SearchConfig") -> LayerResult:
    """Certified search of one layer of a store (collide.store.open_store), rows -> prompt ids.

    The store hands out fp32 blocks (states stored as bf16/fp16 are widened exactly by its reader);
    any dtype min_pairwise takes is taken. A first pass takes the prompt ids, the NaN/Inf rows, the
    fp64 mean and the row norms, and keeps the layer's valid rows in memory when they fit (on CUDA:
    DEVICE_FRACTION of the free GPU memory; on the CPU: prune.fits_in_memory, when it will be pruned).
    A layer held in memory is searched there (pruned, or brute force); any other layer is streamed in blocks
    of ``cfg.block_rows`` rows (store.iter_blocks: for each block J the blocks before it are read
    again; memory ~2 blocks plus a block_rows^2 tile), brute force. ``cfg.nearest`` as min_pairwise's
    ``nearest``. The faiss backend is in-memory only: it loads the layer whole (use the torch engine,
    the "auto" choice, for layers larger than memory).
    """
    tic = time.perf_counter()
    chosen = pick_backend(cfg.backend, cfg.device)
    if chosen == "faiss":
        ids, states = store.layer(layer)
        res = min_pairwise(states, threshold, "faiss", device=cfg.device, block_rows=cfg.block_rows,
                           precision=cfg.precision, k=cfg.k, max_k=cfg.max_k, max_candidates=cfg.max_candidates,
                           threads=cfg.threads, progress=cfg.progress, nearest=cfg.nearest,
                           nearest_sample=cfg.nearest_sample, nearest_cutoff=cfg.nearest_cutoff)
        return LayerResult(layer=layer, prompt_ids=np.asarray(ids, np.int64), result=res)
    dev = resolve_device(cfg.device)
    _check(threshold, cfg.block_rows, cfg.precision, cfg.k, cfg.max_k, cfg.max_candidates, dev)
    mode = _check_nearest(cfg.nearest, cfg.nearest_sample, cfg.nearest_cutoff)
    if store.d == 0:
        raise CollideError(f"layer {layer} of the store has zero-width states: every row needs at least one column")
    with _search_context(dev, cfg.precision, cfg.threads):
        n, d = store.n_rows, store.d
        plan = lambda m, fits: _plan(cfg, mode, m, dev, fits)  # noqa: E731 - (rows mode, prune?, why not)
        if dev.type == "cuda":  # resident on the device whenever it fits: no re-reads
            fits = keep = n * d * 4 * 2 < DEVICE_FRACTION * torch.cuda.mem_get_info(dev)[0]
        else:  # host memory only for a pruned search; brute force streams (memory ~2 blocks)
            fits = fits_in_memory(n, d)
            keep = plan(n, fits)[1]
        prompt_ids, valid_rows, invalid_rows, mu, norms, xv = _scan_store(store, layer, cfg.block_rows, dev, keep)
        m = len(valid_rows)
        rows_mode, use, why = plan(m, fits)
        state = PairSearch(m, d, dev, threshold, cfg.precision, cfg.max_candidates, cfg.block_rows, cfg.progress,
                           rows_mode == "all")
        rows = torch.from_numpy(valid_rows).to(dev)
        if use:
            prune_info = pruned_search(xv, rows, mu, state)
        elif xv is not None:
            blocks = [make_block(xv[s:s + cfg.block_rows], rows[s:s + cfg.block_rows], s, mu)
                      for s in range(0, m, cfg.block_rows)]
            search_blocks(lambda stop: iter(blocks[:stop]), state)
            prune_info = off_info(why)
        else:
            search_blocks(lambda stop: _store_blocks(store, layer, cfg.block_rows, dev, mu, stop), state)
            prune_info = off_info(why)
        res = _result(state, len(prompt_ids), valid_rows, invalid_rows, "torch", tic, norms)
        if rows_mode == "sample":
            _add_sampled_nearest(res, xv, rows, mu, cfg.nearest_sample, cfg.block_rows, cfg.max_candidates)
    res.prune = prune_info
    return LayerResult(layer=layer, prompt_ids=prompt_ids, result=res)
