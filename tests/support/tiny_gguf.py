"""A tiny Llama checkpoint written as a GGUF file, for the converted-model cache's fast tests and benchmark.

``write_tiny_gguf(path)`` writes a seeded 4-block Llama (d=64) with a byte-level BPE tokenizer
(256 byte tokens, a few merges, ``<bos>`` 256, ``<pad>`` 257) the way llama.cpp's converter lays one
out: GGUF metadata ``llama.*`` and ``tokenizer.ggml.*``, tensors ``token_embd``, ``blk.N.*``,
``output_norm``. The linear weights are Q8_0 blocks (de-quantized on load, as the embedded models'
Q4 weights are), the norms F32. transformers reads it with ``from_pretrained(dir, gguf_file=name)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

D, FF, LAYERS, HEADS, KV_HEADS = 64, 128, 4, 4, 2
MERGES = ["Ġ t", "h e", "Ġ a", "i n", "Ġt he"]  # byte-level merges over the GPT-2 byte alphabet


def write_tiny_gguf(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny model to ``path`` (a ``.gguf`` file); returns ``path``."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES] + ["<bos>", "<pad>"]
    bos, pad = len(tokens) - 2, len(tokens) - 1
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(D // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 2) + [3, 3])  # normal, then control (special) tokens
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(pad)
    writer.add_pad_token_id(pad)
    writer.add_add_bos_token(True)

    def add(name: str, shape: tuple[int, ...], quantized: bool = True) -> None:
        data = (rng.standard_normal(shape) * (0.02 if quantized else 0.1) + (0 if quantized else 1)).astype(np.float32)
        if quantized:
            writer.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data)

    kv = D // HEADS * KV_HEADS
    add("token_embd.weight", (len(tokens), D))
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (D,), quantized=False)
        add(f"blk.{i}.attn_q.weight", (D, D))
        add(f"blk.{i}.attn_k.weight", (kv, D))
        add(f"blk.{i}.attn_v.weight", (kv, D))
        add(f"blk.{i}.attn_output.weight", (D, D))
        add(f"blk.{i}.ffn_norm.weight", (D,), quantized=False)
        add(f"blk.{i}.ffn_gate.weight", (FF, D))
        add(f"blk.{i}.ffn_up.weight", (FF, D))
        add(f"blk.{i}.ffn_down.weight", (D, FF))
    add("output_norm.weight", (D,), quantized=False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
