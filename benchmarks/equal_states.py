"""Diagnostic: exactly-equal last-token states of distinct prompts in a random Gemma-3-270M-shaped model.

The open question: a 1,000-prompt run on random weights shaped like Gemma-3-270M
(``benchmarks/gemma3_270m_config.json``) reported 35 exactly-equal state pairs at layer 18 when the
model was built on the GPU (``AutoModelForCausalLM.from_config`` inside ``with torch.device("cuda")``),
then saved and loaded back by the run, where the CPU gave none. This module builds the same model
three ways on one device,

- ``cpu_then_moved``: seeded, built on the CPU, then ``.to(device)``;
- ``device_context``: seeded, built inside ``with torch.device(device)`` (how that run built it);
- ``saved_then_loaded``: built on the CPU, saved, loaded by ``collide.models.load_model`` (how the
  run read it, and how the benchmark still does),

and for each reports facts about the weights (parameters that are all zero, the share of exact
zeros, all-zero or duplicate embedding rows among the byte tokens and over the whole vocabulary,
non-finite values, the ranges of the buffers) and
the number of exactly-equal pairs among the last-token states of the same distinct prompts at the
chosen layers, both from a plain HF forward and from collide's own extraction (``extract_to_store``),
with the longest common suffix of each equal pair's token ids (a state that only sees the last few
tokens makes equal pairs of prompts that end alike).

Prompts: stdlib-docs windows through the byte tokenizer the benchmark used (vocabulary ids 0..257).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parent / "gemma3_270m_config.json"
BYTE_VOCAB = 258  # ids the byte tokenizer emits: 256 bytes, <bos> 256, <pad> 257


SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, head_dim=16, query_pre_attn_scalar=16)


def gemma_config(path: Path = CONFIG, **overrides):
    """The transformers config of ``path`` (keys starting with "_" dropped), with ``overrides``.

    ``gemma_config(**SMOKE)``: the same 18 layers at toy widths, for a CPU check of the logic in seconds.
    """
    from transformers import AutoConfig

    spec = {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}
    spec.update(overrides)
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


BUILDS = ("cpu_then_moved", "device_context", "saved_then_loaded")


def build(how: str, device: str, config=None):
    """The seeded (torch.manual_seed(0)) fp32 model on ``device``, built ``how`` (one of BUILDS).

    ``saved_then_loaded``: built on the CPU, ``save_pretrained`` to a temporary directory, loaded back
    by ``collide.models.load_model`` (``model.source=DIR``): the path the exhaustive benchmark's run took.
    """
    from transformers import AutoModelForCausalLM

    config = config or gemma_config()
    torch.manual_seed(0)
    if how == "device_context":
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    elif how == "saved_then_loaded":
        from collide.config import ModelConfig
        from collide.models import byte_tokenizer, load_model

        with tempfile.TemporaryDirectory(prefix="collide_equal_states_model_") as tmp:
            AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp)
            # load_model reads the config saved beside the weights, so overrides travel with it
            byte_tokenizer().save_pretrained(tmp)
            model = load_model(ModelConfig(name="gemma3-270m-random", source=tmp, family="gemma3_text",
                                           device=device)).model
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def weight_facts(model) -> dict:
    """Zero, duplicate and non-finite facts about the weights (see the module docstring)."""
    zero_params, n_zero, n_total, nonfinite = [], 0, 0, []
    for name, p in model.named_parameters():
        zeros = int((p == 0).sum())
        n_zero, n_total = n_zero + zeros, n_total + p.numel()
        if zeros == p.numel():
            zero_params.append(name)
        if not bool(torch.isfinite(p).all()):
            nonfinite.append(name)
    weight = model.get_input_embeddings().weight
    emb = weight[:BYTE_VOCAB]
    return {"all_zero_parameters": [n for n in zero_params if "norm" not in n],
            "all_zero_norm_weights": sum("norm" in n for n in zero_params),  # Gemma's norms scale by 1 + w: zeros
            "exact_zero_share": n_zero / n_total, "nonfinite_parameters": nonfinite,
            "byte_embedding_zero_rows": int((emb == 0).all(dim=1).sum()),
            "byte_embedding_duplicate_rows": BYTE_VOCAB - torch.unique(emb, dim=0).shape[0],
            # over the whole vocabulary: identical rows give identical continuations in the exhaustive test
            "embedding_zero_rows": int((weight == 0).all(dim=1).sum()),
            "embedding_duplicate_rows": weight.shape[0] - torch.unique(weight, dim=0).shape[0],
            "embedding_std": float(weight.std()),
            "non_persistent_buffers": {n: [float(b.float().min()), float(b.float().max())]
                                       for n, b in model.named_buffers() if b.numel()}}


def byte_prompts(n: int) -> list:
    """The first ``n`` distinct stdlib-docs prompts through the byte tokenizer (``collide.corpus.Prompt``)."""
    from collide.corpus import iter_prompts, load_corpus_config
    from collide.models import byte_tokenizer

    seen, out = set(), []
    for prompt in iter_prompts(load_corpus_config("stdlib-docs"), byte_tokenizer()):
        if tuple(prompt.token_ids) not in seen:  # distinct inputs are distinct token-id sequences
            seen.add(tuple(prompt.token_ids))
            out.append(prompt)
            if len(out) == n:
                break
    return out


@torch.no_grad()
def hf_states(model, prompts: list, layers: list[int], batch: int = 64) -> dict[int, torch.Tensor]:
    """{layer: (n, d) float32 CPU} last-token HF ``hidden_states[layer]`` of right-padded batches."""
    device = next(model.parameters()).device
    out = {k: [] for k in layers}
    for i in range(0, len(prompts), batch):
        seqs = [list(p.token_ids) for p in prompts[i:i + batch]]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [257] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        last = torch.tensor([len(s) - 1 for s in seqs], device=device)
        rows = torch.arange(len(seqs), device=device)
        for k in layers:
            out[k].append(hidden[k][rows, last].float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def collide_states(model, prompts: list, layers: list[int]) -> dict[int, torch.Tensor]:
    """{layer: (n, d) float32} the same states through collide's extraction into a temporary store."""
    from collide.config import ExtractConfig, StoreConfig
    from collide.extract import extract_to_store
    from collide.models import LoadedModel, byte_tokenizer, find_blocks, find_final_norm

    decoder, blocks = find_blocks(model)
    lm = LoadedModel(model=model, tokenizer=byte_tokenizer(), name="gemma3-270m-random", source="random",
                     revision=None, dtype="fp32", device=next(model.parameters()).device, final_norm="post",
                     decoder=decoder, blocks=blocks, final_norm_module=find_final_norm(decoder))
    with tempfile.TemporaryDirectory(prefix="collide_equal_states_") as tmp:
        store = extract_to_store(lm, prompts, layers, Path(tmp) / "store", len(prompts), {"diagnostic": "equal"},
                                 StoreConfig(), ExtractConfig(progress=False))
        return {k: torch.from_numpy(store.layer(k)[1].copy()) for k in layers}


