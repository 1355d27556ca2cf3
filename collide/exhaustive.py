"""The exhaustive continuation test: every vocabulary token appended to the closest prompts.

``python -m collide.exhaustive RUN_DIR [key=value ...]`` (keys: ``ExhaustiveConfig``; ``--help``).

Mode ``exhaustive`` (the paper's second experiment):

1. Base prompts: the ``n_prompts`` prompts of the run's store whose last-token states are closest
   at ``layer_for_selection`` (rows ordered by their nearest-neighbour distance, i.e. the endpoints
   of the closest pairs first), or an explicit ``prompt_ids=[...]``.
2. Set s = base prompt s + every token t of the token list (``vocab=all``: every row of the input
   embedding; ``vocab=N``: a seeded sample of N ids, the same for every set). The last-token
   state of prefix+t at each selected layer is computed by ``collide.continuations`` (prefix
   once, batched single-token steps against its KV cache) and written into
   ``RUN_DIR/exhaustive/store`` in the store format, one set after the other: set s holds
   prompt ids ``s * n .. (s + 1) * n - 1``, and its prompts table records ``set_index``,
   ``base_prompt_id``, ``appended_token`` and ``appended_text``.
3. The certified search (``collide.search``) runs within each set, streaming the set's shards
   (C(n, 2) pairs per set and layer), and with ``across_sets=true`` over all sets together.
4. ``RUN_DIR/exhaustive/exhaustive.{json,md,png}``; the run's ``report.json`` gains an
   ``"exhaustive"`` object and ``report.md`` an "Exhaustive continuation test" section.

Mode ``margin`` (the paper's appendix): for each of ``n_prompts`` prompts (the first ones of the
run's store, or ``prompt_ids``), ``n_tokens`` seeded single-token continuations; the minimum
pairwise distance among them per layer, and its mean over prompts (``margin.{json,md,png}``,
``report.json["exhaustive_margin"]``). Nothing is stored but the results.

Resume: a killed run resumes at its last committed shard (the store, written shard by shard and
never across a set boundary) and reuses the search results of every finished set
(``RUN_DIR/exhaustive/sets/``). Rerunning the same command on a finished run only rewrites the
reports. Distances are L2, not squared; layer k is HF ``hidden_states[k]`` (see collide.models).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import shlex
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException
from tqdm import tqdm

from collide import figures
from collide.config import ExtractConfig, ModelConfig, SearchConfig, StoreConfig
from collide.continuations import continuation_states, input_groups
from collide.errors import CollideError
from collide.extract import MEMORY_FRACTION, free_memory, model_widths
from collide.figures import fmt_distance
from collide.models import LoadedModel, load_model, parse_layers

log = logging.getLogger("collide.exhaustive")  # also when run as __main__

SCHEMA_VERSION = "1.0"
MODES = ("exhaustive", "margin")
OUT_DIR = "exhaustive"  # inside the run directory
MD_BEGIN, MD_END = "<!-- collide.exhaustive:{mode}:begin -->", "<!-- collide.exhaustive:{mode}:end -->"
REPORT_KEYS = {"exhaustive": "exhaustive", "margin": "exhaustive_margin"}  # report.json key per mode
CPU_MAX_BATCH, GPU_MAX_BATCH = 2048, 16384  # continuations per step past which a device runs no faster
# The paper's appendix (GPT-2 Small): min distance among 1000 single-token continuations of a
# prompt, mean over 100 prompts, layers 1..12. The number to check with hub access (model=gpt2).
# The fields of a search restricted to pairs whose appended tokens have different input embeddings.
DISTINCT_KEYS = ("n_pairs", "min_distance", "certified", "n_collisions", "closest_pair")
PAPER_GPT2_MARGIN = {1: 1.850, 2: 1.957, 3: 2.064, 4: 2.241, 5: 2.382, 6: 2.500, 7: 2.705, 8: 2.886, 9: 3.025,
                     10: 3.331, 11: 3.918, 12: 4.640}


@dataclass
class ExhaustiveConfig:
    mode: str = "exhaustive"  # exhaustive (every token after the closest prompts) | margin (paper appendix)
    # Layers to test: "all", a list, "a:b" (inclusive) or an int; None = the last layer L
    # (exhaustive) or all layers (margin). Layer k = HF hidden_states[k], 0 = embeddings.
    layers: Any = None
    n_prompts: int = 10  # base prompts, one continuation set each
    prompt_ids: Optional[List[int]] = None  # explicit base prompt ids of the run's store (overrides selection)
    # exhaustive: the layer whose closest prompts are chosen; None = the deepest layer in the run's store
    layer_for_selection: Optional[int] = None
    vocab: Any = "all"  # exhaustive: "all" = every input-embedding row, N = a seeded sample of N token ids
    n_tokens: int = 1000  # margin: continuations per prompt (a seeded sample per prompt)
    seed: int = 0  # seed of the token samples
    across_sets: bool = False  # exhaustive: also search all sets' continuations together
    batch_size: int = 0  # continuations per single-token step; 0 = from free memory (a resume keeps the first)
    shard_rows: int = 16384  # rows per shard of the exhaustive store: bounds extraction memory
    threshold: Optional[float] = None  # collision L2 (not squared); None = the run's threshold
    model: Dict[str, Any] = field(default_factory=dict)  # overrides of the run's model config, e.g. model.device=cuda
    search: SearchConfig = field(default_factory=SearchConfig)  # the certified search (collide.search)
    max_listed: int = 100  # collisions listed per layer in the JSON (the count is always exact)
    progress: bool = True  # progress bars for extraction and search


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> tuple[Path, ExhaustiveConfig]:
    """RUN_DIR and Hydra-style ``key=value`` overrides (OmegaConf dotlist) -> validated config."""
    run_dirs = [a for a in argv if "=" not in a]
    if len(run_dirs) != 1:
        raise CollideError(f"expected one RUN_DIR and key=value overrides, got {argv}; usage: "
                           "python -m collide.exhaustive RUN_DIR [n_prompts=10] [vocab=all|N] [layers=...] ...")
    overrides = [a for a in argv if "=" in a]
    schema = OmegaConf.structured(ExhaustiveConfig)
    for arg in overrides:
        key = arg.split("=", 1)[0].lstrip("+")
        top = key.split(".")[0]
        if top not in schema or (top == "search" and key.split(".", 1)[-1] not in schema.search):
            known = ", ".join(f.name for f in fields(ExhaustiveConfig))
            raise CollideError(f"unknown key {key!r} in {arg!r}; valid keys: {known} (and search.<key>, model.<key>)")
        if top == "model" and key.split(".", 1)[-1] not in {f.name for f in fields(ModelConfig)}:
            raise CollideError(f"unknown key {key!r} in {arg!r}: model.<key> overrides a field of the run's "
                               f"ModelConfig ({', '.join(f.name for f in fields(ModelConfig))})")
    try:
        merged = OmegaConf.merge(schema, OmegaConf.from_dotlist([a.lstrip("+") for a in overrides]))
        cfg: ExhaustiveConfig = OmegaConf.to_object(merged)
    except ConfigKeyError as exc:
        raise CollideError(f"unknown key {exc.full_key!r}; see python -m collide.exhaustive --help") from None
    except OmegaConfBaseException as exc:
        raise CollideError(f"bad value for {getattr(exc, 'full_key', '?')!r}: {exc.msg}") from None
    validate(cfg)
    return Path(run_dirs[0]), cfg


def validate(cfg: ExhaustiveConfig) -> None:
    """Checks that need no model, so that a bad value fails before anything is loaded."""
    if cfg.mode not in MODES:
        raise CollideError(f"mode={cfg.mode!r}: use one of {list(MODES)}")
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


# --------------------------------------------------------------------------- inputs


@dataclass
class RunInputs:
    """What the test takes from a finished run."""

    run_dir: Path  # the run directory
    store: Any  # its store (collide.store.Store)
    model_cfg: ModelConfig  # the run's model config with the user's model.* overrides
    threshold: float  # collision L2 (not squared)


def open_run(run_dir: Path, cfg: ExhaustiveConfig) -> RunInputs:
    """Read RUN_DIR/report.json (if any) and open the run's store; no model is loaded."""
    from collide.store import open_store

    if not run_dir.is_dir():
        raise CollideError(f"RUN_DIR {run_dir} is not a directory; pass the directory of a finished "
                           "`python -m collide` run (it holds store/ and report.json)")
    report_file = run_dir / "report.json"
    try:
        report = json.loads(report_file.read_text()) if report_file.is_file() else None
    except (OSError, ValueError) as exc:
        raise CollideError(f"cannot read {report_file} ({exc}); rerun the run's own `python -m collide` command "
                           "to rewrite it (a complete store is only searched again)") from None
    store_path = Path(report["store"]) if report and report.get("store") else Path("store")
    store = open_store(store_path if store_path.is_absolute() else run_dir / store_path)
    if not store.complete:
        raise CollideError(f"the store {store.path} is still in progress; finish the run first (rerun it with "
                           f"hydra.run.dir={run_dir})")
    stored = dict(store.manifest["identity"]["model"])
    unknown = set(cfg.model) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise CollideError(f"unknown model.* keys {sorted(unknown)}; valid: {[f.name for f in fields(ModelConfig)]}")
    model_cfg = ModelConfig(**{**stored, **cfg.model})
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
    found = search_store(store, layer, threshold, search)
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


