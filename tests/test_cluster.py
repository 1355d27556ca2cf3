"""The Ray tests (tests/cluster) run here, inside a network namespace that holds only loopback.

See tests.support.netns: nothing can leave the machine, Ray binds 127.0.0.1, and the inner
pytest gets its own HOME and RAY_TMPDIR, removed afterwards (no ~/.ray/auth_token is left).
Skipped, with the reason, where no namespace can be made (not root, no unshare) or ray is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.netns import namespace_problem, run_isolated

ROOT = Path(__file__).resolve().parents[1]
INNER_TIMEOUT_S = 1200  # the inner suite takes a few minutes on 2 cores


def test_cluster_local_never_imports_ray():
    code = ("import sys, collide.cluster, tests.support.netns, collide.extract, collide.search, collide.pipeline; "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


@pytest.mark.slow  # minutes: a nested pytest over tests/cluster with a local Ray instance
@pytest.mark.ray
def test_ray_suite_in_a_loopback_only_namespace():
    problem = namespace_problem()
    if problem:
        pytest.skip(problem)
    token = Path.home() / ".ray" / "auth_token"
    token_before = token.exists()
    with tempfile.TemporaryDirectory(prefix="collide-ray-pytest-") as basetemp:
        proc = run_isolated([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={basetemp}",
                             "tests/cluster"], ROOT, INNER_TIMEOUT_S,
                            env=dict(os.environ, COLLIDE_RAY_NETNS="1", PYTHONDONTWRITEBYTECODE="1"))
    assert proc.returncode == 0, \
        f"the Ray tests failed inside the namespace:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-2000:]
    assert token.exists() == token_before  # no Ray token left in the real home


def test_device_map_auto_places_the_model_through_accelerate_and_states_are_unchanged():
    """model.device_map=auto (a model spread over a worker's GPUs): on CPU accelerate maps it all to the
    CPU, through its hooks, and the stored states are bitwise those of a plain load."""
    import numpy as np

    from collide.config import ModelConfig
    from collide.extract import forward_shard
    from collide.models import load_model

    tiny = dict(name="tiny", source="random:llama", family="llama")
    plain, mapped = load_model(ModelConfig(**tiny)), load_model(ModelConfig(**tiny, device_map="auto"))
    assert mapped.model.hf_device_map == {"": "cpu"} and mapped.device.type == "cpu"
    seqs = [np.array([256, 1, 2, 3, 4], np.int32), np.array([256, 9, 8], np.int32), np.array([256, 7], np.int32)]
    a, b = forward_shard(plain, seqs, [0, 2, 4], 512, 64), forward_shard(mapped, seqs, [0, 2, 4], 512, 64)
    assert all(a[k].tobytes() == b[k].tobytes() for k in (0, 2, 4))


def test_model_shell_gives_the_driver_what_the_model_gives_without_weights():
    """cluster=ray's driver (collide.cluster.shell): the same tokenizer ids, shape, manifest facts and quant record
    as a loaded model, with no parameter in memory."""
    from collide.cluster.shell import model_shell
    from collide.config import ExtractConfig, ModelConfig, StoreConfig
    from collide.extract import store_header
    from collide.models import load_model

    cfg = ModelConfig(name="tiny", source="random:llama", family="llama")
    shell, lm = model_shell(cfg), load_model(cfg)
    header = lambda m: store_header(m, [0, 2], 10, StoreConfig(), ExtractConfig())  # noqa: E731
    assert header(shell) == header(lm) and shell.quant == lm.quant
    noisy = ModelConfig(name="tiny", source="random:llama", family="llama", noise="gaussian", noise_scale=0.5)
    assert model_shell(noisy).noise == load_model(noisy).noise == {"noise": "gaussian", "noise_scale": [0.5] * 5}
    assert shell.tokenizer("a cat").input_ids == lm.tokenizer("a cat").input_ids
    assert all(p.is_meta for p in shell.model.parameters())
    assert shell.model.get_input_embeddings().weight.shape == lm.model.get_input_embeddings().weight.shape
