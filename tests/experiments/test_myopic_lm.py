"""collide.experiments.myopic_lm: the corpus split, the GPT-2 export, myopic gradients and a shortened run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from collide.cli import main as cli_main
from collide.config import ModelConfig, MyopicLMConfig
from collide.experiments.myopic_lm import TinyLM, corpus_streams, run_experiment, to_gpt2
from collide.models import all_token_states, byte_tokenizer, load_model


def small(**overrides) -> MyopicLMConfig:
    base = dict(d_model=32, n_layers=2, n_heads=2, seq_len=16, batch_size=4, tokens=16 * 4 * 6, eval_sequences=8,
                lr=3e-3, threads=1)
    return MyopicLMConfig(**{**base, **overrides})


def perturbed(cfg: MyopicLMConfig, myopic: bool = False) -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM(258, cfg, myopic=myopic)
    with torch.no_grad():  # away from the LayerNorm defaults (weight 1, bias 0) so that every mapping matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_corpus_split_is_by_paragraph_and_seeded():
    train, held, tokenizer = corpus_streams(0.05, seed=0)
    again, _, _ = corpus_streams(0.05, seed=0)
    assert np.array_equal(train, again)
    bos = tokenizer.bos_token_id
    n_train, n_held = int((train == bos).sum()), int((held == bos).sum())
    assert abs(n_held / (n_train + n_held) - 0.05) < 0.005
    assert train[0] == bos and held[0] == bos and train.max() < len(tokenizer)


def test_gpt2_export_computes_the_same_logits():
    cfg = small()
    model = perturbed(cfg)
    hf = to_gpt2(model, cfg, byte_tokenizer())
    ids = torch.randint(0, 256, (3, cfg.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids), atol=1e-5)


def test_myopic_lm_sends_no_gradient_to_earlier_positions():
    """d logits(t+2) / d embedding(t) is exactly 0 in myopic mode, non-zero in vanilla; forwards agree."""
    cfg = small()
    ids = torch.randint(0, 256, (2, cfg.seq_len), generator=torch.Generator().manual_seed(2))
    outputs = {}
    for myopic in (False, True):
        model = perturbed(cfg, myopic)
        grads = []
        model.embed.register_forward_hook(lambda _m, _i, out: (out.retain_grad(), grads.append(out))[1])
        logits = model(ids)
        outputs[myopic] = logits.detach()
        logits[:, 7].sum().backward()
        at_5 = grads[0].grad[:, 5]
        assert (torch.count_nonzero(at_5) == 0) if myopic else (at_5.abs().max() > 1e-6)
        assert grads[0].grad[:, 7].abs().max() > 0
    assert torch.allclose(outputs[False], outputs[True], atol=1e-6)


def test_shortened_run_writes_results_and_a_loadable_checkpoint(tmp_path):
    result = run_experiment(small(out=str(tmp_path)))
    assert [m["mode"] for m in result["models"]] == ["vanilla", "myopic"]
    for m in result["models"]:
        assert len(m["ce_per_position"]) == 16 and 0 < m["eval_ce"] < 7  # ln(258) = 5.55 at initialisation
        assert m["curve"][-1]["tokens"] == 16 * 4 * 6
    assert result["gap"]["absolute"] == pytest.approx(result["models"][1]["eval_ce"] - result["models"][0]["eval_ce"])
    saved = json.loads((tmp_path / "myopic_lm.json").read_text())
    assert saved["models"][0]["eval_ce"] == result["models"][0]["eval_ce"]
    assert "Myopia gap" in (tmp_path / "myopic_lm.md").read_text()
    assert (tmp_path / "figures" / "myopic_lm_ce.png").stat().st_size > 10_000
    # the checkpoint is what `collide run model.source=... model.family=gpt2` loads
    lm = load_model(ModelConfig(name="myopic-lm", source=str(tmp_path / "models" / "vanilla"), family="gpt2",
                                device="cpu"))
    ids = torch.as_tensor([lm.tokenizer("def f(x):")["input_ids"]])
    states = all_token_states(lm, ids, torch.ones_like(ids), [0, 2])
    assert lm.n_layers == 2 and states[2].shape == (1, ids.shape[1], 32)


def test_bad_values_are_one_line(capsys):
    assert cli_main(["myopic-lm", "modes=[greedy]"]) == 2
    assert "choose among ['vanilla', 'myopic']" in capsys.readouterr().err
