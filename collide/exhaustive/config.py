"""Typed config of the exhaustive continuation test (``collide exhaustive``; YAML: collide/conf/exhaustive.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field as default
from typing import Any, List, Optional

from omegaconf import MISSING

from collide.config import Choice, DType, SearchConfig


class ExhaustiveMode(Choice):
    """The continuation test: every token after the closest prompts, or the paper appendix's margin."""
    exhaustive = "exhaustive"
    margin = "margin"


@dataclass
class ModelOverrides:
    """Overrides of the model config a store recorded, for commands that reload its model (None = as recorded)."""

    source: Optional[str] = None  # another copy of the same weights, e.g. a local directory
    device: Optional[str] = None  # auto | cpu | cuda | cuda:N
    device_map: Optional[str] = None  # accelerate device map for a model larger than one device
    dtype: Optional[DType] = None  # compute dtype of the reloaded model


@dataclass
class ExhaustiveConfig:
    """``collide exhaustive RUN_DIR``: the paper's exhaustive continuation test on a finished run."""

    run_dir: str = MISSING  # the run directory whose store and report are read (positional)
    mode: ExhaustiveMode = ExhaustiveMode.exhaustive  # exhaustive (every token after the closest prompts) | margin
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
    model: ModelOverrides = default(default_factory=ModelOverrides)  # e.g. model.device=cuda
    search: SearchConfig = default(default_factory=SearchConfig)  # the certified search (collide.search)
    max_listed: int = 100  # collisions listed per layer in the JSON (the count is always exact)
    progress: bool = True  # progress bars for extraction and search
