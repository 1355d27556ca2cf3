"""asv benchmarks of extraction (``collide.extract``): costs over baselines timed in the same run.

Every ``track_*`` is a ratio of our cost over a baseline's (lower is better):

- ``time_vs_plain_hf``: seconds of ``extract_to_store`` (dedup, hooks, Parquet writes, checksums,
  manifest) / seconds of a plain HF forward of the same model over the same batches with
  ``output_hidden_states=True`` and nothing kept; tiny random Llama, 2000 prompts of 8-48 tokens
  (full: 8000; tiny: 200), where the fixed per-prompt cost of writing weighs most. Target <= 1 / 0.9;
- ``smollm2_time_vs_plain_hf``: the same on the embedded SmolLM2-135M over 96 stdlib-docs prompts
  (full: 384), where the forward pass dominates as in real runs (skipped at the tiny size: the
  model takes ~25 s to load). Target <= 1 / 0.9;
- ``bucketed_time_vs_fixed``: CPU seconds of length-bucketed batches / CPU seconds of fixed-order
  batches, same token budget, prompts of 4..256 tokens, one torch thread (CPU time: the work saved,
  which other jobs on a shared machine blur less than wall time). Target <= 1 / 1.3;
- ``peak_rss_10x``: peak RSS of an extraction of 10x the prompts / that of the smaller one
  (1000 prompts; full 4000; skipped at the tiny size), each in a fresh process. Target <= 1.15.

Throughput ratios take the best of 3 alternating runs each (tiny: 1), bucketing the best of 2
(full: 3). That stored states equal unpadded forwards is a test (tests/test_extract.py).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .common import SkipNotImplemented, child_peak_rss_mib, pick, smollm2, stdlib_prompts, tiny_llama


def synthetic(n: int, min_len: int, max_len: int, seed: int = 0, vocab: int = 256) -> list:
    """n deterministic prompts: BOS (256) + uniform random byte tokens, lengths uniform in min_len..max_len."""
    from collide.corpus import Prompt

    rng = np.random.default_rng(seed)
    return [Prompt(token_ids=(256, *rng.integers(0, vocab, int(rng.integers(min_len, max_len + 1))).tolist()),
                   source=f"synthetic:{i}:0", text="") for i in range(n)]


def extract_once(lm, prompts: list, shard_rows: int, batch_tokens: int, max_batch_size: int = 256) -> float:
    """Wall seconds of ``extract_to_store`` of ``prompts`` at every layer into a temporary store."""
    from collide.config import ExtractConfig, StoreConfig
    from collide.extract import extract_to_store

    with tempfile.TemporaryDirectory(prefix="collide_bench_extract_") as tmp:
        t0 = time.perf_counter()
        extract_to_store(lm, prompts, list(range(lm.n_layers + 1)), Path(tmp) / "store", len(prompts),
                         {"bench": "extract"}, StoreConfig(shard_rows=shard_rows),
                         ExtractConfig(batch_tokens=batch_tokens, max_batch_size=max_batch_size, progress=False))
        return time.perf_counter() - t0


@torch.inference_mode()
def plain_hf_once(lm, prompts: list, shard_rows: int, batch_tokens: int, max_batch_size: int = 256) -> float:
    """Wall seconds of the same shards and batches through ``model(..., output_hidden_states=True)``, nothing kept."""
    from collide.extract import DistinctPrompts, pad_batch, pad_id, plan_batches

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


def time_vs_plain_hf(lm, prompts: list, repeats: int, shard_rows: int = 1024, batch_tokens: int = 2048,
                     max_batch_size: int = 256) -> tuple[float, float, float]:
    """(extraction seconds / plain seconds, extraction prompts/s, plain prompts/s); best of ``repeats`` each,
    alternating."""
    plain_hf_once(lm, prompts[:64], shard_rows, batch_tokens, max_batch_size)  # warm-up
    ours, plain = [], []
    for _ in range(repeats):
        plain.append(plain_hf_once(lm, prompts, shard_rows, batch_tokens, max_batch_size))
        ours.append(extract_once(lm, prompts, shard_rows, batch_tokens, max_batch_size))
    return min(ours) / min(plain), len(prompts) / min(ours), len(prompts) / min(plain)


def bucketed_vs_fixed(lm, prompts: list, repeats: int, batch_tokens: int = 2048) -> float:
    """CPU seconds of length-bucketed batches / fixed-order batches over one shard, one torch thread."""
    from collide.extract import forward_shard

    seqs = [np.asarray(p.token_ids, np.int32) for p in prompts]
    times = {True: [], False: []}
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(repeats):
            for bucket in (False, True):
                t0 = time.process_time()
                forward_shard(lm, seqs, [lm.n_layers], batch_tokens, 256, bucket=bucket)
                times[bucket].append(time.process_time() - t0)
    finally:
        torch.set_num_threads(saved)
    return min(times[True]) / min(times[False])


RSS_CHILD = """
import torch
from pathlib import Path
import tempfile
from collide.config import ExtractConfig, StoreConfig
from collide.extract import extract_to_store
from benchmarks.suite.bench_extract import synthetic
from benchmarks.suite.common import tiny_llama
torch.set_num_threads(1)
lm = tiny_llama()
with tempfile.TemporaryDirectory() as tmp:
    extract_to_store(lm, synthetic({n}, 4, 16, seed=1), [0, lm.n_layers], Path(tmp) / "store", {n}, {{"bench": "rss"}},
                     StoreConfig(shard_rows=512), ExtractConfig(batch_tokens=2048, max_batch_size=256, progress=False))
