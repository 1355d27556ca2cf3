"""Typed schemas of the inversion commands: ``collide invert`` (``InvertConfig``), ``collide lens``
(``LensCommandConfig``, with the lens and position-0 table settings ``LensConfig``) and ``collide audit``
(``AuditConfig``: which layers of an activation cache give back its text). Validated as
``collide.config``'s schemas are, when the command line is composed."""

from __future__ import annotations

from dataclasses import dataclass, field as default
from typing import Any, Optional

from omegaconf import MISSING

from collide.config import Choice, ClusterConfig, ModelConfig, cache_path


class InvertPolicy(Choice):
    """How ``collide invert`` orders candidate tokens: ranked (auto, prior, lens), the paper's gradient policy,
    its brute force (random), or all (exhaustive). The order never changes what is accepted."""
    auto = "auto"
    prior = "prior"
    lens = "lens"
    gradient = "gradient"
    random = "random"
    exhaustive = "exhaustive"


class OnMiss(Choice):
    """What ``collide invert`` does at a position with no candidate within epsilon: stop the prompt or go on."""
    stop = "stop"
    best = "best"


@dataclass
class LensConfig:
    """The ranking aids of ``collide invert`` (``collide.invert.lens``), fit per (model, layer, norm convention)."""

    corpus: str = "stdlib-docs"  # corpus config (collide/conf/corpus/) whose windows' states the lens is fit on
    n_prompts: int = 256  # windows of that corpus read (every position of each is one training pair)
    n_prefixes: int = 32  # continuation prefixes: every distinct token is appended once to one of them
    # distinct tokens dealt to those prefixes (a seeded sample); None = every one (about V single-token steps)
    continuations: Optional[int] = None
    # the exact state of every token at the first searched position (V steps, once): position 0 costs one
    # verification; false = rank it with the lenses like any other position
    table: bool = True
    alpha: float = 1e-2  # ridge strength on standardised states (their correlation matrix has mean eigenvalue 1)
    seed: int = 0  # seed of the prefixes' lengths and of the tokens dealt to each prefix
    batch: int = 1024  # continuations per single-token step while fitting
    # where fitted lenses live: <root>/<model>-L<layer>-<norm>-<hash>/, one per identity, like stores;
    # default $COLLIDE_CACHE/lenses (runs/lenses without the variable)
    root: str = default(default_factory=lambda: cache_path("lenses"))
    path: Optional[str] = None  # an explicit lens directory instead (relative = to the working dir)
    progress: bool = True  # progress bar while fitting
    # fit the bundle again even when one is cached, and replace it (a damaged bundle is refused until then)
    refit: bool = False


@dataclass
class LensCommandConfig:
    """``collide lens fit model=NAME layers=...``: fit and cache the lenses ``collide invert`` ranks with."""

    action: str = MISSING  # what to do: fit (positional)
    model: ModelConfig = MISSING  # the model whose states will be inverted (model=<name>)
    layers: Any = MISSING  # layers to fit: an int, a list [7, 15] or a range "a:b" (inclusive)
    # the first position holds the tokenizer's BOS (the table is then of [BOS] + token); None = if it adds one
    bos: Optional[bool] = None
    lens: LensConfig = default(default_factory=LensConfig)