def equal_pairs(states: torch.Tensor) -> list[tuple[int, int]]:
    """Every pair (i < j) of bitwise-equal rows of ``states``."""
    _, inverse, counts = torch.unique(states, dim=0, return_inverse=True, return_counts=True)
    pairs = []
    for group in torch.nonzero(counts > 1).flatten().tolist():
        members = torch.nonzero(inverse == group).flatten().tolist()
        pairs += [(a, b) for i, a in enumerate(members) for b in members[i + 1:]]
    return pairs


def common_suffix(a, b) -> int:
    """Length of the longest common suffix of two token-id sequences."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def summarise(states: dict[int, torch.Tensor], prompts: list) -> dict:
    """Per layer: equal pairs, and the common-suffix lengths of the first 40 of them."""
    out = {}
    for k, x in states.items():
        pairs = equal_pairs(x)
        out[str(k)] = {"equal_pairs": len(pairs), "rows": len(x), "max_abs": float(x.abs().max()),
                       "common_suffix_of_equal_pairs": [common_suffix(prompts[a].token_ids, prompts[b].token_ids)
                                                        for a, b in pairs[:40]]}
    return out


def diagnose(device: str, n_prompts: int, layers: tuple[int, ...] = (1, 9, 18), config=None) -> dict:
    """The whole diagnostic on ``device`` (see the module docstring) with ``config`` (default: the
    Gemma-3-270M shape); a JSON-ready dict."""
    prompts = byte_prompts(n_prompts)
    config = config or gemma_config()
    result = {"device": device, "n_prompts": len(prompts), "layers": list(layers), "builds": {},
              "config": {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers")}}
    for how in BUILDS:
        model = build(how, device, config)
        result["builds"][how] = {"weights": weight_facts(model),
                                 "hf_forward": summarise(hf_states(model, prompts, list(layers)), prompts),
                                 "collide_extract": summarise(collide_states(model, prompts, list(layers)), prompts)}
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=1000)
    args = parser.parse_args()
    print(json.dumps(diagnose(args.device, args.prompts), indent=1))
