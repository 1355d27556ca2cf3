"""``collide myopic-lm``: vanilla against myopic training of a small GPT-2-style language model.

The natural-language half of "Do Language Models Plan Ahead for Future Tokens?" (Wu, Morris and
Levine, arXiv 2404.00859) at CPU scale: the same model is trained twice on the embedded corpus
(``pydoc_data.topics``, Python's own documentation, as ``collide.corpus.stdlib_docs`` splits it
into paragraphs), once normally and once myopically, to the same token budget, and the held-out
cross-entropy of the two is compared, overall and per position. The gap is the price of not
letting any position's loss shape the computation of earlier positions (pre-caching).

- **Tokens.** The byte tokenizer ``collide.models.byte_tokenizer`` (256 bytes + <bos>): its
  258-way softmax keeps the output layer small enough for a CPU (the SmolLM2 tokenizer's 49,152
  would cost more than the 4 blocks together). Every paragraph starts with <bos>; paragraphs are
  split into training and held-out ones by a seeded permutation (``val_fraction`` held out), and
  each side is concatenated into one stream.
- **Model.** ``n_layers`` pre-LayerNorm GPT-2 blocks (``collide.experiments.precache.Block``:
  causal multi-head attention, a 4d ReLU MLP), learned token and position embeddings, a final
  LayerNorm and an output layer tied to the token embedding. Myopic training computes the keys
  and values of past positions from stop-gradient copies of their states (as ``collide precache``).
- **Training.** Random windows of ``seq_len`` + 1 tokens of the training stream (seeded), batches
  of ``batch_size``, until ``tokens`` target tokens have been seen; AdamW (weight decay 0.1,
  betas 0.9/0.95), linear warm-up over 2% of the steps then cosine decay to 10% of ``lr``.
- **Reported.** Held-out cross-entropy in nats per byte token over ``eval_sequences``
  non-overlapping windows of the held-out stream, overall and per position 0..seq_len-1, for
  each mode, with the gap myopic - vanilla; wall and CPU seconds.
- **Checkpoints.** Each model is saved as a Hugging Face GPT-2 checkpoint (``GPT2LMHeadModel``,
  ``activation_function="relu"``, with the byte tokenizer) in ``out/models/<mode>``, so
  ``collide run model=tiny-random model.source=out/models/<mode> model.family=gpt2
  store.positions=all`` stores its states for ``collide probe``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from collide.atomic import atomic_write, fsync_dir, write_outputs
from collide.config import MyopicLMConfig
from collide.errors import CollideError
from collide.experiments import torch_threads
from collide.experiments.precache import MODES, Block, require

log = logging.getLogger(__name__)

SCHEMA = "collide-myopic-lm/1"
WARMUP = 0.02  # share of the steps with a linear learning-rate warm-up
FINAL_LR = 0.1  # the cosine decay ends at this share of the peak learning rate
LOG_EVERY = 50  # steps between two points of the recorded training-loss curve
MAX_SEQ_LEN = 1024  # longest training window: GPT-2's context (the checkpoints are saved as GPT-2)
PAPER = {"vanilla": 3.28, "myopic": 3.40}  # GPT-2 (124M) on natural language, cross-entropy (arXiv 2404.00859)


def corpus_streams(val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, object]:
    """(training stream, held-out stream, tokenizer): byte-token ids of the stdlib-docs paragraphs,
    each paragraph led by <bos>, split by paragraph with a seeded permutation."""
    from collide.corpus import stdlib_docs
    from collide.models import byte_tokenizer

    tokenizer = byte_tokenizer()
    texts = [text for _, text in stdlib_docs()]
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]  # <bos> + bytes
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = max(1, round(val_fraction * len(ids)))
    held, train = order[:n_val], order[n_val:]

    def stream(rows) -> np.ndarray:
        return np.concatenate([np.asarray(ids[i], np.int64) for i in sorted(rows)])

    return stream(train), stream(held), tokenizer


class TinyLM(nn.Module):
    """Token ids (b, n) -> next-token logits (b, n, vocab) through GPT-2 blocks; ``myopic`` as in precache."""

    def __init__(self, vocab: int, cfg: MyopicLMConfig, myopic: bool):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise CollideError(f"d_model={cfg.d_model} is not a multiple of n_heads={cfg.n_heads}; e.g. d_model=256 "
                               "n_heads=4")
        self.myopic = myopic
        self.embed = nn.Embedding(vocab, cfg.d_model)
        self.position = nn.Embedding(cfg.seq_len, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.01)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.position(torch.arange(ids.shape[1]))
        for block in self.blocks:
            h = block(h, "residual" if self.myopic else None)
        return self.ln_f(h) @ self.embed.weight.T  # the output layer is tied to the token embedding


def to_gpt2(model: TinyLM, cfg: MyopicLMConfig, tokenizer):
    """The same network as a Hugging Face ``GPT2LMHeadModel`` (Conv1D weights are the transposed Linear ones)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = model.embed.weight.shape[0]
    config = GPT2Config(vocab_size=vocab, n_positions=cfg.seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
                        n_head=cfg.n_heads, activation_function="relu", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    hf = GPT2LMHeadModel(config).eval()
    state = {"transformer.wte.weight": model.embed.weight, "transformer.wpe.weight": model.position.weight,
             "transformer.ln_f.weight": model.ln_f.weight, "transformer.ln_f.bias": model.ln_f.bias}
    for k, block in enumerate(model.blocks):
        p = f"transformer.h.{k}."
        state.update({p + "ln_1.weight": block.ln1.weight, p + "ln_1.bias": block.ln1.bias,
                      p + "ln_2.weight": block.ln2.weight, p + "ln_2.bias": block.ln2.bias,
                      p + "attn.c_attn.weight": block.qkv.weight.T, p + "attn.c_attn.bias": block.qkv.bias,
                      p + "attn.c_proj.weight": block.proj.weight.T, p + "attn.c_proj.bias": block.proj.bias,
                      p + "mlp.c_fc.weight": block.mlp[0].weight.T, p + "mlp.c_fc.bias": block.mlp[0].bias,
                      p + "mlp.c_proj.weight": block.mlp[2].weight.T, p + "mlp.c_proj.bias": block.mlp[2].bias})
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.copy_(state[name].detach())
    hf.tie_weights()
    return hf


def save_checkpoint(hf, tokenizer, where: Path) -> Path:
    """``save_pretrained`` of model and tokenizer into a sibling temporary directory, renamed to ``where``
    once complete (a previous checkpoint there is replaced): the directory appears whole or not at all."""
    tmp = where.with_name(where.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if where.exists():
        shutil.rmtree(where)
    os.replace(tmp, where)
    fsync_dir(where.parent)
    return where


def train(cfg: MyopicLMConfig, mode: str, stream: np.ndarray, vocab: int) -> tuple[TinyLM, list[dict]]:
    """One model trained on ``cfg.tokens`` target tokens of random windows of ``stream``; returns it and its curve."""
    from collide.console import progress

    torch.manual_seed(cfg.seed)
    model = TinyLM(vocab, cfg, myopic=mode == "myopic")
    rng = np.random.default_rng(cfg.seed + 1)
    data = torch.from_numpy(stream)
    steps = max(1, cfg.tokens // (cfg.batch_size * cfg.seq_len))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "position" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "position" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    warmup = max(1, int(WARMUP * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, FINAL_LR + (1 - FINAL_LR) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, steps - warmup))))))
    offsets = torch.arange(cfg.seq_len + 1)
    curve, running = [], []
    with progress(total=steps, desc=f"myopic-lm {mode}", mininterval=10) as bar:
        for step in range(steps):
            starts = torch.from_numpy(rng.integers(0, len(stream) - cfg.seq_len - 1, cfg.batch_size))
            window = data[starts[:, None] + offsets]
            logits = model(window[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, vocab), window[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            schedule.step()
            running.append(loss.item())
            bar.update(1)
            if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
                curve.append({"step": step + 1, "tokens": (step + 1) * cfg.batch_size * cfg.seq_len,
                              "train_ce": sum(running) / len(running)})
                running = []
                if len(curve) % 10 == 0:
                    log.info("%s: step %d/%d, train cross-entropy %.4f", mode, step + 1, steps, curve[-1]["train_ce"])
    return model, curve


def evaluate(model: TinyLM, stream: np.ndarray, cfg: MyopicLMConfig) -> dict:
    """Held-out cross-entropy (nats per token), overall and per position, over non-overlapping windows."""
    n = min(cfg.eval_sequences, (len(stream) - 1) // cfg.seq_len)
    data = torch.from_numpy(stream)
    per_position = torch.zeros(cfg.seq_len, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, n, 64):
            rows = torch.arange(start, min(n, start + 64))[:, None] * cfg.seq_len + torch.arange(cfg.seq_len + 1)
            window = data[rows]
            logits = model(window[:, :-1])
            ce = F.cross_entropy(logits.transpose(1, 2), window[:, 1:], reduction="none")  # (b, n)
            per_position += ce.double().sum(0)
    per_position /= n
    return {"eval_ce": float(per_position.mean()), "ce_per_position": per_position.tolist(), "eval_sequences": n}


def check(cfg: MyopicLMConfig) -> None:
    """One-line errors for values the experiment cannot run with, before any work: every number in range."""
    bad = [m for m in cfg.modes if m not in MODES]
    if bad or not cfg.modes:
        raise CollideError(f"modes={cfg.modes}: choose among {list(MODES)}, e.g. modes=[vanilla,myopic]")
    if min(cfg.seq_len, cfg.batch_size, cfg.tokens, cfg.eval_sequences, cfg.n_layers) < 1:
        raise CollideError(f"seq_len={cfg.seq_len}, batch_size={cfg.batch_size}, tokens={cfg.tokens}, eval_sequences="
                           f"{cfg.eval_sequences}, n_layers={cfg.n_layers}: each must be >= 1")
    if not 0 < cfg.val_fraction < 1:
        raise CollideError(f"val_fraction={cfg.val_fraction}: must be in (0, 1), e.g. val_fraction=0.05")
    step = cfg.batch_size * cfg.seq_len
    require(cfg, {
        "seq_len": (cfg.seq_len <= MAX_SEQ_LEN, f"at most {MAX_SEQ_LEN} (GPT-2's context), e.g. seq_len=128"),
        "tokens": (cfg.tokens >= step, f">= one step of batch_size x seq_len = {step:,} target tokens (the default "
                                       "819200 is 400 steps of 16 x 128)"),
        "d_model": (cfg.d_model >= 1, ">= 1, e.g. d_model=256"),
        "n_heads": (cfg.n_heads >= 1 and cfg.d_model % cfg.n_heads == 0,
                    f">= 1 and divide d_model={cfg.d_model}, e.g. d_model=256 n_heads=4"),
        "lr": (math.isfinite(cfg.lr) and cfg.lr > 0, "a positive learning rate, e.g. lr=2e-3"),
        "threads": (cfg.threads >= 0, ">= 0 (0 = torch's default), e.g. threads=1"),
        "seed": (cfg.seed >= 0, ">= 0, e.g. seed=0"),
    })


def check_streams(cfg: MyopicLMConfig, train: np.ndarray, held: np.ndarray) -> None:
    """One line if a stream is too short for one window of ``seq_len`` + 1 tokens (before any training)."""
    for name, stream in (("training", train), ("held-out", held)):
        if len(stream) < cfg.seq_len + 2:
            raise CollideError(f"seq_len={cfg.seq_len}: the {name} stream has only {len(stream):,} tokens at "
                               f"val_fraction={cfg.val_fraction}, not one window of seq_len + 1; lower seq_len or "
                               "raise val_fraction (e.g. val_fraction=0.05)")


def figure(result: dict, path: Path) -> dict:
    """Held-out cross-entropy per position, one line per mode, and the myopic - vanilla gap below."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    by = {m["mode"]: m for m in result["models"]}
    for mode, m in by.items():
        top.plot(m["ce_per_position"], "-" if mode == "vanilla" else "--", label=f"{mode} ({m['eval_ce']:.3f})")
    top.set_ylabel("held-out cross-entropy (nats / byte)")
    top.legend()
    top.grid(True, alpha=0.3)
    if len(by) == 2:
        gap = np.asarray(by["myopic"]["ce_per_position"]) - np.asarray(by["vanilla"]["ce_per_position"])
        bottom.plot(gap, color="C3")
        bottom.axhline(0, color="0.5", lw=0.8)
    bottom.set_ylabel("myopic - vanilla")
    bottom.set_xlabel("position in the window (tokens of context - 1)")
    bottom.grid(True, alpha=0.3)
    c = result["config"]
    top.set_title(f"myopic vs vanilla, {c['n_layers']} layers, d={c['d_model']}, {c['tokens']:,} byte tokens",
                  fontsize=10)
    fig.tight_layout()
    written = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return written


def markdown(result: dict) -> str:
    """myopic_lm.md: the cross-entropies, the gap, and the paper's figures beside them."""
    c = result["config"]
    lines = ["# Myopic vs vanilla training on language (arXiv 2404.00859)", "",
             f"{c['n_layers']}-layer GPT-2-style model (d={c['d_model']}, {c['n_heads']} heads, ReLU, "
             f"{result['parameters']:,} parameters), byte tokens, windows of {c['seq_len']}, {c['tokens']:,} training "
             f"tokens per mode (batches of {c['batch_size']}), lr {c['lr']}, seed {c['seed']}; stdlib-docs "
             f"paragraphs, {result['train_tokens']:,} training / {result['heldout_tokens']:,} held-out tokens.", "",
             "| mode | held-out CE (nats / byte) | CE at positions 0-7 | CE at the last 32 positions | wall s | CPU s |",
             "|---|---|---|---|---|---|"]
    for m in result["models"]:
        ce = m["ce_per_position"]
        lines.append(f"| {m['mode']} | {m['eval_ce']:.4f} | {np.mean(ce[:8]):.4f} | {np.mean(ce[-32:]):.4f} | "
                     f"{m['seconds']:.0f} | {m['cpu_seconds']:.0f} |")
    if "gap" in result:
        g = result["gap"]
        lines += ["", f"Myopia gap: {g['absolute']:+.4f} nats ({100 * g['relative']:+.1f}%); the paper's GPT-2 "
                  f"(124M, natural language): {PAPER['myopic']} vs {PAPER['vanilla']} "
                  f"({100 * (PAPER['myopic'] / PAPER['vanilla'] - 1):+.1f}%)."]
    return "\n".join(lines) + "\n"


def run_experiment(cfg: MyopicLMConfig, command: str | None = None) -> dict:
    """Train every mode, evaluate it, save it as a GPT-2 checkpoint; write myopic_lm.json, .md and the figure.

    ``cfg.threads`` applies for the call only; ``command`` is recorded in myopic_lm.json."""
    check(cfg)
    with torch_threads(cfg.threads):
        return _run(cfg, command)


def _run(cfg: MyopicLMConfig, command: str | None) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    train_stream, held, tokenizer = corpus_streams(cfg.val_fraction, cfg.seed)
    check_streams(cfg, train_stream, held)
    vocab = len(tokenizer)
    result = {"schema": SCHEMA, "command": command, "config": json.loads(json.dumps(asdict(cfg))),
              "tokenizer": "byte", "vocab": vocab, "train_tokens": int(len(train_stream)),
              "heldout_tokens": int(len(held)), "paper": PAPER, "models": []}
    out = Path(cfg.out)
    for mode in cfg.modes:
        t1, c1 = time.perf_counter(), time.process_time()
        model, curve = train(cfg, mode, train_stream, vocab)
        model.eval()
        result["parameters"] = sum(p.numel() for p in model.parameters())
        entry = {"mode": mode, **evaluate(model, held, cfg), "curve": curve,
                 "seconds": time.perf_counter() - t1, "cpu_seconds": time.process_time() - c1}
        if cfg.save_models:
            entry["checkpoint"] = str(save_checkpoint(to_gpt2(model, cfg, tokenizer), tokenizer, out / "models" / mode))
        result["models"].append(entry)
        log.info("%s: held-out cross-entropy %.4f nats/byte (%.0f s, %.0f CPU s)", mode, entry["eval_ce"],
                 entry["seconds"], entry["cpu_seconds"])
    by = {m["mode"]: m["eval_ce"] for m in result["models"]}
    if len(by) == 2:
        result["gap"] = {"absolute": by["myopic"] - by["vanilla"], "relative": by["myopic"] / by["vanilla"] - 1}
    result["seconds"], result["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
    figures = {"figures/myopic_lm_ce.png": lambda path: figure(result, path)} if cfg.figures else {}
    written = write_outputs(out, "myopic_lm", result, markdown(result), figures)
    log.info("wrote %s (%.0f s)", written, result["seconds"])
    return result