@dataclass
class InvertConfig:
    """``collide invert SOURCE``: recover prompts exactly from their hidden states at every position of one layer."""

    # a run or store made with store.positions=all, or a .npy / .safetensors / .parquet file of states (positional)
    source: str = MISSING
    # the model the states came from (model=<name>, then model.final_norm=pre ...); None = the store's own
    model: Optional[ModelConfig] = None
    # HF hidden_states index of the states (0 = embeddings, L = last); None or auto = the store's deepest layer,
    # or, for a file, the layer its first rows match (collide.invert.locate)
    layer: Any = None
    # auto (prior + lens + table, merged) | prior | lens | gradient (the paper's SIPIT) | random (brute force) | exhaustive
    policy: InvertPolicy = InvertPolicy.auto
    batch: int = 64  # gradient, random, exhaustive: candidate tokens verified per batched single-token step
    batch_first: int = 16  # auto, prior, lens: the first batch; each next batch is 4x larger, up to batch_max
    batch_max: Optional[int] = None  # auto, prior, lens: the largest batch; None = 1024 on a CPU, 8192 on a GPU
    lr: float = 1.0  # gradient policy: SGD learning rate of the continuous proxy (the paper's 1.0)
    grad_steps: int = 1  # gradient policy: SGD steps on the proxy before each batch of candidates
    snap_every: int = 50  # gradient policy: SGD steps between snaps of the proxy onto a token's row (the paper's K)
    seed: int = 0  # seed of the proxy's starting token (gradient) and of the permutation (random)
    # acceptance radius, L2 (not squared): auto = the rule of collide.invert.sipit, its noise radius widened to
    # the gap measured on SOURCE's known first rows (recorded); rule = the rule alone; a number = that fixed ε
    epsilon: Any = "auto"
    on_miss: OnMiss = OnMiss.stop  # no candidate within epsilon: stop that prompt, or go on with the best candidate
    # candidates verified after the first within epsilon when it lies outside the noise radius (a quantized or
    # wide epsilon), looking for other tokens within epsilon; None = the whole vocabulary
    confirm: Optional[int] = 1024
    # branches a prompt may explore to decide tokens within epsilon of the same state: each backtrack after a
    # miss and each search of a later position after an alternative counts one (each may verify every token)
    backtrack: int = 4
    # an alternative within epsilon after which the recovered rest of the prompt stops fitting (at position m) is
    # excluded only by verifying every token at m, a vocabulary sweep counted in backtrack: true = do so (the
    # position can then be unique); false = the alternative stays open, noted with m (the position is tied)
    prove_ties: bool = False
    # the first position holds the tokenizer's BOS, verified instead of searched; None = if the tokenizer adds one
    bos: Optional[bool] = None
    n_prompts: Optional[int] = None  # invert the first N prompts of SOURCE only; None = all
    out: Optional[str] = None  # output directory; None = beside SOURCE (<SOURCE>-inversion-L<layer>-<policy>)
    progress: bool = True  # log each position as it is recovered
    lens: LensConfig = default(default_factory=LensConfig)  # auto, lens, exhaustive: the lens and position-0 table
    # cluster=ray: the prompts spread over Ray workers (collide.cluster.invert_source_ray, the same records);
    # local (the default) = this process
    cluster: ClusterConfig = default(default_factory=ClusterConfig)


@dataclass
class AuditConfig:
    """``collide audit SOURCE``: which stored layers give back the text, how much of it, and how fast."""

    # a store made with store.positions=all, a run directory using one, or a .npy / .safetensors / .parquet file
    source: str = MISSING
    model: Optional[ModelConfig] = None  # the model the states came from (model=<name>); None = the store's own
    # store layers to invert: auto = about five spread over the stored ones; all, an int, a list or a range "a:b"
    layers: Any = "auto"
    n_prompts: int = 10  # prompts sampled from SOURCE (seeded) and inverted at each layer
    seed: int = 0  # seed of that sample
    budget_s: Optional[float] = None  # wall seconds for the whole audit; unfinished layers are reported; None = no limit
    examples: int = 3  # true and recovered texts shown side by side per layer (where SOURCE keeps them)
    out: Optional[str] = None  # output directory; None = <SOURCE>-audit beside SOURCE
    figures: bool = True  # write figures/audit.png
    policy: InvertPolicy = InvertPolicy.auto  # each layer is inverted as collide invert does: its keys, below
    epsilon: Any = "auto"  # auto | rule | a fixed L2 radius
    confirm: Optional[int] = 1024  # candidates verified after a hit outside the noise radius; None = every token
    backtrack: int = 4  # branches per prompt to decide tokens within epsilon of the same state
    prove_ties: bool = False  # exclude an alternative by a vocabulary sweep at the position it stops fitting
    bos: Optional[bool] = None  # the first position holds the tokenizer's BOS; None = if the tokenizer adds one
    progress: bool = False  # log each position as it is recovered
    lens: LensConfig = default(default_factory=LensConfig)  # the lens and position-0 table of each layer