# --------------------------------------------------------------------------- sets


@dataclass
class PromptSet:
    """One base prompt and the tokens appended to it."""

    index: int  # set number s (0-based); in the exhaustive store it holds ids s * n .. (s + 1) * n - 1
    base_prompt_id: int  # prompt id in the run's store
    prefix: list[int]  # the base prompt's token ids, BOS included: what the model saw
    text: str | None  # the base prompt's text (None when the run's store keeps none)
    tokens: np.ndarray  # appended token ids, sorted


def n_pairs(n: int) -> int:
    """C(n, 2): unordered pairs among n continuations (exact integer)."""
    return n * (n - 1) // 2


def search_kwargs(search: SearchConfig) -> dict:
    """SearchConfig -> keyword arguments of collide.search.min_pairwise, without a progress bar."""
    return {**asdict(search), "progress": False}


def set_view(store, first_id: int, stop_id: int):
    """A read-only view of the store restricted to prompt ids first_id..stop_id-1 (whole shards).

    The exhaustive store never lets a shard cross a set boundary, so a set is a run of shards;
    the view is the same Store object with only those shards listed, which every reader
    (``layer``, ``iter_blocks``, ``prompts``, and so ``collide.search.search_store``) honours.
    """
    view = copy.copy(store)
    view.shards = [s for s in store.shards if first_id <= int(s["first_prompt_id"]) < stop_id]
    view.n_rows = sum(int(s["rows"]) for s in view.shards)
    if view.n_rows != stop_id - first_id:
        raise CollideError(f"the store {store.path} holds {view.n_rows} rows for ids {first_id}..{stop_id - 1}, "
                           f"want {stop_id - first_id}; run `python -m collide.verify {store.path}` or delete "
                           "RUN_DIR/exhaustive to start over")
    return view


