"""Shared fixtures: tiny random models and Hydra composition through the compose API."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run, so a red CI is reproducible; run
# HYPOTHESIS_PROFILE=explore make test to draw fresh examples when hunting bugs.
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub on CI: fail fast instead of retrying
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def compose():
    """compose(overrides) -> the validated CollideConfig object, through Hydra's compose API."""
    from hydra import compose as hydra_compose, initialize_config_module
    from omegaconf import OmegaConf

    from collide.config import register_configs

    register_configs()

    def _compose(overrides=()):
        with initialize_config_module(config_module="collide.conf", version_base="1.3"):
            return OmegaConf.to_object(hydra_compose(config_name="config", overrides=list(overrides)))

    return _compose


@pytest.fixture(scope="session")
def tiny_llama():
    from collide.config import ModelConfig
    from collide.models import load_model

    return load_model(ModelConfig(name="tiny", source="random:llama", family="llama"))
