"""What the exhaustive test takes from a finished run: its store, model config and threshold,
the base prompts (chosen or closest), the appended token lists, and the batch size.

Nothing here loads a model but ``decode_tokens`` and ``auto_batch_size``, which take one. Layer k
is HF ``hidden_states[k]`` (collide.models); distances are L2, not squared.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from collide.config import ModelConfig, SearchConfig
from collide.exhaustive.config import ExhaustiveConfig
from collide.errors import CollideError
from collide.extract import MEMORY_FRACTION, free_memory, model_widths
from collide.models import LoadedModel
from collide.report import read_report
from collide.store import open_run_store

log = logging.getLogger(__name__)

OUT_DIR = "exhaustive"  # the test's directory inside the run directory
STORES_DIR = "stores"  # its continuation stores, one per content key (collide.exhaustive.modes.store_location)
CPU_MAX_BATCH, GPU_MAX_BATCH = 2048, 16384  # continuations per step past which a device runs no faster


def validate(cfg: ExhaustiveConfig) -> None:
    """Checks of ``cfg`` that need no model, so that a bad value fails before anything is loaded
    (the value sets the schema cannot express)."""
    if cfg.prompt_ids is None and cfg.n_prompts < 1:
        raise CollideError(f"n_prompts={cfg.n_prompts}: at least one base prompt is needed")
    if not (cfg.vocab == "all" or (isinstance(cfg.vocab, int) and cfg.vocab >= 2)):
        raise CollideError(f"vocab={cfg.vocab!r}: use vocab=all or vocab=N with N >= 2 (a seeded sample of N tokens)")
    if cfg.n_tokens < 2:
        raise CollideError(f"n_tokens={cfg.n_tokens}: at least 2 continuations per prompt form a pair")
    if cfg.batch_size < 0 or cfg.shard_rows < 1 or cfg.max_listed < 0:
        raise CollideError(f"batch_size={cfg.batch_size} (0 = auto), shard_rows={cfg.shard_rows} (>= 1) and "
                           f"max_listed={cfg.max_listed} (>= 0) are out of range")
    if cfg.threshold is not None and not cfg.threshold > 0:
        raise CollideError(f"threshold={cfg.threshold}: must be a positive L2 distance, e.g. threshold=1e-6")


@dataclass
class RunInputs:
    """What the test takes from a finished run."""

    run_dir: Path  # the run directory
    store: Any  # its store (collide.store.Store)
    model_cfg: ModelConfig  # the run's model config with the user's model.* overrides
    threshold: float  # collision L2 (not squared)

    @property
    def out_dir(self) -> Path:
        """RUN_DIR/exhaustive: the test's store, per-set results and outputs."""
        return self.run_dir / OUT_DIR


def open_run(run_dir: Path, cfg: ExhaustiveConfig) -> RunInputs:
    """Read RUN_DIR/report.json (if any) and open the run's store; no model is loaded."""
    if not run_dir.is_dir():
        raise CollideError(f"RUN_DIR {run_dir} is not a directory; pass the directory of a finished "
                           "`collide run` (it holds report.json and store.json)")
    report = read_report(run_dir)
    store = open_run_store(run_dir)
    if not store.complete:
        raise CollideError(f"the store {store.path} is still in progress; finish the run first (run its "
                           "`collide run` command again: it resumes the store)")
    stored = store.manifest["identity"]["model"]
    model_cfg = ModelConfig(**{**stored, **{k: v for k, v in asdict(cfg.model).items() if v is not None}})
    threshold = cfg.threshold if cfg.threshold is not None else float(report.get("threshold", 1e-6)) if report else 1e-6
    return RunInputs(run_dir=run_dir, store=store, model_cfg=model_cfg, threshold=threshold)


def token_list(vocab_size: int, spec, seed: int) -> np.ndarray:
    """The appended tokens: all ids 0..V-1 (``spec="all"``) or a seeded sample of ``spec`` ids, sorted."""
    if spec == "all":
        return np.arange(vocab_size, dtype=np.int64)
    if spec > vocab_size:
        raise CollideError(f"vocab={spec} is larger than the vocabulary ({vocab_size} tokens); use vocab=all")
    return np.sort(np.random.default_rng(seed).choice(vocab_size, size=spec, replace=False)).astype(np.int64)


