"""Extraction stage: batched forward passes streamed into a store, one shard at a time.

``extract_to_store`` turns a deterministic prompt stream into a store (``collide.store``):

1. Drop prompts whose token-id sequence was seen before (counted), and number the distinct ones
   0, 1, 2, ... in stream order.
2. Cut them into shards of ``store.shard_rows`` prompts. Within a shard, sort by length (stable)
   and fill batches up to a token budget (prompts x padded length), so that prompts of similar
   length share a batch and little is padded.
3. Run each batch right-padded through ``collide.models.last_token_states`` (only the selected
   layers, stopping after the deepest) and keep each prompt's last real token; with
   ``store.positions=all``, through ``all_token_states`` and keep every real position too. States
   are converted to the storage dtype (``store.dtype``; auto = the compute dtype) on the device.
4. Hand the shard to a writer thread (``ShardPipeline``), which commits it atomically while the
   next shard runs.

Exactness: with right padding and the attention mask, a stored state equals the state of an
unpadded forward pass of that prompt alone up to floating-point reassociation (tested: 1e-5
relative in fp32; see ``BF16_RTOL`` for bf16). A forward with quantized activations turns that
reassociation into whole rounding steps (``collide.quant.batch_dependent``), so it runs one prompt
per forward, unpadded: its stored state is the prompt's own, whatever the batching parameters.
Determinism: which prompts share a batch depends only on the stream and the batching parameters
(``shard_rows``, ``batch_tokens``, ``max_batch_size``), which the manifest records and a resumed
run reuses, so on CPU a resumed store is bit-identical to an uninterrupted one.
Memory: one shard of prompts and states (plus the one being written) and a 16-byte digest per
distinct prompt for deduplication; nothing else grows with the number of prompts.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import time
from typing import Callable, Iterable, Iterator

import numpy as np
import psutil
import torch

from collide import quant as quantization
from collide.config import ExtractConfig, StoreConfig
from collide.corpus import Prompt
from collide.errors import CollideError
from collide.models import DTYPES, LoadedModel, all_token_states, last_token_states
from collide.store import ShardPipeline, Store, StoreWriter, open_store, prompt_table
from collide.console import progress

log = logging.getLogger(__name__)

# Relative tolerance ||batched - alone|| / ||alone|| of a stored state in bf16 (fp32: 1e-5). A bf16
# forward rounds every activation to 8 significant bits (2^-8 = 0.0039 relative), and padding
# changes the shapes, hence the reduction orders, of the matmuls, so the two forwards round
# differently. Measured on 60 mixed-length prompts of the tiny random models, all layers: GPT-2
# 6.0e-3, Llama 7.1e-3, Gemma-3 1.4e-2 (fp32: below 1e-6). Tested against this bound.
BF16_RTOL = 3e-2
MEMORY_FRACTION = 0.25  # share of the free memory that one batch's activations may take
CPU_MAX_BATCH_TOKENS = 4096  # bigger CPU batches do not run faster; they only hold more memory
GPU_MAX_BATCH_TOKENS = 1 << 17  # past this the GPU is saturated for any model worth running


def layer_convention(final_norm: str, n_layers: int) -> str:
    """The layer convention in words, as the manifest records it."""
    last = "after the final norm (HF hidden_states[-1])" if final_norm == "post" else \
        "before the final norm (raw residual stream, as the paper's code)"
    return (f"layer k = HF hidden_states[k]: 0 = embedding output, k = output of block k (1..{n_layers}); "
            f"layer {n_layers} is taken {last}; state of the last real token")


def pad_id(lm: LoadedModel) -> int:
    """Id used for padding: the tokenizer's pad token, else its EOS, else 0 (only the mask matters)."""
    for token in (getattr(lm.tokenizer, "pad_token_id", None), getattr(lm.tokenizer, "eos_token_id", None)):
        if isinstance(token, int):
            return token
    return 0


# --------------------------------------------------------------------------- the prompt stream


