"""Quantized forwards: fake (simulated) integer quantization of a model's linear layers, or bitsandbytes loading.

What is quantized, where, and with which rule (``model.quant``, ``collide.config.QuantConfig``):

* **Which layers.** Every linear layer inside the decoder blocks (``torch.nn.Linear``, and the
  ``Conv1D`` of GPT-2): attention q, k, v and output projections, MLP gate, up and down
  projections. The input embeddings, the norms, the attention softmax, the residual additions and
  ``lm_head`` are left in the compute dtype. The whole model is quantized once in
  ``collide.models.load_model``, so extraction, continuations and inversion see the same forward.
* **Activations** (``activations=int8|int4``): the input x of each of those layers is replaced by
  ``q(x) = s * clamp(round(x / s), -Q, Q)`` with Q = 2^(bits-1) - 1 (127 for int8, 7 for int4),
  round half to even, symmetric (no zero point), and a dynamic scale ``s = max|x| / Q`` over one
  token's input vector (``activation_granularity=token``: the usual per-token W·A8 / W·A4
  simulation) or over each group of ``activation_group`` consecutive channels of a token
  (``group``). A group whose max is 0 stays 0. The scale is computed per token and never across
  tokens or prompts, so a prompt's states do not depend on the batch it is in or on padding.
  Per-channel scales over tokens are not offered: they couple the prompts of a batch.
* **Weights** (``weights=int8|int4``): round-to-nearest, symmetric, one scale ``max|w| / Q`` per
  output row and group of ``weight_group`` consecutive input channels (the last group of a row
  may be shorter), applied once at load; the stored weight is the dequantized value.
* **Arithmetic.** Scales, division and rounding are done in fp32 (the reference; bf16/fp16
  models cast the result back to their dtype). Under autograd (the inversion's gradient proxy)
  the rounding passes the gradient straight through; without autograd the output is exactly q(x).
* **bitsandbytes** (``backend=bitsandbytes``, CUDA only): weights int8 load with LLM.int8()
  (``load_in_8bit``; its matmul quantizes activations itself, per row, with fp16 outliers), int4
  with NF4 (``load_in_4bit``, ``bnb_4bit_quant_type=nf4``, compute dtype = model.dtype).
  ``activations`` must stay none there.

The control (``model.noise=gaussian``, ``model.noise_scale``): ``add_noise`` adds to each stored
last-token state h at layer k an isotropic Gaussian vector of RMS norm ``noise_scale[k]`` (per
coordinate sigma = noise_scale[k] / sqrt(d)), drawn from a generator seeded by the layer and the
prompt's token ids, so a prompt's noisy state is a function of the prompt and resumes are bitwise
identical. Matched to the measured ``‖q(h) − h‖`` of a quantized forward (benchmarks/quant_noise_scale.py),
it tells what noise of that size alone does to the geometry (docs/quantization.md).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING

import numpy as np

from collide.errors import CollideError

if TYPE_CHECKING:  # torch is imported where it is used, so that reading settings needs no torch
    import torch
    from torch import nn

BITS = {"int8": 8, "int4": 4}
DEFAULTS = {"activations": "none", "weights": "none", "activation_granularity": "token", "activation_group": 128,
            "weight_group": 128, "backend": "fake"}


def qmax(bits: int) -> int:
    """Q = 2^(bits-1) - 1, the largest magnitude on the symmetric signed grid (127, 7)."""
    return 2 ** (bits - 1) - 1


def as_dict(quant) -> dict:
    """The quant settings as a plain dict of strings and ints (a QuantConfig, a DictConfig, a dict or None)."""
    if quant is None:
        return dict(DEFAULTS)
    if is_dataclass(quant):
        quant = asdict(quant)
    elif not isinstance(quant, dict):
        from omegaconf import OmegaConf

        quant = OmegaConf.to_container(quant, resolve=True)
    out = dict(DEFAULTS)
    out.update({k: (v.value if hasattr(v, "value") else v) for k, v in quant.items()})
    return out


def is_default(quant) -> bool:
    """True when ``quant`` is the unquantized model (every key at its default)."""
    return as_dict(quant) == DEFAULTS


def validate(quant, device=None) -> dict:
    """The checked settings as a dict; one CollideError line naming the bad key and the fix."""
    q = as_dict(quant)
    for key in ("activations", "weights"):
        if q[key] not in ("none", *BITS):
            raise CollideError(f"model.quant.{key}={q[key]!r} is not supported; use none, int8 or int4")
    if q["activation_granularity"] not in ("token", "group"):
        raise CollideError(f"model.quant.activation_granularity={q['activation_granularity']!r} is not supported; "
                           "use token or group")
    for key in ("activation_group", "weight_group"):
        if int(q[key]) < 1:
            raise CollideError(f"model.quant.{key}={q[key]} must be >= 1 input channels, e.g. model.quant.{key}=128")
    if q["backend"] not in ("fake", "bitsandbytes"):
        raise CollideError(f"model.quant.backend={q['backend']!r} is not supported; use fake or bitsandbytes")
    if q["backend"] == "bitsandbytes":
        if q["activations"] != "none":
            raise CollideError("model.quant.backend=bitsandbytes quantizes weights only (its int8 matmul quantizes "
                               "activations itself); set model.quant.activations=none or model.quant.backend=fake")
        if q["weights"] == "none":
            raise CollideError("model.quant.backend=bitsandbytes needs model.quant.weights=int8 or int4")
        if device is not None and str(device).split(":")[0] != "cuda":
            raise CollideError(f"model.quant.backend=bitsandbytes needs a CUDA device (model.device={device}); "
                               "use model.quant.backend=fake, the fp32 simulation, on a CPU")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise CollideError("model.quant.backend=bitsandbytes needs the bitsandbytes package; "
                               "`pip install bitsandbytes`, or use model.quant.backend=fake") from None
    return q


def describe(quant) -> str:
    """One line saying what the forward quantizes, e.g. 'activations int4 (per token, symmetric, ...)'."""
    q = as_dict(quant)
    if q["activations"] == "none" and q["weights"] == "none":
        return "none (the model's own forward)"
    if q["backend"] == "bitsandbytes":
        kind = "LLM.int8()" if q["weights"] == "int8" else "NF4"
        return f"weights {q['weights']} via bitsandbytes ({kind}) of every linear layer"
    parts = []
    if q["activations"] != "none":
        where = "per token" if q["activation_granularity"] == "token" else \
            f"per token and group of {q['activation_group']} channels"
        parts.append(f"activations {q['activations']} (inputs of every linear layer of the blocks, {where}, "
                     f"symmetric, scale max|x|/{qmax(BITS[q['activations']])}, round half to even, fp32)")
    if q["weights"] != "none":
        parts.append(f"weights {q['weights']} (round-to-nearest, symmetric, groups of {q['weight_group']} input "
                     f"channels per output row, scale max|w|/{qmax(BITS[q['weights']])})")
    return "; ".join(parts)


def batch_dependent(quant) -> bool:
    """True when a forward's states depend on the batch a prompt is in beyond fp32 reassociation (extraction then
    runs one prompt per forward, unpadded: ``collide.extract.launch_shard``).

    Quantized activations do: the matmuls and the attention reduce in an order that depends on the batch's
    shape (rows, padded length), and a last-bit difference before a quantizer can cross a rounding boundary,
    a whole level that later quantizers carry on: measured on SmolLM2 in docs/quantization.md
    (benchmarks/quant_batch_invariance.py). LLM.int8() (bitsandbytes int8 weights) quantizes activations
    too, with outlier columns chosen over the whole batch.
    """
    q = as_dict(quant)
    return q["activations"] != "none" or (q["backend"] == "bitsandbytes" and q["weights"] == "int8")


# --------------------------------------------------------------------------- the quantizers


def fake_quant(x: "torch.Tensor", bits: int, group: int | None = None) -> "torch.Tensor":
    """Symmetric fake quantization of x along its last dimension, computed in fp32.

    One scale ``s = max|x| / Q`` per vector of the last dimension (``group=None``), or per group of
    ``group`` consecutive entries of it (the last group may be shorter); returns
    ``s * clamp(round(x / s), -Q, Q)`` (round half to even) in x's dtype, 0 where the group's max is 0.
    """
    import torch

    Q = qmax(bits)
    xf = x.float()
    n = xf.shape[-1]
    if group is None or group >= n:
        blocks, pad = xf.unsqueeze(-2), 0
    else:
        pad = (-n) % group
        blocks = torch.nn.functional.pad(xf, (0, pad)).reshape(*xf.shape[:-1], -1, group)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / Q
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(blocks / safe), -Q, Q) * safe
    return q.reshape(*xf.shape[:-1], -1)[..., :n].to(x.dtype)


def quantize_weight(w: "torch.Tensor", bits: int, group: int, input_dim: int = 1) -> "torch.Tensor":
    """Group-wise round-to-nearest of a weight matrix: groups of ``group`` entries along ``input_dim``
    (1 for nn.Linear's (out, in), 0 for GPT-2's Conv1D (in, out)); same shape and dtype."""
    if input_dim == 0:
        return fake_quant(w.t(), bits, group).t().contiguous()
    return fake_quant(w, bits, group)


class _ActivationQuant:
    """Forward pre-hook of a linear layer: replaces its input by fake_quant(input)."""

    def __init__(self, bits: int, group: int | None):
        self.bits, self.group = bits, group

    def __call__(self, _module, args):
        import torch

        x = args[0]
        q = fake_quant(x, self.bits, self.group)
        if torch.is_grad_enabled() and x.requires_grad:
            q = x + (q - x).detach()  # straight-through: the rounding passes the gradient unchanged
        return (q, *args[1:])


def quantized_linears(blocks: "nn.ModuleList") -> list:
    """(name, module, input_dim) of every linear layer inside the blocks: nn.Linear (input dim 1) and
    transformers' Conv1D (GPT-2, weight (in, out): input dim 0)."""
    from torch import nn

    out = []
    for i, block in enumerate(blocks):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                out.append((f"{i}.{name}", module, 1))
            elif type(module).__name__ == "Conv1D" and hasattr(module, "weight"):
                out.append((f"{i}.{name}", module, 0))
    return out


