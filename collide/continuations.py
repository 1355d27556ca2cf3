"""Continuation state engine: last-token states of prefix+token for many tokens, from one prefix pass.

All continuations of a prompt share its prefix, so the prefix runs once with a KV cache and
every candidate next token is one batched single-token step against that cache: a step costs B
tokens of compute instead of B * (P + 1) for full forwards of prefix+token (P = prefix length).
On architectures that call transformers' attention interface, a step's attention
(``prefix_attention``) reads the one prefix copy directly instead of a per-continuation copy of it.

Conventions (as in ``collide.models``):

* layer k is HF ``hidden_states[k]`` (0 = embeddings, L = last; ``lm.final_norm`` says whether
  layer L is read after the final norm);
* a state is the hidden state at the appended token, i.e. position P of the sequence
  ``prefix + [token]``, which is exactly what a full forward of that sequence gives at its last
  token (within fp32 round-off; ``tests/exhaustive/test_exhaustive.py`` checks it on each tiny architecture);
* the prefix is fed as is: it holds the model's BOS where the run's prompts did.

Exactness property: a token enters the model only through its input-embedding row, so tokens
whose rows are bitwise identical have identical continuation states. The engine computes each
distinct row once and copies the result, so such tokens get *bitwise* identical states (distance
exactly 0 at every layer), whatever the batching.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from transformers import AttentionInterface
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from collide.errors import CollideError
from collide.models import LoadedModel, capture_layers, last_token_states

log = logging.getLogger(__name__)

SUPPORTED_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)  # KV-cache layer types the engine can share
# Architectures whose attention modules call transformers' attention interface right after the
# cache update (model_type): their steps use prefix_attention, the others concatenate the prefix.
INTERFACE_ATTENTION = ("llama", "mistral", "gemma3_text", "gemma3", "gpt2", "phi3", "qwen2")
PREFIX_ATTENTION = "collide_prefix"  # attention implementation name registered for the steps


@dataclass
class StepKV:
    """Keys (or values) of a single-token step, the shared prefix's kept apart from each step's own.

    What the shared cache hands to ``prefix_attention``: the prefix is never copied per continuation.
    """

    prefix: torch.Tensor  # (1, kv_heads, P, head_dim): the prefix's, shared by the whole batch
    step: torch.Tensor  # (b, kv_heads, 1, head_dim): each continuation's own token's


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
    rows = weight.detach()[torch.as_tensor(tokens, device=weight.device)].cpu().contiguous()
    rows = rows.view(torch.uint8).numpy()  # the raw bytes: bitwise identity in any dtype (numpy has no bf16)
    keys = rows.view(np.dtype((np.void, rows.shape[1]))).ravel()
    _, first, group = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # number groups by first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order], rank[group.ravel()]


@torch.no_grad()
def prefix_cache(lm: LoadedModel, prefix: Sequence[int]):
    """Run ``prefix`` (token ids, BOS included where wanted) once; its KV cache, ready for ``step_states``."""
    ids = torch.tensor([list(prefix)], dtype=torch.long, device=lm.device)
    out = lm.decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    return shared_prefix(out.past_key_values, split=uses_prefix_attention(lm))


def uses_prefix_attention(lm: LoadedModel) -> bool:
    """Whether the steps of ``lm`` run ``prefix_attention`` (its architecture is in INTERFACE_ATTENTION)."""
    return lm.model.config.model_type in INTERFACE_ATTENTION


def prefix_attention(module, query: torch.Tensor, key: StepKV, value: StepKV, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of b single-token queries over the shared prefix plus each query's own token.

    query: (b, heads, 1, head_dim); key/value: StepKV with kv_heads dividing heads (grouped-query
    attention: query head i reads kv head i // (heads / kv_heads), as ``repeat_kv`` lays them out).
    The scores against the prefix are one batched GEMM per kv head against the single prefix copy;
    everything runs in fp32, whatever the model's dtype. ``attention_mask``: None or the 4-D mask of
    ``sdpa_mask`` (bool, True = attend, or additive float). Returns (b, 1, heads, head_dim), as
    transformers' sdpa attention does.
    """
    if kwargs.get("softcap") is not None or dropout:
        raise CollideError(f"{type(module).__name__} asks for logit soft-capping or dropout, which prefix_attention "
                           "does not do; remove its model_type from continuations.INTERFACE_ATTENTION so that its "
                           "steps use the model's own attention")
    b, heads, _, head_dim = query.shape
    kv_heads = key.prefix.shape[1]
    f32 = torch.float32  # the arithmetic of sdpa's CPU kernels for half types too (fp32 is a no-op)
    q = query.reshape(b, kv_heads, heads // kv_heads, head_dim).to(f32)
    scale = scaling if scaling is not None else head_dim ** -0.5
    scores = torch.cat([torch.einsum("bkgd,kpd->bkgp", q, key.prefix[0].to(f32)),
                        q @ key.step.to(f32).transpose(-1, -2)], dim=-1) * scale
    if attention_mask is not None:
        mask = attention_mask.reshape(attention_mask.shape[0], 1, 1, -1)[..., -scores.shape[-1]:]
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.to(f32)
    probs = torch.softmax(scores, dim=-1)
    out = (torch.einsum("bkgp,kpd->bkgd", probs[..., :-1], value.prefix[0].to(f32))
           + probs[..., -1:] * value.step.to(f32))
    return out.to(query.dtype).reshape(b, 1, heads, head_dim), None


AttentionInterface.register(PREFIX_ATTENTION, prefix_attention)
AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)