def margin_tokens(vocab_size: int, n: int, seed: int, prompt_id: int) -> np.ndarray:
    """The margin mode's seeded sample of ``n`` token ids for one prompt (independent of the other prompts)."""
    if n > vocab_size:
        raise CollideError(f"n_tokens={n} is larger than the vocabulary ({vocab_size} tokens)")
    rng = np.random.default_rng([seed, prompt_id])
    return np.sort(rng.choice(vocab_size, size=n, replace=False)).astype(np.int64)


def select_closest(store, layer: int, n_prompts: int, threshold: float, search: SearchConfig) -> tuple[list[int], dict]:
    """The ``n_prompts`` prompt ids whose states at ``layer`` are closest to another prompt's.

    Rows are ordered by their nearest-neighbour distance as the certified search reports it (fp64
    re-ranked; ties by prompt id), so the two endpoints of the closest pair come first, then those
    of the next closest pairs. Returns the ids and a description of the selection (layer, each
    chosen prompt's NN distance).
    """
    from collide.search import search_store

    if layer not in store.layers:
        raise CollideError(f"layer_for_selection={layer} is not in the run's store (layers {store.layers}); "
                           "pick one of those")
    if n_prompts > store.n_rows:
        raise CollideError(f"n_prompts={n_prompts} but the run's store holds {store.n_rows} prompts; "
                           f"set n_prompts<={store.n_rows}")
    t0 = time.perf_counter()
    found = search_store(store, layer, threshold, dataclasses.replace(search, nearest=True))  # every row's nn
    nn = np.where(np.isfinite(found.result.nn_distance), found.result.nn_distance, np.inf)
    order = np.lexsort((found.prompt_ids, nn))[:n_prompts]
    ids = [int(found.prompt_ids[i]) for i in order]
    log.info("selected %d base prompts at layer %d (NN distances %.4g .. %.4g) in %.1f s", len(ids), layer,
             nn[order[0]], nn[order[-1]], time.perf_counter() - t0)
    return ids, {"method": "closest", "layer": layer, "nn_distance": [_finite(nn[i]) for i in order],
                 "run_min_distance": _finite(found.result.distance)}


def base_prompts(store, ids: list[int]) -> dict[int, dict]:
    """{prompt_id: {"token_ids": [...], "text": str | None}} of the given ids of the run's store."""
    missing = [i for i in ids if not 0 <= i < store.n_rows]
    if missing:
        raise CollideError(f"prompt_ids {missing} are not in the run's store (ids 0..{store.n_rows - 1})")
    if len(set(ids)) != len(ids):
        raise CollideError(f"prompt_ids={ids} repeats an id; each base prompt must be distinct")
    table = store.prompts(["prompt_id", "token_ids"])
    rows = dict(zip(table.column("prompt_id").to_pylist(), table.column("token_ids").to_pylist()))
    texts = store.texts(ids)
    return {i: {"token_ids": rows[i], "text": texts.get(i)} for i in ids}


def decode_tokens(lm: LoadedModel, tokens: np.ndarray) -> list[str]:
    """Each token decoded alone (ids the tokenizer does not know read as ``<id N>``)."""
    n_known = len(lm.tokenizer)
    known = [int(t) for t in tokens if t < n_known]
    texts = iter(lm.tokenizer.batch_decode([[t] for t in known]))
    return [next(texts) if t < n_known else f"<id {int(t)}>" for t in tokens]


def auto_batch_size(lm: LoadedModel, prefix_len: int, n_layers_kept: int) -> int:
    """Continuations per step from the free memory and the model's shape.

    Per continuation a step holds, in the compute dtype, one layer's prefix+1 keys and values
    expanded to all heads (4 (P+1) heads head_dim: what architectures without prefix_attention
    copy; an upper bound for the others), the residual stream and attention/MLP
    activations (~8 d + 3 intermediate), plus the kept fp32 states (4 d per layer).
    """
    heads, head_dim, inter, elem = model_widths(lm)
    per = elem * (4 * (prefix_len + 1) * heads * head_dim + 8 * lm.d + 3 * inter) + 4 * lm.d * n_layers_kept
    cap = GPU_MAX_BATCH if lm.device.type == "cuda" else CPU_MAX_BATCH
    return max(1, min(cap, int(MEMORY_FRACTION * free_memory(lm.device) / per)))


def _finite(x: float) -> float | None:
    """x as a JSON number, None for inf/nan (JSON has neither)."""
    return float(x) if math.isfinite(x) else None