def apply_fake_quant(blocks: "nn.ModuleList", quant) -> dict:
    """Quantize the weights and hook the inputs of every linear layer of ``blocks`` (fake backend).

    Returns a record {"linear_layers": count, "activations", "weights", ...} of what was done. The
    hooks stay on the modules for the model's lifetime: every forward of it is quantized.
    """
    import torch

    q = validate(quant)
    layers = quantized_linears(blocks)
    if not layers and (q["activations"] != "none" or q["weights"] != "none"):
        raise CollideError("model.quant: the model has no linear layers in its blocks to quantize; "
                           "set model.quant.activations=none model.quant.weights=none")
    if q["weights"] != "none":
        bits = BITS[q["weights"]]
        for _name, module, input_dim in layers:
            with torch.no_grad():
                module.weight.copy_(quantize_weight(module.weight, bits, int(q["weight_group"]), input_dim))
    if q["activations"] != "none":
        group = int(q["activation_group"]) if q["activation_granularity"] == "group" else None
        hook = _ActivationQuant(BITS[q["activations"]], group)
        for _name, module, _dim in layers:
            module.register_forward_pre_hook(hook)
    return {**q, "linear_layers": len(layers), "description": describe(q)}


def bitsandbytes_kwargs(quant, dtype) -> dict:
    """from_pretrained keyword arguments that load the weights through bitsandbytes (backend=bitsandbytes)."""
    from transformers import BitsAndBytesConfig

    q = as_dict(quant)
    if q["weights"] == "int8":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=dtype)}