def _shared_update(layer, split: bool, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
    """Cache update of a single-token step against a shared prefix: attend, but keep nothing.

    ``split``: return StepKV pairs for ``prefix_attention`` (no copy at all). Otherwise return the
    prefix keys/values broadcast to the batch followed by the new token's, exactly what
    ``DynamicLayer.update`` and ``DynamicSlidingWindowLayer.update`` return for this step; only one
    layer's (batch, heads, P + 1, head_dim) keys are alive at a time. Either way the layer stays
    unchanged: every step starts again from the prefix.
    """
    if split:
        return StepKV(layer.keys, key_states), StepKV(layer.values, value_states)
    batch = key_states.shape[0]
    keys = layer.keys.expand(batch, *layer.keys.shape[1:])
    values = layer.values.expand(batch, *layer.values.shape[1:])
    return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)


def shared_prefix(cache, split: bool):
    """Turn a batch-1 prefix cache into one that serves any number of single-token steps.

    Each layer's ``update`` is replaced by ``_shared_update`` (see there; ``split`` as there). Masks
    and positions are still derived from the layer (``get_mask_sizes``, ``get_seq_length``), which
    stays at the prefix length. Supported for the cache layers of full and sliding-window attention.
    """
    for layer in cache.layers:
        if type(layer) not in SUPPORTED_LAYERS:
            raise CollideError(f"the continuation engine does not support KV-cache layers of type "
                               f"{type(layer).__name__} (supported: {[c.__name__ for c in SUPPORTED_LAYERS]}); "
                               "run collide.exhaustive on a model whose cache uses those (Llama, Mistral, Phi-3, "
                               "Qwen2, Gemma-3, GPT-2, GPT-Neo families)")
        if not layer.is_initialized:
            raise CollideError("the prefix left a KV-cache layer empty; the prefix must hold at least one token")
        layer.update = functools.partial(_shared_update, layer, split)
    return cache


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
    config = lm.model.config
    saved = config._attn_implementation
    if uses_prefix_attention(lm):
        config._attn_implementation = PREFIX_ATTENTION
    try:
        return last_token_states(lm, tokens[:, None], mask, layers, past_key_values=cache, use_cache=True)
    finally:
        config._attn_implementation = saved