def pair_entry(layer: int, res, row_tokens: np.ndarray, texts: dict[int, str], max_listed: int,
               row_sets: np.ndarray | None = None, set_bases: list[int] | None = None) -> dict:
    """One layer's search result in words: rows are turned into appended tokens (and sets).

    ``row_tokens[r]`` is the token appended in row r, ``texts`` maps token id -> decoded text;
    ``row_sets``/``set_bases`` (across-sets search) give each row's set and each set's base prompt.
    """
    def describe(i: int, j: int, distance: float) -> dict:
        out = {"tokens": [int(row_tokens[i]), int(row_tokens[j])],
               "token_texts": [texts[int(row_tokens[i])], texts[int(row_tokens[j])]], "distance": float(distance)}
        if row_sets is not None:
            out["sets"] = [int(row_sets[i]), int(row_sets[j])]
            out["base_prompt_ids"] = [set_bases[int(row_sets[i])], set_bases[int(row_sets[j])]]
        return out

    return {"layer": layer, "n_vectors": int(len(row_tokens)), "n_pairs": int(res.n_pairs),
            "min_distance": _finite(res.distance), "certified": bool(res.certified),
            "uncertified_reason": res.uncertified_reason, "n_collisions": int(res.n_collisions),
            "collisions": [describe(i, j, x) for i, j, x in res.collisions[:max_listed]],
            "closest_pair": describe(*res.pair, res.distance) if res.pair is not None else None,
            "invalid_rows": len(res.invalid_rows), "seconds": round(res.seconds, 3)}


def _finite(x: float) -> float | None:
    """x as a JSON number, None for inf/nan (JSON has neither)."""
    return float(x) if math.isfinite(x) else None


def _write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class SetResults:
    """Per-set results on disk (``RUN_DIR/exhaustive/sets/<mode>-NNNNN.json``), the unit of resume.

    A file counts only if its ``key`` (a digest of everything that determines the result) equals
    the current run's; otherwise the set is searched again.
    """

    def __init__(self, out_dir: Path, mode: str, key: str):
        self.dir = out_dir / "sets"  # where the files live
        self.mode = mode  # exhaustive | margin
        self.key = key  # digest of the inputs, extraction and search settings
        self.dir.mkdir(parents=True, exist_ok=True)

    def _file(self, index: int) -> Path:
        return self.dir / f"{self.mode}-{index:05d}.json"

    def get(self, index: int) -> dict | None:
        file = self._file(index)
        if not file.is_file():
            return None
        result = json.loads(file.read_text())
        if result.get("key") != self.key:
            log.info("set %d: stored result was made with other settings; searching again", index)
            return None
        return result

    def put(self, index: int, result: dict) -> None:
        _write_json(self._file(index), {"key": self.key, **result})


# --------------------------------------------------------------------------- exhaustive mode


def store_identity(inputs: RunInputs, sets: list[PromptSet], layers: list[int], vocab) -> dict:
    """What makes the exhaustive store: a resumed store must match every key."""
    return {"mode": "exhaustive", "model": asdict(inputs.model_cfg), "run_identity": inputs.store.manifest["identity"],
            "base_prompt_ids": [s.base_prompt_id for s in sets], "vocab": vocab, "n_tokens": len(sets[0].tokens),
            "tokens_sha256": hashlib.sha256(sets[0].tokens.tobytes()).hexdigest(), "layers": layers}


def extract_set(lm: LoadedModel, writer, pset: PromptSet, layers: list[int], batch_size: int, shard_rows: int,
                texts: list[str], groups: tuple[np.ndarray, np.ndarray], progress: bool) -> None:
    """Extract set ``pset`` into the store from the row where it stopped, in shards of whole blocks.

    A shard holds whole continuation blocks (so a resume starts where a block starts and recomputes
    the same blocks) and never crosses the set's end. The writer thread commits a shard while
    the next one is computed (building its prompts table too). ``groups``: ``input_groups`` of the
    tokens, shared by all sets.
    """
    from collide.store import prompt_table

    n = len(pset.tokens)
    first = pset.index * n
    done = writer.n_rows - first
    if done >= n:
        return
    text_of = dict(zip(pset.tokens.tolist(), texts))
    bar = tqdm(total=n, initial=done, unit="cont", desc=f"set {pset.index} (prompt {pset.base_prompt_id})",
               dynamic_ncols=True, disable=not progress)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collide-exhaustive-writer")
    pending: Future | None = None
    blocks, rows, next_id, t0 = [], 0, first + done, time.perf_counter()

    def commit(first_id: int, blocks: list, forward_s: float) -> None:  # runs on the writer thread
        tokens = np.concatenate([b.tokens for b in blocks])
        listed = tokens.tolist()
        table = prompt_table(first_id, [pset.prefix + [t] for t in listed],
                             [f"continuation:{pset.base_prompt_id}+{t}" for t in listed], None,
                             set_index=np.full(len(tokens), pset.index, np.int32),
                             base_prompt_id=np.full(len(tokens), pset.base_prompt_id, np.int64),
                             appended_token=tokens.astype(np.int32), appended_text=[text_of[t] for t in listed])
        states = {k: torch.cat([b.states[k] for b in blocks]).numpy() for k in layers}
        writer.commit_shard(table, states, {"set_index": pset.index, "forward_s": round(forward_s, 6)})

    try:
        for block in continuation_states(lm, pset.prefix, pset.tokens, layers, batch_size, start=done,
                                         progress=bar, groups=groups):
            blocks.append(block)
            rows += len(block.tokens)
            if rows >= shard_rows or next_id + rows == first + n:
                if pending is not None:
                    pending.result()  # at most one shard in flight
                pending = pool.submit(commit, next_id, blocks, time.perf_counter() - t0)
                blocks, next_id, rows, t0 = [], next_id + rows, 0, time.perf_counter()
        if pending is not None:
            pending.result()
    finally:
        pool.shutdown(wait=True)  # a shard being written completes, also on Ctrl-C
        bar.close()


def set_extract_seconds(store, first_id: int, stop_id: int) -> float:
    """Forward seconds of a set's shards, as recorded in the manifest (survives resumes)."""
    return sum(float(s.get("forward_s", 0.0)) for s in store.manifest["shards"]
               if first_id <= int(s["first_prompt_id"]) < stop_id)