# --------------------------------------------------------------------------- the noise control


def noise_record(model_cfg, n_layers: int | None = None) -> dict:
    """{"noise": "gaussian", "noise_scale": floats} of ``model.noise``/``noise_scale``, checked; {} for none.

    ``noise_scale`` is one number (every layer) or a list of ``n_layers + 1`` numbers (entry k for layer k),
    each >= 0 and finite, not all 0. Without ``n_layers`` (before the model is loaded) the list's length is
    not checked and the scales are returned as given; with it, as a list of ``n_layers + 1``.
    """
    kind = str(getattr(model_cfg, "noise", "none"))
    if kind == "none":
        return {}
    if kind != "gaussian":
        raise CollideError(f"model.noise={kind!r} is not supported; use none or gaussian")
    scale = getattr(model_cfg, "noise_scale", 0.0)
    scales = [scale] if isinstance(scale, (int, float, str)) else list(scale)
    try:
        scales = [float(v) for v in scales]
    except (TypeError, ValueError):
        scales = [math.nan]
    if not scales or any(not math.isfinite(v) or v < 0 for v in scales) or not any(scales):
        raise CollideError(f"model.noise_scale={scale!r} must be finite numbers >= 0, not all 0 (the RMS L2 norm of "
                           "the noise added at each layer), e.g. model.noise_scale=1.5")
    if n_layers is not None:
        if len(scales) == 1:
            scales = scales * (n_layers + 1)
        elif len(scales) != n_layers + 1:
            raise CollideError(f"model.noise_scale has {len(scales)} entries; this model has layers 0..{n_layers}: "
                               f"give {n_layers + 1} (entry k for layer k) or one number for every layer")
    return {"noise": kind, "noise_scale": scales}


def noise_vector(tokens, layer: int, d: int) -> np.ndarray:
    """The standard normal (d,) float64 draw of one prompt (its token ids) at one layer: PCG64 seeded by the
    blake2b digest of the layer and the ids as int32, numpy's ziggurat normals (the same on every platform)."""
    key = np.concatenate([[layer], np.asarray(tokens, np.int64)]).astype(np.int32).tobytes()
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=16).digest(), "little")
    return np.random.Generator(np.random.PCG64(seed)).standard_normal(d)


def add_noise(states: dict, seqs: list, noise: dict) -> dict:
    """{layer: (n, d) tensor} of ``seqs``' last-token states with the noise of ``noise_record`` added:
    ``h + noise_scale[k] / sqrt(d) * z``, summed in float64 and rounded once to the states' dtype."""
    import torch

    out = {}
    for k, h in states.items():
        sigma = noise["noise_scale"][k] / math.sqrt(h.shape[1])
        z = np.stack([noise_vector(tokens, k, h.shape[1]) for tokens in seqs])
        out[k] = (h.double() + torch.from_numpy(sigma * z).to(h.device)).to(h.dtype)
    return out