class DistinctPrompts:
    """Iterate (prompt, token ids int32, 16-byte digest) for the distinct prompts of a stream.

    Prompts are distinct by token-id sequence (blake2b-128 digest of the int32 ids; a digest
    collision, odds ~n^2 / 2^129, would drop a prompt). ``n_items`` and ``n_duplicates`` count the
    stream up to and including the last prompt returned, so they do not depend on what follows it.
    """

    def __init__(self, prompts: Iterable[Prompt]):
        self._it = iter(prompts)
        self._seen: set[bytes] = set()  # digests of the distinct sequences so far
        self._read = 0  # stream items read so far
        self.n_items = 0  # stream position (1-based) of the last distinct prompt returned
        self.n_duplicates = 0  # duplicates before that position

    def __iter__(self) -> Iterator[tuple[Prompt, np.ndarray, bytes]]:
        return self

    def __next__(self) -> tuple[Prompt, np.ndarray, bytes]:
        for prompt in self._it:
            self._read += 1
            tokens = np.asarray(prompt.token_ids, dtype=np.int32)
            if tokens.ndim != 1 or len(tokens) == 0:
                raise CollideError(f"prompt {prompt.source!r} has no tokens; the corpus must give non-empty "
                                   "token windows (check corpus.min_tokens)")
            key = hashlib.blake2b(tokens.tobytes(), digest_size=16).digest()
            if key in self._seen:
                continue
            self._seen.add(key)
            self.n_duplicates += self._read - self.n_items - 1
            self.n_items = self._read
            return prompt, tokens, key
        raise StopIteration


def skip_committed(stream: DistinctPrompts, shards: list[dict], store_dir) -> None:
    """Re-draw the prompts of the committed shards and check that the stream is the same one.

    Each shard records its stream position and a digest of its prompts' token ids; a difference
    means the corpus or the sampling changed under the store.
    """
    for shard in shards:
        keys = [key for _, _, key in itertools.islice(stream, shard["rows"])]
        if (len(keys) != shard["rows"] or stream.n_items != shard["stream_items"]
                or hashlib.sha256(b"".join(keys)).hexdigest() != shard["tokens_sha256"]):
            raise CollideError(f"the prompt stream differs from the one that wrote shard {shard['index']} of "
                               f"{store_dir} (the corpus files or the sampling changed); use a new store.path "
                               "or delete the store to start over")


# --------------------------------------------------------------------------- batching


def plan_batches(lengths: np.ndarray, batch_tokens: int, max_batch_size: int, bucket: bool = True) -> list[np.ndarray]:
    """Split rows 0..n-1 into batches whose padded size (rows x longest length) fits ``batch_tokens``.

    ``bucket=True`` orders rows by length (stable, ties by row) before filling batches greedily, so
    a batch holds prompts of similar length; ``bucket=False`` keeps the given order (the baseline
    the benchmark compares with). A prompt longer than the budget gets a batch of its own. The
    plan depends only on the arguments: it is what makes resumed runs bit-identical.
    """
    order = np.argsort(lengths, kind="stable") if bucket else np.arange(len(lengths))
    batches, current, longest = [], [], 0
    for row in order:
        grown = max(longest, int(lengths[row]))
        if current and (len(current) == max_batch_size or (len(current) + 1) * grown > batch_tokens):
            batches.append(np.array(current))
            current, grown = [], int(lengths[row])
        current.append(row)
        longest = grown
    if current:
        batches.append(np.array(current))
    return batches


def model_widths(lm: LoadedModel) -> tuple[int, int, int, int]:
    """(heads, head_dim, intermediate size, bytes per element) of ``lm``, for memory estimates."""
    cfg = lm.model.config.get_text_config()
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 1
    head_dim = getattr(cfg, "head_dim", None) or lm.d // heads
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * lm.d
    return heads, head_dim, inter, torch.finfo(DTYPES[lm.dtype]).bits // 8


def free_memory(device: torch.device) -> int:
    """Bytes free now where ``device`` computes: CUDA ``mem_get_info``, else psutil's available RAM."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available


def auto_batch_tokens(lm: LoadedModel, longest: int, n_layers_kept: int, every_position: bool = False) -> int:
    """A token budget per batch from the memory free now and the model's shape.

    Per token of a batch a forward pass holds about 6 d (residual, q, k, v, attention output,
    norm) + 2 x intermediate (MLP) activations plus one attention-score row per head (heads x T)
    in the compute dtype, and each prompt keeps n_layers_kept fp32 rows of d (``every_position``:
    each token keeps n_layers_kept rows of d in the compute dtype); MEMORY_FRACTION of
    the free memory (CUDA: ``mem_get_info``; CPU: psutil available) is given to that, capped by
    what still speeds the device up. Never below ``longest``, so one prompt always fits.
    """
    d = lm.d
    heads, _, inter, elem = model_widths(lm)
    per_token = elem * (6 * d + 2 * inter + heads * longest + (d * n_layers_kept if every_position else 0)) \
        + 4 * d * n_layers_kept
    free = free_memory(lm.device)
    cap = GPU_MAX_BATCH_TOKENS if lm.device.type == "cuda" else CPU_MAX_BATCH_TOKENS
    budget = max(longest, min(cap, int(MEMORY_FRACTION * free / per_token)))
    log.info("batch budget: %d tokens (%.1f GiB free, ~%d bytes per token)", budget, free / 2**30, per_token)
    return budget


def pad_batch(seqs: list[np.ndarray], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (batch, T) input ids and attention mask (1 = real token) on ``device``."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def host_array(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor as the numpy array the store takes: float32, float16, or bfloat16 as uint16 bits."""
    return tensor.view(torch.int16).numpy().view(np.uint16) if tensor.dtype == torch.bfloat16 else tensor.numpy()