def search_set(store, pset: PromptSet, layers: list[int], threshold: float, cfg: ExhaustiveConfig,
               texts: dict[int, str], representatives: np.ndarray | None = None) -> dict:
    """The certified search within one set at each layer, streaming the set's shards.

    ``representatives``: when some appended tokens have bitwise-identical input embeddings, the
    first token of each group. Those pairs collide by construction (distance exactly 0) and the
    full search finds them; a second search over the representatives alone then gives each
    layer's ``distinct_inputs`` result: the minimum over pairs whose inputs differ.
    """
    from collide.search import min_pairwise, search_store

    n = len(pset.tokens)
    view = set_view(store, pset.index * n, (pset.index + 1) * n)
    appended = view.prompts(["appended_token"]).column(0).to_numpy().astype(np.int64)  # row r: prompt id base + r
    keep = None if representatives is None else np.isin(appended, representatives)
    entries, t0 = [], time.perf_counter()
    for k in layers:
        found = search_store(view, k, threshold, cfg.search)
        entry = pair_entry(k, found.result, appended, texts, cfg.max_listed)
        if keep is None:
            entry["distinct_inputs"] = {key: entry[key] for key in DISTINCT_KEYS}
        else:
            _, states = view.layer(k)  # rows in prompt id order, as ``appended``
            distinct = pair_entry(k, min_pairwise(states[keep], threshold, **search_kwargs(cfg.search)),
                                  appended[keep], texts, cfg.max_listed)
            entry["distinct_inputs"] = {key: distinct[key] for key in DISTINCT_KEYS}
        entries.append(entry)
        log.info("set %d (prompt %d) layer %d: min %.6g (%s), %d collisions (distinct inputs: min %.6g, %d), %.1f s",
                 pset.index, pset.base_prompt_id, k, found.result.distance,
                 "certified" if found.result.certified else "NOT certified", found.result.n_collisions,
                 entry["distinct_inputs"]["min_distance"] or 0.0, entry["distinct_inputs"]["n_collisions"],
                 found.result.seconds)
    return {"set": pset.index, "base_prompt_id": pset.base_prompt_id, "prefix_tokens": len(pset.prefix),
            "n_continuations": n, "search_s": round(time.perf_counter() - t0, 3), "layers": entries}


def search_across(store, sets: list[PromptSet], layers: list[int], threshold: float, cfg: ExhaustiveConfig,
                  texts: dict[int, str]) -> list[dict]:
    """The certified search over all sets' continuations together, one layer at a time."""
    from collide.search import search_store

    table = store.prompts(["prompt_id", "set_index", "appended_token"])
    appended = table.column("appended_token").to_numpy().astype(np.int64)
    set_of = table.column("set_index").to_numpy()
    out = []
    for k in layers:
        found = search_store(store, k, threshold, cfg.search)
        rows = found.prompt_ids  # the store's ids are its row numbers 0..N-1
        out.append(pair_entry(k, found.result, appended[rows], texts, cfg.max_listed, set_of[rows],
                              [s.base_prompt_id for s in sets]))
        log.info("across sets, layer %d: min %.6g (%s), %d collisions, %.1f s", k, found.result.distance,
                 "certified" if found.result.certified else "NOT certified", found.result.n_collisions,
                 found.result.seconds)
    return out


def summarize_layers(set_results: list[dict], layers: list[int]) -> list[dict]:
    """Per layer over all sets: exact pair count, min distance and where, certification, collisions."""
    out = []
    for slot, k in enumerate(layers):
        per_set = [(r, r["layers"][slot]) for r in set_results]
        finite = [(r, e) for r, e in per_set if e["min_distance"] is not None]
        best_r, best = min(finite, key=lambda re: (re[1]["min_distance"], re[0]["set"])) if finite else (None, None)
        closest = None
        if best is not None:
            closest = {**best["closest_pair"], "set": best_r["set"], "base_prompt_id": best_r["base_prompt_id"]}
        entry = {"layer": k, "n_pairs": sum(e["n_pairs"] for _, e in per_set),
                 "min_distance": best["min_distance"] if best else None,
                 "certified": all(e["certified"] for _, e in per_set),
                 "n_collisions": sum(e["n_collisions"] for _, e in per_set),
                 "closest_pair": closest,
                 "min_distance_per_set": [e["min_distance"] for _, e in per_set]}
        if "distinct_inputs" in per_set[0][1]:
            distinct = summarize_layers([{**r, "layers": [e["distinct_inputs"]]} for r, (_, e) in
                                         zip(set_results, per_set)], [k])[0]
            entry["n_collisions_identical_inputs"] = entry["n_collisions"] - distinct["n_collisions"]
            entry["distinct_inputs"] = {key: distinct[key] for key in DISTINCT_KEYS + ("min_distance_per_set",)}
        out.append(entry)
    return out


