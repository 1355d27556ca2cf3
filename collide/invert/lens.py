"""The ranking aids of ``collide invert``, fit once per (model, layer, norm convention) and cached on disk.

A lens bundle holds, for layer k of one model (k as ``collide.layers.CONVENTION`` says):

* ``own``: a ridge regression from the state at position t to the input-embedding row of the
  token at t, fit on the model's own states of a corpus (``lens.corpus``, every position of its
  first ``lens.n_prompts`` windows);
* ``cont``: the same regression fit on continuation states: every distinct input row (or a seeded
  sample of ``lens.continuations``) appended once to one of ``lens.n_prefixes`` corpus prefixes,
  plus the table below, so rare tokens are covered as well as frequent ones;
* ``table``: the exact state at layer k of every distinct input row at the first searched
  position (after the empty prefix, or after the tokenizer's BOS when it prepends one). Position 0
  of every prompt then costs one lookup and one verification (``lens.table=false``: no table).

Regressions are fit in fp64 on standardised states (zero mean, unit variance per coordinate) with
ridge strength ``alpha`` (the standardised Gram matrix has mean eigenvalue 1 per pair). The lens
never sees the states being inverted: it is fit on text collide reads itself.

Bundles live in a content-keyed directory ``<lens.root>/<model>-L<layer>-<norm>-<hash>/`` (or
``lens.path``): ``lens.safetensors`` then ``lens.json``, each written atomically, the JSON last,
so a killed fit leaves no bundle that looks whole. The hash covers the model's identity (config
name, source, revision, compute dtype, the quantized forward when ``model.quant`` quantizes
something, and a fingerprint of its weights), the layer, the norm convention, the table's prefix
and the fit settings; anything else refits. ``lens.root`` defaults to ``$COLLIDE_CACHE/lenses``.

**Checked before use.** ``lens.json`` records the sha256 and size of ``lens.safetensors``; a
bundle is read only when the file has that size and digest (``collide.digests``: hashed once per
version of the file) and every weight is finite. A damaged bundle is refused in one line that
names the fix (``lens.refit=true`` fits it again and replaces it); a fit whose weights are not
finite is never written. The location is checked before a fit starts. The tensors are memory-mapped
(safetensors ``load_file``): nothing is copied; the NaN/Inf check reads each tensor once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from collide import digests, quant as quantization
from collide.atomic import atomic_write, atomic_write_json, os_error_message
from collide.invert.config import LensConfig
from collide.errors import CollideError
from collide.models import LoadedModel, all_token_states

log = logging.getLogger(__name__)

FORMAT = "1"  # bumped when the bundle's content or fit changes meaning
TENSORS, META = "lens.safetensors", "lens.json"


def weights_fingerprint(lm: LoadedModel) -> str:
    """sha256 (16 hex digits) of every parameter's name, shape, sum and sum of squares (fp64): other weights, other key."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in lm.model.named_parameters():
            p = param.detach().double()
            digest.update(f"{name}:{tuple(p.shape)}:{float(p.sum())!r}:{float((p * p).sum())!r};".encode())
    return digest.hexdigest()[:16]


def lens_identity(lm: LoadedModel, layer: int, cfg: LensConfig, prefix: list[int]) -> dict:
    """What a bundle must match to be reused: model identity, layer, norm convention, table prefix, fit settings.

    The quantized forward (``model.quant``) is part of the model's identity only when it quantizes something,
    as in the store identity: unquantized bundles keep the location they had before quantization existed.
    """
    model = {"name": lm.name, "source": lm.source, "revision": lm.revision, "dtype": lm.dtype,
             "weights": weights_fingerprint(lm)}
    quant = {k: v for k, v in (lm.quant or {}).items() if k in quantization.DEFAULTS}
    if not quantization.is_default(quant):
        model["quant"] = quantization.as_dict(quant)
    return {"format": FORMAT, "model": model,
            "layer": int(layer), "final_norm": lm.final_norm, "prefix": [int(t) for t in prefix],
            "fit": {"corpus": cfg.corpus, "n_prompts": cfg.n_prompts, "n_prefixes": cfg.n_prefixes,
                    "continuations": cfg.continuations, "table": cfg.table, "alpha": cfg.alpha, "seed": cfg.seed}}


