"""Inversion on Ray equals a local inversion, also when a worker dies mid-prompt, and a killed driver resumes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from collide.cluster import invert_source_ray
from collide.cluster.pool import close_pool
from collide.config import ModelConfig
from collide.invert.config import InvertConfig, LensConfig
from collide.invert.driver import invert_source

from .common import CLUSTER, TINY, wait_for

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [b"Injects", b"A cat.x", b"zebra 4", b"Ray ok!"]  # equal lengths: one (N, T, d) array
LAYER = 2


@pytest.fixture(scope="module")
def source(tiny_llama, tmp_path_factory) -> Path:
    """The layer-LAYER states of TEXTS (BOS + bytes) as plain transformers gives them, as an .npy SOURCE."""
    states = []
    for text in TEXTS:
        with torch.no_grad():
            out = tiny_llama.model(input_ids=torch.tensor([[256, *text]]), output_hidden_states=True)
        states.append(out.hidden_states[LAYER][0].float().numpy())
    path = tmp_path_factory.mktemp("invert") / "states.npy"
    np.save(path, np.stack(states))
    return path


def config(source: Path, out: Path, **kw) -> InvertConfig:
    return InvertConfig(source=str(source), model=ModelConfig(**TINY), layer=LAYER, out=str(out), progress=False,
                        lens=LensConfig(root=str(source.parent / "lenses"), progress=False), **kw)


def without_seconds(doc: dict) -> list[dict]:
    """The prompt records without their timings (the prompt's and each position's ``seconds``)."""
    drop = lambda record: {k: v for k, v in record.items() if k != "seconds"}  # noqa: E731
    return [drop(p) | {"positions": [drop(q) for q in p["positions"]]} for p in doc["prompts"]]


def test_ray_inversion_equals_local_when_a_worker_is_killed_mid_prompt(ray_local, chaos_dir, source, tmp_path):
    local = invert_source(config(source, tmp_path / "local"))
    (chaos_dir / "invert-1.kill").touch()
    remote = invert_source_ray(config(source, tmp_path / "ray"), CLUSTER)
    assert (chaos_dir / "invert-1.killed").exists()
    assert without_seconds(remote) == without_seconds(local)
    assert [p["recovered_ids"] for p in remote["prompts"]] == [[256, *t] for t in TEXTS]
    assert json.loads((tmp_path / "ray" / "inversion.json").read_text())["prompts"] == remote["prompts"]
    for key in ("layer", "final_norm", "epsilon_rule", "policy", "lens", "noise"):
        assert remote[key] == local[key], key


DRIVER = """
import dataclasses, sys
sys.path.insert(0, {root!r})
from collide.cluster import invert_source_ray
from tests.cluster.common import CLUSTER
from tests.cluster.test_cluster_invert import config
from pathlib import Path
invert_source_ray(config(Path({source!r}), Path({out!r}), policy="gradient", batch=320),
                  dataclasses.replace(CLUSTER, address={address!r}, num_workers=1))
"""


def test_the_driver_killed_mid_inversion_resumes_without_redoing_prompts(ray_local, chaos_dir, source, tmp_path):
    close_pool()  # this process's warm workers would hold every CPU the driver's worker needs
    out = tmp_path / "out"
    (chaos_dir / "invert-2.hang").touch()  # prompts 0 and 1 are listed, prompt 2 never finishes
    code = DRIVER.format(root=str(ROOT), source=str(source), out=str(out),
                         address=ray.get_runtime_context().gcs_address)
    driver = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    listed = out / "inversion.json"
    try:
        wait_for(lambda: (chaos_dir / "invert-2.hung").exists() and listed.exists()
                 and len(json.loads(listed.read_text())["prompts"]) == 2, "the driver to list prompts 0 and 1")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert driver.returncode == -signal.SIGKILL, driver.stderr.read().decode()[-3000:]
    killed = json.loads(listed.read_text())["prompts"]
    one_worker = dataclasses.replace(CLUSTER, num_workers=1)
    resumed = invert_source_ray(config(source, out, policy="gradient", batch=320), one_worker)
    assert resumed["prompts"][:2] == killed  # kept as written, timings included: not inverted again
    local = invert_source(config(source, tmp_path / "local", policy="gradient", batch=320))
    assert without_seconds(resumed) == without_seconds(local)