def run_exhaustive(inputs: RunInputs, lm: LoadedModel, layers: list[int], prompts: dict[int, dict],
                   selection: dict, cfg: ExhaustiveConfig, timings: dict) -> dict:
    """Extract and search every set (resumable), optionally across sets; returns exhaustive.json's dict.

    ``prompts``: ``base_prompts`` of the selected ids, in set order."""
    from collide.extract import store_header
    from collide.store import Store, StoreWriter

    out_dir = inputs.run_dir / OUT_DIR
    tokens = token_list(lm.model.get_input_embeddings().weight.shape[0], cfg.vocab, cfg.seed)
    sets = [PromptSet(index=s, base_prompt_id=pid, prefix=list(prompt["token_ids"]), text=prompt["text"],
                      tokens=tokens) for s, (pid, prompt) in enumerate(prompts.items())]
    n = len(tokens)
    tic = time.perf_counter()
    token_texts = decode_tokens(lm, tokens)
    texts = dict(zip(tokens.tolist(), token_texts))
    first, group = input_groups(lm, tokens)
    counts = np.bincount(group)
    dup_groups = [tokens[group == g].tolist() for g in np.nonzero(counts > 1)[0]]
    timings["decode_s"] = time.perf_counter() - tic

    longest = max(len(s.prefix) for s in sets)
    batch = cfg.batch_size or auto_batch_size(lm, longest, len(layers))
    identity = store_identity(inputs, sets, layers, cfg.vocab)
    header = store_header(lm, layers, n * len(sets), StoreConfig(shard_rows=cfg.shard_rows, keep_text=False),
                          ExtractConfig(max_batch_size=batch))
    writer = StoreWriter.open(out_dir / "store", identity, header)
    with contextlib.closing(writer):  # the lock on the store is released however this ends
        batch, shard_rows = int(writer.batching("max_batch_size")), int(writer.batching("shard_rows"))
        log.info("%d sets x %d continuations (%d distinct input rows), %d pairs per set and layer, layers %s, "
                 "%d continuations per step", len(sets), n, len(first), n_pairs(n), layers, batch)
        results = SetResults(out_dir, "exhaustive", _digest({"store": identity, "threshold": inputs.threshold,
                                                            "search": search_kwargs(cfg.search)}))
        set_results = []
        for pset in sets:
            result = results.get(pset.index)
            if result is None:
                if writer.n_rows < (pset.index + 1) * n:
                    extract_set(lm, writer, pset, layers, batch, shard_rows, token_texts, (first, group),
                                cfg.progress)
                store = Store(writer.path, verified=writer.written)  # this run's files are hashed already
                result = search_set(store, pset, layers, inputs.threshold, cfg, texts,
                                    tokens[first] if len(first) < n else None)
                result["extract_s"] = round(set_extract_seconds(store, pset.index * n, (pset.index + 1) * n), 3)
                results.put(pset.index, result)
            set_results.append(result)
        if not writer.complete:
            writer.finish(sum(r["extract_s"] for r in set_results))
    store = Store(writer.path, verified=writer.written)
    timings["extract_s"] = sum(r["extract_s"] for r in set_results)
    timings["search_s"] = sum(r["search_s"] for r in set_results)
    across = None
    if cfg.across_sets:
        tic = time.perf_counter()
        across = search_across(store, sets, layers, inputs.threshold, cfg, texts)
        timings["across_sets_s"] = time.perf_counter() - tic
    return {"schema_version": SCHEMA_VERSION, "mode": "exhaustive", "threshold": inputs.threshold, "layers": layers,
            "selection": selection,
            "tokens": {"vocab": cfg.vocab, "seed": cfg.seed if cfg.vocab != "all" else None, "n_tokens": n,
                       "n_distinct_inputs": len(first), "duplicate_input_groups": dup_groups[:cfg.max_listed],
                       "n_duplicate_input_groups": len(dup_groups)},
            "n_sets": len(sets), "n_pairs_per_layer": n_pairs(n) * len(sets),
            "per_layer": summarize_layers(set_results, layers),
            "across_sets": across,
            "sets": [{**r, "base_text": pset.text, "prefix_tokens": len(pset.prefix)}
                     for r, pset in zip(set_results, sets)],
            "batch_size": batch, "store": f"{OUT_DIR}/store"}



# --------------------------------------------------------------------------- margin mode


def run_margin(inputs: RunInputs, lm: LoadedModel, layers: list[int], prompts: dict[int, dict],
               selection: dict, cfg: ExhaustiveConfig, timings: dict) -> dict:
    """The paper's margin variant: per prompt, the min distance among ``n_tokens`` continuations.

    ``prompts``: ``base_prompts`` of the selected ids, in order."""
    from collide.search import min_pairwise

    vocab_size = lm.model.get_input_embeddings().weight.shape[0]
    ids = list(prompts)
    identity = {"mode": "margin", "model": asdict(inputs.model_cfg), "run_identity": inputs.store.manifest["identity"],
                "n_tokens": cfg.n_tokens, "seed": cfg.seed, "layers": layers}
    results = SetResults(inputs.run_dir / OUT_DIR, "margin",
                         _digest({"identity": identity, "threshold": inputs.threshold,
                                  "search": search_kwargs(cfg.search)}))
    set_results = []
    timings.setdefault("extract_s", 0.0)
    timings.setdefault("search_s", 0.0)
    bar = tqdm(total=len(ids), unit="prompt", desc="margin", dynamic_ncols=True, disable=not cfg.progress)
    for s, pid in enumerate(ids):
        result = results.get(s)
        if result is None or result["base_prompt_id"] != pid:
            prefix = list(prompts[pid]["token_ids"])
            tokens = margin_tokens(vocab_size, cfg.n_tokens, cfg.seed, pid)
            texts = dict(zip(tokens.tolist(), decode_tokens(lm, tokens)))
            tic = time.perf_counter()
            blocks = list(continuation_states(lm, prefix, tokens, layers, cfg.batch_size or
                                              auto_batch_size(lm, len(prefix), len(layers))))
            extract_s = time.perf_counter() - tic
            row_tokens = np.concatenate([b.tokens for b in blocks])
            entries = []
            for k in layers:
                res = min_pairwise(torch.cat([b.states[k] for b in blocks]), inputs.threshold,
                                   **search_kwargs(cfg.search))
                entries.append(pair_entry(k, res, row_tokens, texts, cfg.max_listed))
            result = {"set": s, "base_prompt_id": pid, "prefix_tokens": len(prefix), "n_continuations": len(tokens),
                      "extract_s": round(extract_s, 3), "search_s": round(time.perf_counter() - tic - extract_s, 3),
                      "layers": entries}
            results.put(s, result)
        set_results.append(result)
        timings["extract_s"] += result["extract_s"]
        timings["search_s"] += result["search_s"]
        bar.update(1)
    bar.close()
    per_layer = []
    for slot, k in enumerate(layers):
        mins = np.array([r["layers"][slot]["min_distance"] for r in set_results], dtype=np.float64)
        per_layer.append({"layer": k, "mean_min_distance": float(mins.mean()), "std_min_distance": float(mins.std()),
                          "min_min_distance": float(mins.min()), "max_min_distance": float(mins.max()),
                          "n_pairs": sum(r["layers"][slot]["n_pairs"] for r in set_results),
                          "certified": all(r["layers"][slot]["certified"] for r in set_results),
                          "n_collisions": sum(r["layers"][slot]["n_collisions"] for r in set_results),
                          "paper_gpt2_small": PAPER_GPT2_MARGIN.get(k) if is_gpt2_small(inputs.model_cfg) else None})
    return {"schema_version": SCHEMA_VERSION, "mode": "margin", "threshold": inputs.threshold, "layers": layers,
            "selection": selection,
            "tokens": {"n_tokens": cfg.n_tokens, "seed": cfg.seed,
                       "sample": "seeded per prompt: rng([seed, prompt_id])"},
            "n_sets": len(ids), "per_layer": per_layer,
            "sets": [{**r, "base_text": prompts[r["base_prompt_id"]]["text"]} for r in set_results]}