def continuation_states(lm: LoadedModel, prefix: Sequence[int], tokens: Sequence[int] | np.ndarray,
                        layers: list[int], batch_size: int = 256, start: int = 0, progress=None,
                        groups: tuple[np.ndarray, np.ndarray] | None = None) -> Iterator[ContinuationBlock]:
    """Stream the states of prefix+t for every token t of ``tokens``, computed against one KV cache.

    Blocks come in the order of ``tokens`` except that tokens with bitwise-identical input
    embeddings (see ``input_groups``) are moved next to the first of them and share its state, so
    they are bitwise equal. Each block covers ``batch_size`` distinct inputs (one model step; the
    last block fewer), so the blocks depend only on ``tokens``, the model and ``batch_size``.
    ``start`` skips the first ``start`` continuations of that order: it must be where a block
    begins (a resume point). States are float32 on the CPU. ``progress`` (a tqdm-like object) is
    advanced by the number of continuations in each block. ``groups``: ``input_groups(lm, tokens)``
    if already computed (it does not depend on the prefix, so sets sharing tokens share it).
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    first, group = groups if groups is not None else input_groups(lm, tokens)
    order = np.argsort(group, kind="stable")  # tokens grouped by input row, groups by first occurrence
    starts = list(range(0, len(first), batch_size))
    bounds = np.searchsorted(group[order], starts + [len(first)])  # row where each block begins
    if start not in bounds:
        raise ValueError(f"start={start} is not where a block begins (blocks begin at rows {bounds[:8]}...)")
    t0 = time.perf_counter()
    cache = prefix_cache(lm, prefix)
    for b in range(int(np.searchsorted(bounds, start)), len(starts)):
        lo = starts[b]
        distinct = torch.as_tensor(tokens[first[lo:lo + batch_size]], device=lm.device)
        states = step_states(lm, cache, len(prefix), distinct, layers)
        rows = order[bounds[b]:bounds[b + 1]]
        pick = torch.as_tensor(group[rows] - lo, device=lm.device)
        block = ContinuationBlock(tokens=tokens[rows], states={k: v[pick].float().cpu() for k, v in states.items()})
        if progress is not None:
            progress.update(len(rows))
        yield block
    log.debug("%d continuations (%d distinct input rows) of a %d-token prefix in %.2f s", len(tokens) - start,
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


class GrowingPrefix:
    """A prefix whose KV cache grows by one token per ``append`` and is never recomputed.

    Between appends, ``states`` computes the states of the prefix followed by each of b candidate
    tokens in one batched single-token step against the cache (as ``continuation_states`` does),
    and ``embeds_state`` the state of the prefix followed by a continuous input embedding, with
    autograd (the prefix's keys/values are constants). Layer k is HF ``hidden_states[k]``, read as
    ``lm.final_norm`` says; states are at position P = ``len(self.ids)`` (0-based). An empty prefix
    (P = 0) is allowed: its steps are plain forwards of the candidate alone. This is the engine of
    ``collide.invert``, where P grows from 0 to the prompt length.
    """

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.ids: list[int] = []  # the token ids appended so far
        self.cache = None  # the shared KV cache of ``ids`` (None while empty)
        self.last_hidden = None  # (d,) the decoder's output (after the final norm) at the last appended token

    @torch.no_grad()
    def append(self, token: int) -> None:
        """Extend the prefix by ``token``: one single-token forward through every block, its keys/values kept."""
        if self.cache is not None:
            for layer in self.cache.layers:
                layer.__dict__.pop("update", None)  # the cache layer's own (growing) update again
        ids = torch.tensor([[int(token)]], dtype=torch.long, device=self.lm.device)
        mask = torch.ones(1, len(self.ids) + 1, dtype=torch.long, device=self.lm.device)
        out = self.lm.decoder(input_ids=ids, attention_mask=mask, past_key_values=self.cache, use_cache=True)
        self.cache = shared_prefix(out.past_key_values, split=uses_prefix_attention(self.lm))
        self.last_hidden = out.last_hidden_state[0, -1]  # the LM head of it is the model's next-token prior
        self.ids.append(int(token))

    def states(self, tokens: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        """{layer: (b, d)} states of prefix+t for each t in ``tokens`` ((b,) int64 on ``lm.device``), compute dtype."""
        if not self.ids:
            ids = tokens[:, None]
            return last_token_states(self.lm, ids, torch.ones_like(ids), layers)
        return step_states(self.lm, self.cache, len(self.ids), tokens, layers)

    def embeds_state(self, embeds: torch.Tensor, layer: int) -> torch.Tensor:
        """(d,) state at ``layer`` of the prefix followed by one token whose embedding-layer input is ``embeds``.

        ``embeds`` (d,) is what the input-embedding module outputs for a token (Gemma's sqrt(d) scaling
        included, position embeddings excluded); gradients flow back to it. Runs with grad enabled.
        """
        lm = self.lm
        mask = torch.ones(1, len(self.ids) + 1, dtype=torch.long, device=lm.device)
        config = lm.model.config
        saved = config._attn_implementation
        if self.ids and uses_prefix_attention(lm):
            config._attn_implementation = PREFIX_ATTENTION
        try:
            with torch.enable_grad():
                return capture_layers(lm, [layer], lambda hidden: hidden[0, -1], lambda: lm.decoder(
                    inputs_embeds=embeds.to(lm.model.dtype)[None, None], attention_mask=mask,
                    past_key_values=self.cache, use_cache=self.cache is not None))[layer]
        finally:
            config._attn_implementation = saved