"""


def measure() -> dict[str, float]:
    """{ratio name: value} of every ratio in the module docstring (one measurement)."""
    torch.manual_seed(0)
    lm = tiny_llama()
    repeats = pick(1, 3, 3)
    out = {"time_vs_plain_hf": time_vs_plain_hf(lm, synthetic(pick(100, 2000, 8000), 8, 48), repeats)[0],
           "bucketed_time_vs_fixed": bucketed_vs_fixed(lm, synthetic(pick(64, 512, 2048), 4, 256, seed=2),
                                                      repeats=pick(1, 2, 3))}
    if pick(False, True, True):  # tiny: two fresh processes would cost ~20 s each on a busy 2-core machine
        small = pick(0, 1000, 4000)
        out["peak_rss_10x"] = child_peak_rss_mib(RSS_CHILD.format(n=10 * small)) / child_peak_rss_mib(
            RSS_CHILD.format(n=small))
    if pick(False, True, True):
        real = smollm2()
        out["smollm2_time_vs_plain_hf"] = time_vs_plain_hf(real, stdlib_prompts(real, pick(0, 96, 384)), 3,
                                                           shard_rows=64, batch_tokens=1024)[0]
    return out


class Extraction:
    """The ratios of the module docstring, measured once in ``setup_cache``."""

    unit = "ratio"
    rounds = 1
    repeat = 1
    number = 1
    timeout = 900

    def setup_cache(self):
        return measure()

    setup_cache.timeout = 900

    def track_time_vs_plain_hf(self, cache):
        return cache["time_vs_plain_hf"]

    def track_smollm2_time_vs_plain_hf(self, cache):
        if "smollm2_time_vs_plain_hf" not in cache:
            raise SkipNotImplemented("SmolLM2 is not loaded at the tiny size")
        return cache["smollm2_time_vs_plain_hf"]

    def track_bucketed_time_vs_fixed(self, cache):
        return cache["bucketed_time_vs_fixed"]

    def track_peak_rss_10x(self, cache):
        if "peak_rss_10x" not in cache:
            raise SkipNotImplemented("peak RSS is not measured at the tiny size")
        return cache["peak_rss_10x"]