def is_gpt2_small(model_cfg: ModelConfig) -> bool:
    """True for the model of the paper's margin numbers (GPT-2 Small)."""
    return model_cfg.source in ("openai-community/gpt2", "gpt2") or model_cfg.name == "gpt2"


# --------------------------------------------------------------------------- reports


def _token(text: str, token_id: int) -> str:
    return f"`{json.dumps(text, ensure_ascii=False)}` (id {token_id})"


def _text_block(text: str | None) -> str:
    if text is None:
        return "(text not stored)"
    return "\n".join("> " + line for line in text.splitlines() or [""])


def _layers_in_words(layers: list[int]) -> str:
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))}"


def _table_row(layer: int, entry: dict, pair: str) -> str:
    """One markdown row: layer, pairs, min distance, certified, collisions, closest pair."""
    name = f"{layer} (embeddings)" if layer == 0 else str(layer)
    return (f"| {name} | {entry['n_pairs']:,} | {fmt_distance(entry['min_distance'], 6)} | "
            f"{'yes' if entry['certified'] else '**no**'} | {entry['n_collisions']:,} | {pair} |")


def render_exhaustive(result: dict, figure: str | None, per_set: bool) -> str:
    """Markdown of an exhaustive result: the report.md section (``per_set=False``) or exhaustive.md."""
    sel, tok, S, n = result["selection"], result["tokens"], result["n_sets"], result["tokens"]["n_tokens"]
    how = (f"the {S} prompts of the run closest to another prompt at layer {sel['layer']}"
           if sel["method"] == "closest" else f"prompts {', '.join(map(str, sel['prompt_ids']))} of the run")
    appended = "every token of the vocabulary" if tok["vocab"] == "all" else \
        f"a seeded sample of {n:,} tokens (seed {tok['seed']})"
    identical = result["per_layer"][0]["n_collisions_identical_inputs"]
    distinct_collisions = sum(e["distinct_inputs"]["n_collisions"] for e in result["per_layer"])
    out = ["## Exhaustive continuation test", "",
           f"Base prompts: {how}. Appended to each: {appended}, {n:,} continuations per prompt. Pairs compared "
           f"within each prompt's set: **{result['n_pairs_per_layer']:,} per layer** ({S} x C({n:,}, 2)) at "
           f"{_layers_in_words(result['layers'])}. Distances are L2 (not squared); a collision is a distance "
           f"below {fmt_distance(result['threshold'])}.", ""]
    if distinct_collisions == 0:
        out += [f"**No collisions** between continuations with different inputs: no two different next tokens "
                f"took the same prompt within {fmt_distance(result['threshold'])} of each other at any tested "
                "layer.", ""]
    else:
        out += [f"**{distinct_collisions:,} colliding pairs** of continuations with different inputs, summed over "
                f"the tested layers (listed in `{OUT_DIR}/exhaustive.json`).", ""]
    if tok["n_duplicate_input_groups"]:
        out += [f"Besides, {tok['n_duplicate_input_groups']:,} groups of appended tokens have bitwise-identical "
                "input embeddings (e.g. ids " + ", ".join(map(str, tok["duplicate_input_groups"][0][:6])) + "): "
                "identical inputs after an identical prefix, so they collide at every layer by construction "
                f"({identical:,} pairs per layer at distance exactly 0, found by the search and counted apart; "
                "the distances below are over pairs with different inputs).", ""]
    out += ["| layer | pairs | min distance | certified | collisions | closest continuation pair |",
            "|---:|---:|---:|:---:|---:|---|"]
    for e in result["per_layer"]:
        d = e["distinct_inputs"]
        c = d["closest_pair"]
        pair = "-" if c is None else \
            f"{_token(c['token_texts'][0], c['tokens'][0])} vs {_token(c['token_texts'][1], c['tokens'][1])} " \
            f"after prompt {c['base_prompt_id']}"
        out.append(_table_row(e["layer"], d, pair))
    deepest = result["per_layer"][-1]
    c = deepest["distinct_inputs"]["closest_pair"]
    if c is not None:
        base = next(s for s in result["sets"] if s["set"] == c["set"])
        out += ["", f"Closest continuation pair (different inputs) at layer {deepest['layer']}: after prompt "
                f"{c['base_prompt_id']}, "
                f"appending {_token(c['token_texts'][0], c['tokens'][0])} or "
                f"{_token(c['token_texts'][1], c['tokens'][1])} gives states {fmt_distance(c['distance'], 6)} apart. "
                "The prompt:", "", _text_block(base.get("base_text"))]
    if result["across_sets"]:
        out += ["", f"Across all {S} sets together (C({S * n:,}, 2) pairs per layer):", "",
                "| layer | pairs | min distance | certified | collisions | closest pair |",
                "|---:|---:|---:|:---:|---:|---|"]
        for e in result["across_sets"]:
            c = e["closest_pair"]
            pair = "-" if c is None else \
                f"{_token(c['token_texts'][0], c['tokens'][0])} after prompt {c['base_prompt_ids'][0]} vs " \
                f"{_token(c['token_texts'][1], c['tokens'][1])} after prompt {c['base_prompt_ids'][1]}"
            out.append(_table_row(e["layer"], e, pair))
        if result["across_sets"][0]["layer"] == 0:
            out += ["", "At layer 0 a continuation's state is the appended token's embedding (plus a position "
                    "embedding in models that have one), so the same token appended to two prompts collides there "
                    "by construction (with position embeddings: when the two prompts have the same length)."]
    t = result["timings"]
    out += ["", f"Time: extraction {t['extract_s']:.1f} s, search {t['search_s']:.1f} s"
            + (f", across sets {t['across_sets_s']:.1f} s" if "across_sets_s" in t else "")
            + f" ({result['device']}, {result['batch_size']} continuations per step)."]
    if per_set:
        shown = result["layers"][-6:]
        out += ["", "### Per prompt set", "", "| set | base prompt | prefix tokens | "
                + " | ".join(f"min at layer {k}" for k in shown) + " |", "|---:|---:|---:|" + "---:|" * len(shown)]
        for s in result["sets"]:
            mins = {e["layer"]: e["min_distance"] for e in s["layers"]}
            out.append(f"| {s['set']} | {s['base_prompt_id']} | {s['prefix_tokens']} | "
                       + " | ".join(fmt_distance(mins[k], 6) for k in shown) + " |")
    if figure:
        out += ["", f"![exhaustive continuation test]({figure})"]
    return "\n".join(out) + "\n"


