"""Every config in collide/conf/ composes, validates, and (for models) loads from a tiny stand-in."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from collide.config import CollideConfig, CorpusConfig, ModelConfig
from collide.corpus import available
from collide.errors import CollideError
from collide.layers import parse_layers
from collide.models import byte_tokenizer, last_token_states, load_model, tiny_config

MODELS = available("model")
CORPORA = available("corpus")


def test_config_tree_is_complete():
    paper = {"gpt2", "gpt2-medium", "gpt2-large", "gemma3-1b", "gemma3-4b", "gemma3-12b", "llama3", "mistral",
             "phi4-mini", "tinystories"}
    assert paper | {"smollm2", "gemma3-270m", "tiny-random"} <= set(MODELS)
    assert {"wikipedia", "c4", "pile", "github-python", "mix", "stdlib-docs", "stdlib-code", "files"} <= set(CORPORA)


def test_default_is_embedded_model_on_real_english(compose):
    cfg = compose()
    assert isinstance(cfg, CollideConfig)
    assert (cfg.model.name, cfg.corpus.name) == ("smollm2", "stdlib-docs")
    assert cfg.threshold == 1e-6 and cfg.layers == "all" and cfg.store.path is None
    assert (cfg.store.root, cfg.store.positions, cfg.store.dtype, cfg.cluster.kind) == ("runs/stores", "last", "auto",
                                                                                       "local")


@pytest.mark.parametrize("override,named", [("model.dtype=fp64", "fp64"), ("model.final_norm=mid", "mid"),
                                            ("search.backend=annoy", "annoy"), ("search.precision=tf32", "tf32"),
                                            ("store.positions=some", "some"), ("store.dtype=int2", "int2"),
                                            ("corpus.kind=web", "web")])
def test_fixed_value_sets_are_checked_when_composed(compose, override, named):
    with pytest.raises(CollideError) as err:
        compose([override])
    message = str(err.value)
    assert named in message and "expected one of" in message and "\n" not in message


def test_enum_values_read_as_their_strings(compose):
    cfg = compose(["model.dtype=bf16", "corpus=stdlib-code", "store.positions=all"])
    assert cfg.model.dtype == "bf16" and f"{cfg.model.dtype}" == "bf16" and str(cfg.corpus.kind) == "stdlib-code"
    assert cfg.store.positions == "all" and {"bf16": 1}[cfg.model.dtype] == 1


@pytest.mark.parametrize("name", MODELS)
def test_model_config_composes(compose, name):
    cfg = compose([f"model={name}"])
    assert isinstance(cfg.model, ModelConfig) and cfg.model.name == name
    assert cfg.model.dtype == "fp32" and cfg.model.final_norm == "post" and cfg.model.trust_remote_code is False


@pytest.mark.parametrize("name", CORPORA)
def test_corpus_config_composes(compose, name):
    cfg = compose([f"corpus={name}"])
    assert isinstance(cfg.corpus, CorpusConfig) and cfg.corpus.name == name


def test_typo_in_key_fails_with_its_name(compose):
    with pytest.raises(CollideError, match="dtpye"):
        compose(["model.dtpye=bf16"])


def test_wrong_type_fails(compose):
    with pytest.raises(CollideError, match="many"):
        compose(["n_prompts=many"])


HUB_MODELS = [m for m in MODELS if not m.startswith(("smollm2", "gemma3-270m", "tiny"))]


@pytest.mark.parametrize("name", HUB_MODELS)
def test_hub_model_loads_from_tiny_standin(compose, name, tmp_path):
    """The hub loader path (from_pretrained on a directory) on a random model of the same family."""
    cfg = compose([f"model={name}"]).model
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny_config(cfg.family)).save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    lm = load_model(dataclasses.replace(cfg, source=str(tmp_path)))
    assert lm.model.config.model_type == cfg.family
    assert (lm.n_layers, lm.d) == (4, 64)
    enc = lm.tokenizer(["a short prompt", "x"], return_tensors="pt", padding=True)
    states = last_token_states(lm, enc.input_ids, enc.attention_mask, [0, 4])
    assert states[4].shape == (2, 64) and torch.isfinite(states[4]).all()


def test_offline_hub_model_gives_one_line_error(compose):
    cfg = compose(["model=gpt2"]).model
    with pytest.raises(CollideError, match=r"openai-community/gpt2.*model\.source=") as err:
        load_model(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("spec,expected", [("all", [0, 1, 2, 3, 4]), ([4, 0, 4], [0, 4]), ("1:3", [1, 2, 3]),
                                           (2, [2]), ("2:", [2, 3, 4])])
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 4) == expected


@pytest.mark.parametrize("spec", [[5], "0:9", -1])
def test_layer_out_of_range(spec):
    with pytest.raises(CollideError, match=r"0\.\.4"):
        parse_layers(spec, 4)
