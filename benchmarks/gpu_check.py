"""``make gpu-check``: every GPU-only check of collide in one command, at most 8 minutes on one GPU.

    PYTHONPATH=. python3 benchmarks/gpu_check.py [--out benchmarks/results] [--cpu-smoke] [--only a,b]

Writes ``<out>/gpu-<UTC date>.json`` (``--cpu-smoke``: ``cpu-smoke.json``; ``--only``: the sections'
names joined to the stem) with one entry per section, rewritten after each so that a run stopped
by a time limit keeps the sections it finished. Every section but ``precache`` runs by default;
``precache`` (about 6 minutes) runs apart: ``make gpu-check ARGS="--only precache"``.

1. ``tests``: the GPU-only tests (``tests/search/test_search_gpu.py``: the search on the device and its
   error bounds) through pytest, with its summary line and exit status;
2. ``prefix_attention``: cached continuations vs full forwards of prefix+token on the device (tiny
   random Llama and Gemma-3), max relative difference of the last-layer states;
3. ``error_bound``: the screening GEMM's worst observed error over its rigorous bound, fp32 and
   tf32x3 (``benchmarks.gpu_bound_check.worst_error_ratio``; ``passed`` when at most its LIMIT);
4. ``search``: ``min_pairwise`` at n=1e5, d=4096, fp32 and tf32x3 (suite.bench_search.gpu_search);
   ``prune``: the pruned search (``prune="pca"``) against brute force at n=1e5, d=4096 on LLM-like rows
   (suite.bench_prune.llm_states): the minimum alone, and with a sample's nearest neighbours
   (``nearest="auto"``) against every row's, seconds and whether the answers are identical;
5. ``extraction_mfu``: ``extract_to_store`` of 4096 prompts of 9-33 tokens through a random
   Llama-3.1-8B-shaped model in bf16 (all 33 layers kept), as model flops per second (2 x the
   non-embedding parameters per token) over the GPU's bf16 dense peak and over a bf16 8192^3
   matmul timed in the same run; also plain HF forward over the same batches;
6. ``exhaustive``: one prompt x the whole 262,144-token vocabulary of a random Gemma-3-270M-shaped
   model at its last layer: continuation states/s and the certified search over C(262144, 2) pairs;
7. ``equal_states``: the diagnostic of benchmarks/equal_states.py (1,000 prompts, both builds);
8. ``inversion``: the ``track_*`` ratios of ``benchmarks/suite/bench_invert.py`` (quick size);
9. ``precache`` (apart): the authors' synthetic pre-caching run (d=128, batch 512, Huber, cosine),
   vanilla then myopic, as many of their 58,593 steps as fit in 150 s each (``benchmarks/precache_gpu.py``).

Without CUDA every section is skipped with a message (in seconds) and nothing is written; ``--cpu-smoke``
then runs the equal-states diagnostic on 24 prompts on the CPU at toy widths (``equal_states.SMOKE``) and writes ``cpu-smoke.json`` (each
GPU section ``{"skipped": "no CUDA device"}``), to check the script's logic in seconds. A section that raises records its error and the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

try:
    import torch
except ImportError:  # a Python without torch has no GPU to check either
    print("gpu_check: torch is not installed in this Python: every section is skipped", flush=True)
    sys.exit(0)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # appended: an installed collide (with its collide.conf) comes first
    sys.path.append(str(REPO))

from benchmarks import equal_states  # noqa: E402
from benchmarks.suite.common import run_tracks, timed  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 flop/s by GPU name fragment
LLAMA8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
NO_CUDA = {"skipped": "no CUDA device"}


def gpu_tests() -> dict:
    """pytest on the GPU-only test files: exit status and summary line."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/search/test_search_gpu.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    lines = proc.stdout.strip().splitlines()
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-500:],
            "failures": [line for line in lines if line.startswith("FAILED")][:20]}


def prefix_attention_check(device: str = "cuda") -> dict:
    """Max relative difference, cached steps vs full forwards, on ``device`` for tiny Llama and Gemma-3."""
    from collide.config import ModelConfig
    from collide.continuations import continuation_states, full_forward_states
    from collide.models import load_model

    out = {}
    for family in ("llama", "gemma3_text"):
        lm = load_model(ModelConfig(name="tiny", source=f"random:{family}", family=family, device=device))
        prefix, tokens, layers = [256] + list(b"a prefix longer than the window"), list(range(64)), [lm.n_layers]
        cached = torch.cat([b.states[lm.n_layers] for b in continuation_states(lm, prefix, tokens, layers, 32)])
        full = torch.cat([b.states[lm.n_layers] for b in full_forward_states(lm, prefix, tokens, layers, 32)])
        rel = float(((cached - full).norm(dim=1) / full.norm(dim=1)).max())
        out[family] = {"max_rel_diff": rel, "ok": rel < 1e-5}
    return out