def render_margin(result: dict, figure: str | None, per_set: bool) -> str:
    """Markdown of a margin result (report.md section or margin.md)."""
    tok, S = result["tokens"], result["n_sets"]
    paper = any(e["paper_gpt2_small"] is not None for e in result["per_layer"])
    out = ["## Margin of single-token continuations", "",
           f"For each of {S} prompts, {tok['n_tokens']:,} single-token continuations (a seeded sample per prompt, "
           f"seed {tok['seed']}); the minimum pairwise L2 among them at each layer, then the mean over prompts "
           "(the paper's appendix experiment).", "",
           "| layer | mean min distance | std | smallest | largest | certified | collisions |"
           + (" paper, GPT-2 Small |" if paper else ""),
           "|---:|---:|---:|---:|---:|:---:|---:|" + ("---:|" if paper else "")]
    for e in result["per_layer"]:
        out.append(f"| {e['layer']} | {fmt_distance(e['mean_min_distance'], 4)} | {fmt_distance(e['std_min_distance'], 3)} | "
                   f"{fmt_distance(e['min_min_distance'], 4)} | {fmt_distance(e['max_min_distance'], 4)} | "
                   f"{'yes' if e['certified'] else '**no**'} | {e['n_collisions']:,} |"
                   + (f" {fmt_distance(e['paper_gpt2_small'], 4)} |" if paper else ""))
    t = result["timings"]
    out += ["", f"Time: extraction {t['extract_s']:.1f} s, search {t['search_s']:.1f} s ({result['device']})."]
    if per_set:
        out += ["", "### Per prompt", "", "| prompt | prefix tokens | " +
                " | ".join(f"layer {k}" for k in result["layers"][-6:]) + " |",
                "|---:|---:|" + "---:|" * len(result["layers"][-6:])]
        for s in result["sets"]:
            out.append(f"| {s['base_prompt_id']} | {s['prefix_tokens']} | "
                       + " | ".join(fmt_distance(e["min_distance"], 4) for e in s["layers"][-6:]) + " |")
    if figure:
        out += ["", f"![margin of single-token continuations]({figure})"]
    return "\n".join(out) + "\n"


def extend_report(run_dir: Path, mode: str, summary: dict, section: str, figure: str) -> None:
    """Put ``summary`` into RUN_DIR/report.json and ``section`` into report.md (replacing an earlier one).

    Changes nothing when the run has no report.json.
    """
    report_file, md_file = run_dir / "report.json", run_dir / "report.md"
    if not report_file.is_file():
        log.warning("%s has no report.json; the results stay in %s", run_dir, run_dir / OUT_DIR)
        return
    report = json.loads(report_file.read_text())
    report[REPORT_KEYS[mode]] = summary
    if figure not in report.setdefault("figures", []):
        report["figures"].append(figure)
    _write_json(report_file, report)
    begin, end = MD_BEGIN.format(mode=mode), MD_END.format(mode=mode)
    md = md_file.read_text() if md_file.is_file() else ""
    block = f"{begin}\n{section}{end}\n"
    if begin in md and end in md:
        md = md[:md.index(begin)] + block + md[md.index(end) + len(end) + 1:]
    else:
        md = md.rstrip("\n") + "\n\n" + block
    tmp = md_file.with_name(md_file.name + ".tmp")
    tmp.write_text(md)
    os.replace(tmp, md_file)


# --------------------------------------------------------------------------- the command


