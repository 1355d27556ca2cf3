"""Shared fixtures: tiny random models and Hydra composition through the compose API."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
from hypothesis import settings

from collide.config import CACHE_ENV

# Property tests draw the same examples on every run, so a red CI is reproducible; run
# HYPOTHESIS_PROFILE=explore make test to draw fresh examples when hunting bugs.
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# $COLLIDE_CACHE (converted models, lens bundles, file digests) is one temporary folder per test run, never the
# checkout's runs/: made by the process that starts the run, before any test module is imported (some copy
# os.environ for their subprocesses), inherited by the xdist workers and every subprocess, so a real model is
# converted once per run and read from the cache after (writes into it are atomic); removed when the run ends.
# A test that needs an empty cache sets its own.
if "PYTEST_XDIST_WORKER" not in os.environ:
    os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="collide-cache-")
    atexit.register(shutil.rmtree, os.environ[CACHE_ENV], ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub on CI: fail fast instead of retrying
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread for the tiny models: on a small or busy machine a second OpenMP thread only
# waits for a core (a 64-wide linear layer then takes a scheduler tick, not microseconds). Set
# before torch starts its pool, and inherited by every subprocess (python -m collide, workers).
# Tests marked slow (real pretrained models) get the caller's settings back: see real_model_threads.
THREAD_VARIABLES = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def compose():
    """compose(overrides) -> the validated CollideConfig object, through Hydra's compose API."""
    from collide.cli import compose as compose_config

    return lambda overrides=(): compose_config("run", list(overrides))


@pytest.fixture(scope="session")
def tiny_llama():
    from collide.config import ModelConfig
    from collide.models import load_model

    return load_model(ModelConfig(name="tiny", source="random:llama", family="llama"))


TINY_STORE_PROMPTS = 10
TINY_STORE_LAYERS = [3, 1]  # asked out of order: the store keeps them sorted


def tiny_prompts(n: int, seed: int = 0, min_len: int = 1, max_len: int = 40):
    """A deterministic stream of n prompts of mixed lengths: BOS (256) + seeded random bytes."""
    import numpy as np

    from collide.corpus import Prompt

    rng = np.random.default_rng(seed)
    for i in range(n):
        ids = (256, *rng.integers(0, 256, int(rng.integers(min_len, max_len + 1))).tolist())
        yield Prompt(token_ids=ids, source=f"synthetic:{i}:0", text=f"prompt {i}")


def tiny_identity(n_prompts: int, **changes) -> dict:
    base = {"model": {"name": "tiny", "dtype": "fp32"}, "corpus": {"name": "synthetic", "seed": 0},
            "n_prompts": n_prompts}
    base.update(changes)
    return base


@pytest.fixture(scope="session")
def tiny_store(tiny_llama, tmp_path_factory):
    """A complete store extracted once per session from tiny_llama: TINY_STORE_PROMPTS prompts of
    tiny_prompts(), layers TINY_STORE_LAYERS, last positions, text kept, shards of 16 rows, identity
    tiny_identity(TINY_STORE_PROMPTS). Shared by every test that asks for it: read it, never write to it."""
    from collide.config import ExtractConfig, StoreConfig
    from collide.extract import extract_to_store

    path = tmp_path_factory.mktemp("tiny-store") / "s"
    return extract_to_store(tiny_llama, tiny_prompts(TINY_STORE_PROMPTS), TINY_STORE_LAYERS, path,
                            TINY_STORE_PROMPTS, tiny_identity(TINY_STORE_PROMPTS),
                            StoreConfig(shard_rows=16, keep_text=True),
                            ExtractConfig(batch_tokens=512, max_batch_size=64, progress=False))


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    """OMP_NUM_THREADS intra-op threads in this process too, even where torch was imported first."""
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def real_model_threads(request, monkeypatch):
    """A slow test (a real pretrained model, a long job) runs with the caller's thread settings, or
    torch's default of one thread per core: its large matrix products use every core."""
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    import torch

    for name, value in THREAD_VARIABLES.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(int(THREAD_VARIABLES["OMP_NUM_THREADS"] or cores))
    yield
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))