def error_bound(device: str = "cuda") -> dict:
    """``benchmarks.gpu_bound_check.worst_error_ratio`` in fp32 and tf32x3 (fp32 only off CUDA)."""
    from benchmarks.gpu_bound_check import worst_error_ratio

    precisions = ("fp32", "tf32x3") if device.startswith("cuda") else ("fp32",)
    out = {p: worst_error_ratio(device, p) for p in precisions}
    return {**out, "passed": all(r["passed"] for r in out.values())}


def extraction_mfu(n_prompts: int = 4096, batch_tokens: int = 16384, device: str = "cuda", **shape) -> dict:
    """Extraction of a random Llama-3.1-8B-shaped bf16 model as a fraction of the bf16 peak (see docstring).

    ``shape`` overrides LLAMA8B's sizes (a CPU dry run of the code path uses toy ones)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from benchmarks.suite.bench_extract import extract_once, plain_hf_once, synthetic
    from collide.models import LoadedModel, byte_tokenizer, find_blocks, find_final_norm

    spec = {**LLAMA8B, **shape}
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, bos_token_id=256, pad_token_id=257)
    with torch.device(device):  # the weights' values do not matter for timing; built in place, seconds
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval().requires_grad_(False)
    decoder, blocks = find_blocks(model)
    lm = LoadedModel(model=model, tokenizer=byte_tokenizer(), name="llama3-8b-random", source="random",
                     revision=None, dtype="bf16", device=torch.device(device), final_norm="post", decoder=decoder,
                     blocks=blocks, final_norm_module=find_final_norm(decoder))
    prompts = synthetic(n_prompts, 8, 32)
    tokens = sum(len(p.token_ids) for p in prompts)
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel() \
        - (0 if config.tie_word_embeddings else model.get_output_embeddings().weight.numel())
    flops = 2.0 * params * tokens  # decoder matmuls; attention over <= 33 tokens adds under 1%
    plain_hf_once(lm, prompts[:512], 1024, batch_tokens, 512)  # warm-up
    t_plain = plain_hf_once(lm, prompts, 4096, batch_tokens, 512)
    t_ours = extract_once(lm, prompts, 4096, batch_tokens, 512)
    side = 8192 if device == "cuda" else 512
    a = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, a)
    sync()
    t_mm = min(timed(lambda: (torch.mm(a, a), sync()))[0] for _ in range(5))
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    matmul_rate = 2.0 * side**3 / t_mm
    del model, lm, a
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"prompts": n_prompts, "tokens": tokens, "non_embedding_params": params, "extract_s": t_ours,
            "plain_hf_s": t_plain, "extract_prompts_per_s": n_prompts / t_ours,
            "extract_time_vs_plain_hf": t_ours / t_plain, "matmul_bf16_tflops": matmul_rate / 1e12,
            "extract_mfu_vs_peak": flops / t_ours / peak if peak else None, "peak_bf16_tflops": (peak or 0) / 1e12,
            "extract_mfu_vs_matmul": flops / t_ours / matmul_rate}


def exhaustive_one_set(device: str = "cuda", config=None) -> dict:
    """One prompt x the whole vocabulary of the random Gemma-3-270M shape (or ``config``) at its last layer,
    certified."""
    import numpy as np

    from collide.continuations import continuation_states
    from collide.models import LoadedModel, byte_tokenizer, find_blocks, find_final_norm
    from collide.search import min_pairwise

    model = equal_states.build("cpu_then_moved", device, config)
    decoder, blocks = find_blocks(model)
    lm = LoadedModel(model=model, tokenizer=byte_tokenizer(), name="gemma3-270m-random", source="random",
                     revision=None, dtype="fp32", device=torch.device(device), final_norm="post", decoder=decoder,
                     blocks=blocks, final_norm_module=find_final_norm(decoder))
    n = model.get_input_embeddings().weight.shape[0]
    prefix, layer = [256] + list(b"The injectivity of language models, tested exhaustively."), lm.n_layers
    t_ext, blocks_out = timed(lambda: list(continuation_states(lm, prefix, np.arange(n), [layer], 16384)))
    states = torch.cat([b.states[layer] for b in blocks_out]).to(device)
    t_search, res = timed(lambda: min_pairwise(states, 1e-6, "torch", block_rows=16384))
    del model, lm, states
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"continuations": n, "pairs": n * (n - 1) // 2, "extract_s": t_ext, "search_s": t_search,
            "continuations_per_s": n / t_ext, "pairs_per_s": n * (n - 1) / 2 / t_search,
            "certified": res.certified, "min_distance": res.distance, "n_collisions": res.n_collisions}


def prune_check(n: int = 100_000, d: int = 4096, device: str = "cuda") -> dict:
    """Pruned vs brute force on ``device`` (see the module docstring); the answers must be identical."""
    import numpy as np

    from benchmarks.suite.bench_prune import llm_states
    from collide.search import min_pairwise

    x = torch.from_numpy(llm_states(n, d, seed=0)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    runs = {"min": (dict(prune="off", nearest=False), dict(prune="pca", nearest=False)),
            "sampled_nn": (dict(prune="off", nearest=True), dict(prune="pca", nearest="auto", nearest_cutoff=0))}
    min_pairwise(x[:20000], 1e-6, "torch", block_rows=16384, prune="pca", nearest=False)  # warm-up
    out = {"n": n, "d": d}
    for name, (brute_kw, pruned_kw) in runs.items():
        t_brute, brute = timed(lambda: (min_pairwise(x, 1e-6, "torch", block_rows=16384, **brute_kw), sync())[0])
        t_pruned, pruned = timed(lambda: (min_pairwise(x, 1e-6, "torch", block_rows=16384, **pruned_kw), sync())[0])
        rows = np.flatnonzero(pruned.nn_index >= 0)
        same = (brute.distance, brute.pair, brute.certified) == (pruned.distance, pruned.pair, pruned.certified) \
            and brute.collisions == pruned.collisions and np.array_equal(brute.nn_index[rows], pruned.nn_index[rows]) \
            and np.array_equal(brute.nn_distance[rows], pruned.nn_distance[rows])
        out[name] = {"brute_s": t_brute, "pruned_s": t_pruned, "speedup": t_brute / t_pruned, "identical": bool(same),
                     "prune": pruned.prune, "nearest": pruned.nearest["description"]}
    del x
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def inversion() -> dict:
    """The track_* ratios of benchmarks/suite/bench_invert.py at the quick size on this machine."""
    os.environ.setdefault("COLLIDE_BENCH_SIZE", "quick")
    return {"tracks": run_tracks(importlib.import_module("benchmarks.suite.bench_invert"))}


def _search() -> dict:
    from benchmarks.suite.bench_search import gpu_search

    return gpu_search(100_000)


SECTIONS = {"tests": gpu_tests, "prefix_attention": prefix_attention_check, "error_bound": error_bound,
            "search": _search, "prune": prune_check, "extraction_mfu": extraction_mfu,
            "exhaustive": exhaustive_one_set, "equal_states": lambda: equal_states.diagnose("cuda", 1000),
            "inversion": inversion,
            "precache": lambda: importlib.import_module("benchmarks.precache_gpu").precache_check()}
APART = ("precache",)  # about 6 minutes: run on its own (--only precache), so each call fits 10 minutes


def section(name: str, fn, out: dict) -> None:
    """Run one section into out[name]; an exception is recorded, not raised."""
    print(f"== {name}", flush=True)
    tic = time.perf_counter()
    try:
        out[name] = fn()
    except Exception as exc:  # a broken section must not stop the others
        out[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    out[name]["seconds"] = round(time.perf_counter() - tic, 2)
    print(json.dumps(out[name], default=str)[:600], flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--cpu-smoke", action="store_true", help="without CUDA: the diagnostic on 24 CPU prompts")
    parser.add_argument("--only", default=None, help=f"comma list of sections to run, of {', '.join(SECTIONS)} "
                        f"(default: all but {', '.join(APART)})")
    args = parser.parse_args(argv)
    chosen = [n for n in SECTIONS if n not in APART] if args.only is None else args.only.split(",")
    unknown = [n for n in chosen if n not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    cuda = torch.cuda.is_available()
    now = datetime.now(timezone.utc)
    out: dict = {"date": now.isoformat(timespec="seconds"), "torch": torch.__version__,
                 "gpu": torch.cuda.get_device_name() if cuda else None, "command": "make gpu-check",
                 "sections": chosen}
    try:
        import transformers

        out["transformers"] = transformers.__version__
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True).stdout.strip() or None
    except Exception as exc:  # versions are informational
        out["versions_error"] = str(exc)
    if not cuda:
        print("gpu_check: no CUDA device: every GPU section is skipped", flush=True)
    if not cuda and not args.cpu_smoke:
        return 0
    stem = f"gpu-{now:%Y-%m-%d}" if cuda else "cpu-smoke"
    path = args.out / (stem + ("" if args.only is None else "-" + "-".join(chosen)) + ".json")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        if cuda or name == "inversion":
            section(name, SECTIONS[name], out)
        elif name == "equal_states":  # --cpu-smoke: the diagnostic at toy widths on the CPU
            section(name, lambda: equal_states.diagnose("cpu", 24, config=equal_states.gemma_config(
                **equal_states.SMOKE)), out)
        else:
            out[name] = dict(NO_CUDA)
        path.write_text(json.dumps(out, indent=1, default=str) + "\n")  # after every section: a kill keeps them
    print(f"gpu_check: wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
