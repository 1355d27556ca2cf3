"""The model as a Ray driver needs it: tokenizer and config, no weights (``model_shell``).

On a cluster the driver never runs the model: it tokenizes the corpus, decodes tokens and writes
manifests, which need the tokenizer and the model's shape. ``model_shell(cfg)`` returns a
``collide.models.LoadedModel`` (the same checks of ``cfg`` as ``load_model``, and the same quant and
noise record, without the weights' fake quantization) whose module is built from the config on PyTorch's meta device
(every parameter a shape without storage, so ``n_layers``, ``d``, the input-embedding rows and
the manifest facts read as from the real model, and a forward pass fails at once) with the
tokenizer ``load_model`` would give: the same ids (a converted GGUF model's tokenizer is read from
the converted-model cache when it is there, else from the GGUF file's metadata, which the cache's
own tokenizer equals by construction). For SmolLM2-135M this keeps about 540 MB of fp32 weights out
of the driver.
"""

from __future__ import annotations

import logging
import os

import torch

from collide import model_cache, quant as quantization
from collide.config import ModelConfig
from collide.models import (DTYPES, LoadedModel, _from_pretrained, _pypi_checkpoint, byte_tokenizer,
                            checked_settings, find_blocks, find_final_norm, tiny_config)

log = logging.getLogger(__name__)


def _config_and_tokenizer(cfg: ModelConfig):
    """(HF config, tokenizer) of ``cfg`` without reading any weight."""
    from transformers import AutoConfig, AutoTokenizer

    if cfg.source.startswith("random:"):
        return tiny_config(cfg.source.removeprefix("random:")), byte_tokenizer()
    source = str(_pypi_checkpoint(cfg.source.removeprefix("pypi:"), cfg.gguf_file)) \
        if cfg.source.startswith("pypi:") else os.path.expanduser(cfg.source)
    if cfg.gguf_file and os.path.isfile(os.path.join(source, cfg.gguf_file)):
        directory = model_cache.find(cfg.name, model_cache.cache_key(os.path.join(source, cfg.gguf_file), cfg.dtype))
        if directory is not None:
            return AutoConfig.from_pretrained(str(directory)), AutoTokenizer.from_pretrained(str(directory))
    return _from_pretrained(AutoConfig, source, cfg), _from_pretrained(AutoTokenizer, source, cfg)


def model_shell(cfg: ModelConfig) -> LoadedModel:
    """``cfg``'s tokenizer and shape as a LoadedModel on the meta device (module docstring); ``device`` is where
    ``load_model`` would compute on this machine (what a manifest records)."""
    from transformers import AutoModelForCausalLM

    device, quant = checked_settings(cfg)
    config, tokenizer = _config_and_tokenizer(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.dtype])
    model.eval().requires_grad_(False)
    decoder, blocks = find_blocks(model)
    log.info("model %s: tokenizer and config only on the driver (%d layers, d=%d); the Ray workers load the weights",
             cfg.name, len(blocks), int(config.get_text_config().hidden_size))
    return LoadedModel(model=model, tokenizer=tokenizer, name=cfg.name, source=cfg.source, revision=cfg.revision,
                       dtype=cfg.dtype, device=device, final_norm=str(cfg.final_norm), decoder=decoder, blocks=blocks,
                       final_norm_module=find_final_norm(decoder),
                       quant={**quant, "description": quantization.describe(quant)},
                       noise=quantization.noise_record(cfg, len(blocks)) or None)
