"""Continuation state engine: last-token states of prefix+token for many tokens, from one prefix pass.

All continuations of a prompt share its prefix, so the prefix runs once with a KV cache and
every candidate next token is one batched single-token step against that cache: a step costs B
tokens of compute instead of B * (P + 1) for full forwards of prefix+token (P = prefix length).

Conventions (as in ``collide.models``):

* layer k is HF ``hidden_states[k]`` (0 = embeddings, L = last; ``lm.final_norm`` says whether
  layer L is read after the final norm);
* a state is the hidden state at the appended token, i.e. position P of the sequence
  ``prefix + [token]``, which is exactly what a full forward of that sequence gives at its last
  token (within fp32 round-off; ``tests/test_exhaustive.py`` checks it on each tiny architecture);
* the prefix is fed as is: it holds the model's BOS where the run's prompts did.

Exactness property: a token enters the model only through its input-embedding row, so tokens
whose rows are bitwise identical have identical continuation states. The engine computes each
distinct row once and copies the result, so such tokens get *bitwise* identical states (distance
exactly 0 at every layer), whatever the batching.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from collide.models import LoadedModel, last_token_states

log = logging.getLogger(__name__)


@dataclass
class ContinuationBlock:
    """States of a block of continuations of one prefix, in the order of ``tokens``."""

    tokens: np.ndarray  # (b,) int64 appended token ids
    states: dict[int, torch.Tensor]  # {layer: (b, d) float32 tensor on the CPU}


def input_groups(lm: LoadedModel, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group ``tokens`` by bitwise-identical input-embedding rows.

    Returns ``(first, group)``: ``first`` (g,) holds the index in ``tokens`` of the first token of
    each group, ascending; ``group`` (n,) maps each token to its group number (an index into
    ``first``). Without duplicate rows, ``first == arange(n)`` and ``group == arange(n)``.
    """
    weight = lm.model.get_input_embeddings().weight
    rows = weight.detach()[torch.as_tensor(tokens, device=weight.device)].cpu().contiguous().numpy()
    keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    _, first, group = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # number groups by first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order], rank[group.ravel()]


@torch.no_grad()
def prefix_cache(lm: LoadedModel, prefix: Sequence[int]):
    """Run ``prefix`` (token ids, BOS included where wanted) once and return its KV cache (batch 1)."""
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=lm.device)
    out = lm.decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    return out.past_key_values


def _expand(cache, batch: int):
    """A batch-``batch`` view of a batch-1 cache: the prefix keys/values are broadcast, not copied.

    The cache's update concatenates new keys onto these views into fresh tensors, so the shared
    prefix cache is never modified and can serve every batch.
    """
    view = copy.copy(cache)
    view.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in view.layers:
        if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel():
            layer.keys = layer.keys.expand(batch, *layer.keys.shape[1:])
            layer.values = layer.values.expand(batch, *layer.values.shape[1:])
    return view


@torch.no_grad()
def step_states(lm: LoadedModel, cache, prefix_len: int, tokens: torch.Tensor,
                layers: list[int]) -> dict[int, torch.Tensor]:
    """States of prefix+t for each t in ``tokens`` ((b,) int64 on ``lm.device``): one single-token step.

    Position ids and the cache position follow from the cache length (P = ``prefix_len``), and the
    attention mask covers the P cached tokens plus the new one. Returns {layer: (b, d)} in the
    model's compute dtype, on its device.
    """
    batch = tokens.shape[0]
    mask = torch.ones(batch, prefix_len + 1, dtype=torch.long, device=lm.device)
    return last_token_states(lm, tokens[:, None], mask, layers, past_key_values=_expand(cache, batch),
                             use_cache=True)


def continuation_states(lm: LoadedModel, prefix: Sequence[int], tokens: Sequence[int] | np.ndarray,
                        layers: list[int], batch_size: int = 256,
                        progress=None) -> Iterator[ContinuationBlock]:
    """Stream the states of prefix+t for every token t of ``tokens``, computed against one KV cache.

    Blocks come in the order of ``tokens`` except that tokens with bitwise-identical input
    embeddings (see ``input_groups``) are moved next to the first of them and share its state, so
    they are bitwise equal. Each block covers at most ``batch_size`` distinct inputs (one model
    step). States are float32 on the CPU. ``progress`` (a tqdm-like object) is advanced by the
    number of continuations in each block.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    first, group = input_groups(lm, tokens)
    order = np.argsort(group, kind="stable")  # tokens grouped by input row, groups by first occurrence
    bounds = np.searchsorted(group[order], np.arange(0, len(first) + batch_size, batch_size))
    t0 = time.perf_counter()
    cache = prefix_cache(lm, prefix)
    for start in range(0, len(first), batch_size):
        distinct = torch.as_tensor(tokens[first[start:start + batch_size]], device=lm.device)
        states = step_states(lm, cache, len(prefix), distinct, layers)
        rows = order[bounds[start // batch_size]:bounds[start // batch_size + 1]]
        pick = torch.as_tensor(group[rows] - start, device=lm.device)
        block = ContinuationBlock(tokens=tokens[rows],
                                  states={k: v[pick].float().cpu() for k, v in states.items()})
        if progress is not None:
            progress.update(len(rows))
        yield block
    log.info("%d continuations (%d distinct input rows) of a %d-token prefix in %.2f s", len(tokens),
             len(first), len(prefix), time.perf_counter() - t0)


@torch.no_grad()
def full_forward_states(lm: LoadedModel, prefix: Sequence[int], tokens: Sequence[int] | np.ndarray,
                        layers: list[int], batch_size: int = 32) -> Iterator[ContinuationBlock]:
    """The reference: states of prefix+t by a full forward of each sequence, ``batch_size`` at a time.

    Same output as ``continuation_states`` (without grouping identical inputs); the benchmark's
    baseline and the tests' ground truth.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    head = torch.tensor(list(prefix), dtype=torch.long, device=lm.device)
    for start in range(0, len(tokens), batch_size):
        tail = torch.as_tensor(tokens[start:start + batch_size], device=lm.device)
        ids = torch.cat([head.expand(len(tail), -1), tail[:, None]], dim=1)
        states = last_token_states(lm, ids, torch.ones_like(ids), layers)
        yield ContinuationBlock(tokens=tokens[start:start + batch_size],
                                states={k: v.float().cpu() for k, v in states.items()})