def launch_shard(lm: LoadedModel, seqs: list[np.ndarray], layers: list[int], batch_tokens: int,
                 max_batch_size: int, bucket: bool = True, on_batch: Callable[[int, int], None] | None = None,
                 dtype: str = "fp32", every_position: bool = False,
                 ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray] | None, Callable[[], None]]:
    """Queue the forward passes of one shard; returns ({layer: (n, d)}, {layer: (tokens, d)} | None, wait).

    Row i of the first dict is the last-token state of ``seqs[i]`` (token ids, BOS included);
    with ``every_position`` the second holds the state at every position, prompt by prompt
    (``seqs[0]``'s positions 0..len-1, then ``seqs[1]``'s, ...), else it is None. States are in
    the storage ``dtype`` (``host_array``: bf16 as uint16 bits), converted on the device. Batches
    follow ``plan_batches``, and ``on_batch(prompts, tokens)`` is called as each batch is queued.
    Last-token states gather on the model's device and reach the host in one copy per shard. On a
    GPU that copy is asynchronous (pinned memory): the arrays are valid only after ``wait()``, so
    the host can queue the next shard meanwhile. On the CPU ``wait`` has nothing to do.
    Every-position states, a shard's tokens x layers x d, go to host memory batch by batch, so
    device memory stays bounded by one batch.
    """
    lengths = np.fromiter((len(s) for s in seqs), np.int64, count=len(seqs))
    if quantization.batch_dependent(lm.quant):  # such a forward is one function only prompt by prompt
        max_batch_size = 1
    offsets = np.concatenate([[0], np.cumsum(lengths)])  # row i's positions start at offsets[i]
    storage = DTYPES.get(dtype, torch.float32)  # int8 / int4 are quantized by the store, from float32
    gathered = torch.empty((len(layers), len(seqs), lm.d), dtype=storage, device=lm.device)
    every = torch.empty((len(layers), int(offsets[-1]), lm.d), dtype=storage) if every_position else None
    pad = pad_id(lm)
    for rows in plan_batches(lengths, batch_tokens, max_batch_size, bucket):
        ids, mask = pad_batch([seqs[i] for i in rows], pad, lm.device)
        if every is None:
            states = last_token_states(lm, ids, mask, layers)
            if lm.noise is not None:
                states = quantization.add_noise(states, [seqs[i] for i in rows], lm.noise)
        else:
            full = all_token_states(lm, ids, mask, layers)
            last, batch = torch.from_numpy(lengths[rows] - 1).to(lm.device), torch.arange(len(rows), device=lm.device)
            states = {k: full[k][batch, last] for k in layers}
            where = torch.from_numpy(np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in rows]))
            every[:, where] = torch.stack([full[k][mask.bool()] for k in layers]).to(storage).cpu()
        gathered[:, torch.from_numpy(rows).to(lm.device)] = torch.stack([states[k] for k in layers]).to(storage)
        if on_batch is not None:
            on_batch(len(rows), int(lengths[rows].sum()))
    if lm.device.type == "cuda":
        host = torch.empty(gathered.shape, dtype=storage, pin_memory=True)
        host.copy_(gathered, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        wait = copied.synchronize
    else:
        host, wait = gathered, lambda: None
    last_rows = {k: host_array(host[slot]) for slot, k in enumerate(layers)}
    positions = None if every is None else {k: host_array(every[slot]) for slot, k in enumerate(layers)}
    return last_rows, positions, wait


def forward_shard(lm: LoadedModel, seqs: list[np.ndarray], layers: list[int], batch_tokens: int,
                  max_batch_size: int, bucket: bool = True,
                  on_batch: Callable[[int, int], None] | None = None) -> dict[int, np.ndarray]:
    """{layer: (n, d) float32} last-token states of ``seqs``, row i = seqs[i] (``launch_shard``, waited for)."""
    states, _, wait = launch_shard(lm, seqs, layers, batch_tokens, max_batch_size, bucket, on_batch)
    wait()
    return states


def forward_shard_adaptive(lm: LoadedModel, seqs: list[np.ndarray], layers: list[int], batch_tokens: int,
                           max_batch_size: int, on_batch: Callable[[int, int], None] | None = None,
                           dtype: str = "fp32", every_position: bool = False,
                           ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray] | None, Callable[[], None], int]:
    """``launch_shard`` that halves the token budget and redoes the shard on out-of-memory.

    Returns the last-token states, the every-position states (or None), their ``wait``, and the
    budget that worked (recorded with the shard, reused afterwards).
    A failed attempt's progress is taken back with a negative ``on_batch(-prompts, -tokens)``.
    """
    while True:
        done = [0, 0]  # prompts, tokens of this attempt

        def counted(prompts: int, tokens: int) -> None:
            done[0] += prompts
            done[1] += tokens
            if on_batch is not None:
                on_batch(prompts, tokens)
        try:
            return (*launch_shard(lm, seqs, layers, batch_tokens, max_batch_size, on_batch=counted, dtype=dtype,
                                  every_position=every_position), batch_tokens)
        except torch.OutOfMemoryError:
            if on_batch is not None:
                on_batch(-done[0], -done[1])
            if batch_tokens // 2 < min(len(s) for s in seqs):
                raise CollideError(f"out of GPU memory on {lm.device} even with one prompt per batch; use a "
                                   "smaller model or model.dtype=bf16, or free the GPU") from None
            log.warning("out of GPU memory with batches of %d tokens; halving to %d and redoing the shard",
                        batch_tokens, batch_tokens // 2)
            batch_tokens //= 2
            if lm.device.type == "cuda":
                torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the stage


def _commit_when_ready(writer: StoreWriter, wait: Callable[[], None], prompts, states: dict, info: dict,
                       positions: dict | None) -> dict:
    """Writer-thread task: wait for the shard's states to reach the host, then commit the shard."""
    wait()
    return writer.commit_shard(prompts, states, info, positions)


def store_header(lm: LoadedModel, layers: list[int], n_prompts: int, store_cfg: StoreConfig,
                 extract_cfg: ExtractConfig) -> dict:
    """Facts recorded at the top of the manifest (see StoreWriter.open); ``dtype`` is the storage
    dtype (store.dtype, auto = the model's compute dtype ``model.dtype``)."""
    dtype = lm.dtype if store_cfg.dtype == "auto" else str(store_cfg.dtype)
    return dict(
        model=dict(name=lm.name, source=lm.source, revision=lm.revision, family=lm.model.config.model_type,
                   dtype=lm.dtype, device=str(lm.device)),
        dtype=dtype, quant_granularity=str(store_cfg.quant_granularity), positions=str(store_cfg.positions),
        final_norm=lm.final_norm, layer_convention=layer_convention(lm.final_norm, lm.n_layers),
        layers=layers, d=lm.d, n_layers=lm.n_layers, n_prompts=n_prompts, keep_text=bool(store_cfg.keep_text),
        shard_rows=int(store_cfg.shard_rows), batch_tokens=int(extract_cfg.batch_tokens) or None,
        max_batch_size=int(extract_cfg.max_batch_size))


def finish_store(writer: StoreWriter, n_done: int, n_prompts: int, store_dir, seconds: float) -> Store:
    """Mark the store complete once the stream gave ``n_prompts`` distinct prompts; else record where
    the stream ended (the store stays resumable with a smaller n_prompts) and raise CollideError."""
    if n_done < n_prompts:
        writer.mark_stream_end(n_done)
        if n_done < 2:  # no pair to compare: no smaller n_prompts helps
            raise CollideError(f"the corpus gave {n_done} distinct prompt(s), and a pair needs 2 (documents shorter "
                               "than corpus.min_tokens tokens are skipped); use a larger corpus or a smaller "
                               "corpus.min_tokens")
        raise CollideError(f"the corpus gave only {n_done} distinct prompts, fewer than n_prompts={n_prompts}; "
                           f"set n_prompts<={n_done} or use a larger corpus (n_prompts={n_done} store.path={store_dir} "
                           "finishes this store from the prompts already extracted)")
    return writer.finish(seconds)


def extract_to_store(lm: LoadedModel, prompts: Iterable[Prompt], layers: list[int], store_dir, n_prompts: int,
                     identity: dict, store_cfg: StoreConfig, extract_cfg: ExtractConfig) -> Store:
    """Extract the states of the first ``n_prompts`` distinct prompts into ``store_dir``.

    Last-token states always; with ``store_cfg.positions == "all"`` the state at every position
    too. States are stored in ``store_cfg.dtype`` (auto = the model's compute dtype).

    Creates the store, or resumes an ``in-progress`` one made with the same ``identity`` (a
    JSON-able dict: model and corpus configs, seed, layers, dtype, n_prompts, ...); a complete
    store is returned as it is. ``prompts`` must be the same deterministic stream on every run.
    Raises CollideError (after committing every prompt it got) when the stream holds fewer than
    ``n_prompts`` distinct prompts. KeyboardInterrupt lets the shard being written finish, so the
    store stays resumable.
    """
    t_start = time.perf_counter()
    layers = sorted({int(k) for k in layers})
    if not layers or layers[0] < 0 or layers[-1] > lm.n_layers:
        raise CollideError(f"layers={layers} is out of range: {lm.name} has layers 0..{lm.n_layers}")
    if n_prompts < 1:
        raise CollideError(f"n_prompts={n_prompts} must be at least 1")
    if store_cfg.shard_rows < 1 or extract_cfg.max_batch_size < 1 or extract_cfg.batch_tokens < 0:
        raise CollideError(f"store.shard_rows={store_cfg.shard_rows} and extract.max_batch_size="
                           f"{extract_cfg.max_batch_size} must be >= 1, extract.batch_tokens="
                           f"{extract_cfg.batch_tokens} >= 0 (0 = automatic)")
    writer = StoreWriter.open(store_dir, identity, store_header(lm, layers, n_prompts, store_cfg, extract_cfg))
    with contextlib.closing(writer):  # the lock on the store is released however this ends
        if writer.complete:
            log.info("store %s is complete already (%d prompts); nothing to extract", store_dir, writer.n_rows)
            return open_store(store_dir)
        shard_rows, max_batch = writer.batching("shard_rows"), writer.batching("max_batch_size")
        budget = writer.batching("batch_tokens")
        stream = DistinctPrompts(prompts)
        skip_committed(stream, writer.shards, store_dir)
        first_id = start_id = writer.n_rows
        bar = progress(total=n_prompts, initial=first_id, unit="prompt", desc="extract",
                   disable=not extract_cfg.progress)
        t_run, n_tokens = time.perf_counter(), [0]  # tokens forwarded this run

        def on_batch(prompts: int, tokens: int) -> None:
            n_tokens[0] += tokens
            bar.update(prompts)
            bar.set_postfix_str(f"{n_tokens[0] / max(time.perf_counter() - t_run, 1e-9):,.0f} tok/s", refresh=False)

        every_position, dtype = writer.manifest["positions"] == "all", writer.manifest["dtype"]
        try:
            with ShardPipeline() as pipeline:
                while first_id < n_prompts:
                    wanted = min(shard_rows, n_prompts - first_id)
                    shard = list(itertools.islice(stream, wanted))
                    if not shard:
                        break
                    seqs = [tokens for _, tokens, _ in shard]
                    if budget is None:
                        budget = auto_batch_tokens(lm, max(len(s) for s in seqs), len(layers), every_position)
                    t0 = time.perf_counter()
                    states, positions, wait, budget = forward_shard_adaptive(lm, seqs, layers, budget, max_batch,
                                                                             on_batch, dtype, every_position)
                    table = prompt_table(first_id, seqs, [p.source for p, _, _ in shard],
                                         [p.text for p, _, _ in shard] if writer.manifest["keep_text"] else None)
                    info = dict(stream_items=stream.n_items, n_duplicates=stream.n_duplicates,
                                tokens_sha256=hashlib.sha256(b"".join(key for _, _, key in shard)).hexdigest(),
                                batch_tokens=budget, forward_s=round(time.perf_counter() - t0, 6))
                    pipeline.submit(_commit_when_ready, writer, wait, table, states, info, positions)
                    first_id += len(shard)
                    if len(shard) < wanted:
                        break
        finally:
            bar.close()
        seconds = time.perf_counter() - t_start
        store = finish_store(writer, first_id, n_prompts, store_dir, seconds)
        log.info("extracted %d prompts into %s (%d this run, %d duplicates dropped) in %.1f s: %.1f prompts/s, "
                 "%.0f tokens/s", store.n_rows, os.fspath(store_dir), first_id - start_id,
                 store.manifest["counts"]["n_duplicates"], seconds, (first_id - start_id) / max(seconds, 1e-9),
                 n_tokens[0] / max(seconds, 1e-9))
        return store