def run(run_dir: Path, cfg: ExhaustiveConfig, command: str = "") -> dict:
    """The whole test on a finished run; writes RUN_DIR/exhaustive/ and extends the run's report."""
    t_start = time.perf_counter()
    validate(cfg)
    inputs = open_run(Path(run_dir), cfg)
    store, timings = inputs.store, {}
    spec = cfg.layers if cfg.layers is not None else (store.manifest["n_layers"] if cfg.mode == "exhaustive" else "all")
    layers = parse_layers(spec, int(store.manifest["n_layers"]))
    tic = time.perf_counter()
    if cfg.prompt_ids:
        ids, selection = [int(i) for i in cfg.prompt_ids], {"method": "explicit"}
    elif cfg.mode == "exhaustive":
        layer = cfg.layer_for_selection if cfg.layer_for_selection is not None else max(store.layers)
        ids, selection = select_closest(store, layer, cfg.n_prompts, inputs.threshold, cfg.search)
    else:
        if cfg.n_prompts > store.n_rows:
            raise CollideError(f"n_prompts={cfg.n_prompts} but the run's store holds {store.n_rows} prompts; "
                               f"set n_prompts<={store.n_rows}")
        ids, selection = list(range(cfg.n_prompts)), {"method": "first"}
    selection["prompt_ids"] = ids
    prompts = base_prompts(store, ids)  # bad ids fail before the model loads
    timings["select_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    lm = load_model(inputs.model_cfg)
    timings["load_model_s"] = time.perf_counter() - tic
    if lm.d != store.d or lm.n_layers != int(store.manifest["n_layers"]):
        raise CollideError(f"the model loaded from the run's config has d={lm.d}, L={lm.n_layers}, the run's store "
                           f"d={store.d}, L={store.manifest['n_layers']}; the model.* overrides must keep the model")
    log.info("model %s loaded in %.1f s on %s; %s test of %d prompts at %s", lm.name, timings["load_model_s"],
             lm.device, cfg.mode, len(ids), _layers_in_words(layers))
    if cfg.mode == "exhaustive":
        result = run_exhaustive(inputs, lm, layers, prompts, selection, cfg, timings)
    else:
        result = run_margin(inputs, lm, layers, prompts, selection, cfg, timings)
    out_dir = inputs.run_dir / OUT_DIR
    name = cfg.mode
    m = inputs.model_cfg
    result.update(created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), command=command,
                  run_dir=str(inputs.run_dir), device=str(lm.device),
                  model={"name": m.name, "source": m.source, "family": m.family, "dtype": m.dtype,
                         "final_norm": m.final_norm, "n_layers": lm.n_layers, "d": lm.d,
                         "vocab_size": int(lm.model.get_input_embeddings().weight.shape[0])},
                  timings=timings)
    total = sum(s["n_continuations"] for s in result["sets"])
    searched = sum(e["n_pairs"] for e in result["per_layer"])
    result["throughput"] = {"continuations_per_s": total / max(timings["extract_s"], 1e-9),
                            "pairs_per_s": searched / max(timings["search_s"], 1e-9)}
    tic = time.perf_counter()
    title = (f"{m.name}: {result['n_sets']} prompts x {result['sets'][0]['n_continuations']:,} continuations, "
             f"{cfg.mode}, {m.dtype}")
    figures.exhaustive_figure(result, out_dir / f"{name}.png", title)
    timings["report_s"] = time.perf_counter() - tic
    timings["wall_s"] = time.perf_counter() - t_start
    render = render_exhaustive if cfg.mode == "exhaustive" else render_margin
    (out_dir / f"{name}.md").write_text(f"# collide {name} test: {m.name}\n\n" + render(result, f"{name}.png", True))
    _write_json(out_dir / f"{name}.json", result)
    summary = {k: v for k, v in result.items() if k != "sets"}
    summary["files"] = {"json": f"{OUT_DIR}/{name}.json", "markdown": f"{OUT_DIR}/{name}.md",
                        "figure": f"{OUT_DIR}/{name}.png"}
    extend_report(inputs.run_dir, cfg.mode, summary, render(result, f"{OUT_DIR}/{name}.png", False),
                  f"{OUT_DIR}/{name}.png")
    log.info("%s test written to %s in %.1f s (extraction %.1f s, search %.1f s)", name, out_dir / f"{name}.json",
             timings["wall_s"], timings["extract_s"], timings["search_s"])
    return result


def print_summary(result: dict) -> None:
    """A rich table of the per-layer results."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['mode']} test: {result['model']['name']}, {result['n_sets']} prompts")
    if result["mode"] == "exhaustive":
        for col in ("layer", "pairs", "min distance", "certified", "collisions", "identical inputs"):
            table.add_column(col, justify="right")
        for e in result["per_layer"]:
            d = e["distinct_inputs"]
            table.add_row(str(e["layer"]), f"{e['n_pairs']:,}", fmt_distance(d["min_distance"], 6),
                          "yes" if d["certified"] else "NO", f"{d['n_collisions']:,}",
                          f"{e['n_collisions_identical_inputs']:,}")
    else:
        paper = any(e["paper_gpt2_small"] is not None for e in result["per_layer"])
        for col in ("layer", "mean min distance", "smallest", "certified") + (("paper GPT-2 Small",) if paper else ()):
            table.add_column(col, justify="right")
        for e in result["per_layer"]:
            table.add_row(str(e["layer"]), fmt_distance(e["mean_min_distance"], 4), fmt_distance(e["min_min_distance"], 4),
                          "yes" if e["certified"] else "NO", *([fmt_distance(e["paper_gpt2_small"], 4)] if paper else []))
    Console().print(table)


USAGE = """usage: python -m collide.exhaustive RUN_DIR [key=value ...]

Keys (Hydra-style overrides of ExhaustiveConfig; defaults below):
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print(USAGE + OmegaConf.to_yaml(OmegaConf.structured(ExhaustiveConfig)))
        return 0
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        run_dir, cfg = parse_args(argv)
        print_summary(run(run_dir, cfg, "python -m collide.exhaustive " + shlex.join(argv)))
    except CollideError as exc:
        print(f"collide: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("collide: error: interrupted; finished sets and complete shards are kept: rerun the same command "
              "to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
