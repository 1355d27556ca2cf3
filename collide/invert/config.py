"""The schema of ``collide audit`` (``collide.invert.audit``): which layers of an activation cache give back its text."""

from __future__ import annotations

from dataclasses import dataclass, field as default
from typing import Any, Optional

from omegaconf import MISSING

from collide.config import InvertPolicy, LensConfig, ModelConfig


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
    bos: Optional[bool] = None  # the first position holds the tokenizer's BOS; None = if the tokenizer adds one
    progress: bool = False  # log each position as it is recovered
    lens: LensConfig = default(default_factory=LensConfig)  # the lens and position-0 table of each layer
