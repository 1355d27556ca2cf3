"""How long the extraction of `make nightly-gpu` takes: decoder forward throughput of paper-sized models.

The weights are random (the architecture, not the values, sets the cost), so this runs on a GPU
machine without hub access and needs only torch and transformers. For each architecture and dtype it
times the decoder (no lm_head, as collide runs it) over ``--prompts`` prompts of 9-33 tokens
(8-32 sampled tokens + BOS, the corpus defaults), right-padded in length-sorted batches, keeping the
last-token state of every layer and copying it to the host, and prints prompts/s and the implied
time for 100,000 prompts.

    python benchmarks/gpu_forward_estimate.py [--prompts 4096] [--batch 512] [--models llama3,gemma3-1b,gpt2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Hidden sizes and depths of the paper's models (their hub configs), random weights.
ARCHS = {
    "llama3": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "mistral": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "gemma3-1b": dict(model_type="gemma3_text", hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144),
    "gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@torch.no_grad()
def prompts_per_second(name: str, dtype: str, n_prompts: int, batch: int) -> float:
    spec = dict(ARCHS[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.backends.cuda.matmul.allow_tf32 = False  # collide computes fp32 as IEEE fp32
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype]).eval()
    decoder = model.base_model
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(9, 34, (n_prompts,), generator=gen).sort().values
    vocab = config.get_text_config().vocab_size

    def one_pass(count: int) -> None:
        for start in range(0, count, batch):
            lens = lengths[start:start + batch].cuda()
            width = int(lens.max())
            ids = torch.randint(0, vocab, (len(lens), width), device="cuda")
            mask = (torch.arange(width, device="cuda")[None, :] < lens[:, None]).long()
            out = decoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            rows = torch.arange(len(lens), device="cuda")
            torch.stack([h[rows, lens - 1] for h in out.hidden_states]).float().cpu()

    one_pass(min(batch * 2, n_prompts))  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    start = time.perf_counter()
    one_pass(n_prompts)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del model, decoder
    torch.cuda.empty_cache()
    return n_prompts / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--models", default="llama3,gemma3-1b,gpt2")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    for name in args.models.split(","):
        for dtype in DTYPES:
            rate = prompts_per_second(name, dtype, args.prompts, args.batch)
            print(json.dumps({"model": name, "dtype": dtype, "prompts_per_s": round(rate, 1),
                              "minutes_for_100k": round(1e5 / rate / 60, 1)}), flush=True)


if __name__ == "__main__":
    main()