def lens_location(identity: dict, cfg: LensConfig) -> Path:
    """``lens.path`` when set, else ``<lens.root>/<model>-L<layer>-<norm>-<hash of identity>``."""
    if cfg.path:
        return Path(cfg.path).expanduser()
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.root).expanduser() / f"{identity['model']['name']}-L{identity['layer']}-{identity['final_norm']}-{key}"


@dataclass
class Ridge:
    """y ≈ ((x − mean_x) / scale_x) @ weight + mean_y, from a state x (d,) to an input-embedding row y (d,)."""

    mean_x: torch.Tensor  # (d,) fp32
    scale_x: torch.Tensor  # (d,) fp32, standard deviation per coordinate (1 where it is 0)
    weight: torch.Tensor  # (d, d_row) fp32
    mean_y: torch.Tensor  # (d_row,) fp32

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean_x) / self.scale_x) @ self.weight + self.mean_y


class _Moments:
    """Running fp64 sums for a ridge fit: n, Σx, Σy, Σxxᵀ, Σxyᵀ."""

    def __init__(self, d: int, d_row: int):
        f64 = torch.float64
        self.n, self.sx, self.sy = 0, torch.zeros(d, dtype=f64), torch.zeros(d_row, dtype=f64)
        self.xx, self.xy = torch.zeros(d, d, dtype=f64), torch.zeros(d, d_row, dtype=f64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double().cpu(), y.double().cpu()
        self.n += len(x)
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xx += x.T @ x
        self.xy += x.T @ y

    def solve(self, alpha: float) -> Ridge:
        if self.n < 2:
            raise CollideError("the lens has fewer than 2 training states; raise lens.n_prompts")
        mx, my = self.sx / self.n, self.sy / self.n
        cov = self.xx / self.n - torch.outer(mx, mx)
        cxy = self.xy / self.n - torch.outer(mx, my)
        std = cov.diagonal().clamp(min=0).sqrt()
        std = torch.where(std > 0, std, torch.ones_like(std))
        corr = cov / torch.outer(std, std)
        weight = torch.linalg.solve(corr + alpha * torch.eye(len(std), dtype=corr.dtype), cxy / std[:, None])
        return Ridge(mx.float(), std.float(), weight.float(), my.float())


@dataclass
class Lens:
    """A bundle (see the module docstring), loaded in memory."""

    identity: dict
    info: dict  # what it was fit on (recorded in inversion.json)
    own: Ridge
    cont: Ridge
    table_tokens: Optional[torch.Tensor]  # (g,) int64: the first token of each group of identical input rows
    table: Optional[torch.Tensor]  # (g, d) fp32: the state at the layer of prefix + that token (None: lens.table=false)
    path: Optional[Path] = None

    @property
    def prefix(self) -> list[int]:
        """The tokens before the position the table covers ([] or [BOS])."""
        return list(self.identity["prefix"])


def _rows(lm: LoadedModel) -> torch.Tensor:
    return lm.model.get_input_embeddings().weight.detach().float().cpu()


def _corpus_prompts(lm: LoadedModel, cfg: LensConfig, n: int) -> list[list[int]]:
    from collide.corpus import iter_prompts, load_corpus_config

    out = [list(p.token_ids) for _, p in zip(range(n), iter_prompts(load_corpus_config(cfg.corpus), lm.tokenizer))]
    if not out:
        raise CollideError(f"corpus {cfg.corpus!r} gave no prompts for the lens; pick another with lens.corpus=...")
    return out


def fit(lm: LoadedModel, layer: int, cfg: LensConfig, prefix: list[int], identity: Optional[dict] = None) -> Lens:
    """Fit a bundle for ``layer`` of ``lm`` (no disk access): table, continuation lens, own-states lens."""
    from collide.console import progress
    from collide.continuations import GrowingPrefix, continuation_states, input_groups

    t0 = time.perf_counter()
    identity = identity or lens_identity(lm, layer, cfg, prefix)
    rows = _rows(lm)
    first, _ = input_groups(lm, np.arange(len(rows)))
    distinct = torch.as_tensor(first, dtype=torch.long)
    prompts = _corpus_prompts(lm, cfg, cfg.n_prompts + cfg.n_prefixes)
    own_prompts, prefix_prompts = prompts[:cfg.n_prompts], prompts[cfg.n_prompts:] or prompts[:cfg.n_prefixes]
    rng = np.random.default_rng(cfg.seed)
    n_cont = len(first) if cfg.continuations is None else min(cfg.continuations, len(first))
    dealt = np.array_split(rng.permutation(first)[:n_cont], max(1, len(prefix_prompts)))
    total = (len(first) if cfg.table else 0) + n_cont + sum(len(p) for p in own_prompts)
    own, cont = _Moments(lm.d, rows.shape[1]), _Moments(lm.d, rows.shape[1])
    with progress(total=total, unit="state", desc=f"lens L{layer}", disable=not cfg.progress) as bar:
        grow = GrowingPrefix(lm)
        for token in prefix:
            grow.append(token)
        table = torch.empty(len(first) if cfg.table else 0, lm.d, dtype=torch.float32)
        for lo in range(0, len(table), cfg.batch):
            tokens = distinct[lo:lo + cfg.batch]
            table[lo:lo + len(tokens)] = grow.states(tokens.to(lm.device), [layer])[layer].float().cpu()
            cont.add(table[lo:lo + len(tokens)], rows[tokens])
            bar.update(len(tokens))
        for ids, tokens in zip(prefix_prompts, dealt):
            cut = ids[:int(rng.integers(1, len(ids) + 1))]
            for block in continuation_states(lm, cut, tokens, [layer], batch_size=cfg.batch):
                cont.add(block.states[layer], rows[torch.as_tensor(block.tokens)])
                bar.update(len(block.tokens))
        for lo in range(0, len(own_prompts), 32):
            chunk = own_prompts[lo:lo + 32]
            width = max(len(p) for p in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(chunk):
                ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
            states = all_token_states(lm, ids.to(lm.device), mask.to(lm.device), [layer])[layer].float().cpu()
            keep = mask.bool()
            own.add(states[keep], rows[ids[keep]])
            bar.update(int(keep.sum()))
    info = {"corpus": cfg.corpus, "n_prompts": len(own_prompts), "n_own_states": own.n,
            "n_prefixes": len(prefix_prompts), "n_continuation_states": cont.n, "table_prefix": list(prefix),
            "n_table_rows": len(table), "alpha": cfg.alpha, "seed": cfg.seed}
    log.info("lens for layer %d fit in %.1f s (%d own states, %d continuation states)", layer,
             time.perf_counter() - t0, own.n, cont.n)
    return Lens(identity, info, own.solve(cfg.alpha), cont.solve(cfg.alpha), distinct if cfg.table else None,
                table if cfg.table else None)


def _tensors(lens: Lens) -> dict[str, torch.Tensor]:
    tensors = {} if lens.table is None else {"table": lens.table.contiguous(),
                                             "table_tokens": lens.table_tokens.contiguous()}
    for name, ridge in (("own", lens.own), ("cont", lens.cont)):
        for key in ("mean_x", "scale_x", "weight", "mean_y"):
            tensors[f"{name}.{key}"] = getattr(ridge, key).contiguous()
    return tensors


def not_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an Inf: one vectorised pass, no copy (the min and
    max are finite exactly when every entry is: torch propagates NaN through both; 0.03 s for 671 MB)."""
    return [name for name, t in sorted(tensors.items()) if t.is_floating_point() and t.numel()
            and not all(math.isfinite(float(v)) for v in torch.aminmax(t))]


def save(lens: Lens, path: Path) -> None:
    """Write ``lens.safetensors`` then ``lens.json`` into ``path``, each atomically; weights that are not finite
    are refused before anything is written."""
    from safetensors.torch import save_file

    tensors = _tensors(lens)
    bad = not_finite(tensors)
    if bad:
        raise CollideError(f"the lens fit for layer {lens.identity['layer']} has weights that are not finite "
                           f"({', '.join(bad)}); nothing was written to {path}. The model's states at that layer hold "
                           "NaN/Inf: check model.dtype (fp32 avoids overflow), or raise lens.alpha")
    path.mkdir(parents=True, exist_ok=True)
    written = atomic_write(path / TENSORS, lambda tmp: save_file(tensors, str(tmp)))
    digests.remember(path / TENSORS, written["sha256"])  # hashed as written: the next load need not read it
    atomic_write_json(path / META, {"identity": lens.identity, "info": lens.info, TENSORS: written})
    lens.path = path


def _damaged(path: Path, why: str) -> CollideError:
    return CollideError(f"lens bundle {path} is damaged ({why}); fit it again with lens.refit=true "
                        f"(or delete {path})")


def load(path: Path, identity: dict) -> Optional[Lens]:
    """The bundle at ``path`` if it matches ``identity``; None if there is none, or one of another identity.
    A bundle that does not match its recorded sha256 and size, cannot be read or holds NaN/Inf weights
    raises a one-line CollideError that names ``lens.refit=true``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path = path / META
    if not meta_path.is_file():
        return None  # no bundle (a killed fit leaves at most lens.safetensors, never lens.json)
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise _damaged(path, f"{META} is not valid JSON: {exc}") from None
    if meta.get("identity") != identity:
        return None
    wrong = digests.check(path, {TENSORS: meta.get(TENSORS) or {}})
    if wrong is not None:
        raise _damaged(path, wrong)
    try:
        t = load_file(str(path / TENSORS))  # memory-mapped by safetensors: pages are read as they are used
        ridge = {name: Ridge(*(t[f"{name}.{k}"] for k in ("mean_x", "scale_x", "weight", "mean_y")))
                 for name in ("own", "cont")}
    except (KeyError, SafetensorError) as exc:
        raise _damaged(path, f"{TENSORS} is not a lens bundle: {type(exc).__name__} {exc}") from None
    bad = not_finite(t)
    if bad:
        raise _damaged(path, f"{', '.join(bad)} hold NaN or Inf")
    return Lens(identity, meta["info"], ridge["own"], ridge["cont"], t.get("table_tokens"), t.get("table"), path)


def check_location(path: Path, cfg: LensConfig) -> None:
    """``path`` is, or is made, a writable directory: one CollideError naming the setting otherwise, before a fit."""
    key, value = ("lens.path", cfg.path) if cfg.path else ("lens.root", cfg.root)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise CollideError(f"{key}={value} cannot hold lens bundles: {blocker} is a file, not a directory; set "
                           f"{key} to a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CollideError(os_error_message(path, exc, "creating", key, "")) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CollideError(f"cannot write lens bundles into {path}; make it writable or set {key} to a writable "
                           "directory")


def load_or_fit(lm: LoadedModel, layer: int, cfg: LensConfig, prefix: list[int]) -> Lens:
    """The cached bundle for (``lm``, ``layer``, its norm convention, ``prefix``, ``cfg``), fit and cached if absent
    (or if ``cfg.refit``)."""
    identity = lens_identity(lm, layer, cfg, prefix)
    path = lens_location(identity, cfg)
    t0 = time.perf_counter()
    found = None if cfg.refit else load(path, identity)
    if found is not None:
        log.info("lens for layer %d read from %s (%.2f s)", layer, path, time.perf_counter() - t0)
        return found
    if cfg.path and (path / META).is_file() and not cfg.refit:
        raise CollideError(f"lens.path={cfg.path} holds a lens of another model, layer, norm or fit settings; "
                           "pass another lens.path, or replace that bundle with lens.refit=true")
    check_location(path, cfg)
    log.info("fitting the lens for layer %d of %s (once; cached in %s)", layer, lm.name, path)
    lens = fit(lm, layer, cfg, prefix, identity)
    save(lens, path)
    return lens
