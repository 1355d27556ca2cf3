"""Resume after SIGKILL and Ctrl-C: the finished store equals an uninterrupted run, bit for bit.

Killed runs are subprocesses (this file run as a script) that SIGKILL themselves at a chosen
point: after the n-th shard commit, in the middle of a shard's forward passes, half-way through
writing a shard file, and after a shard's files are renamed but before the manifest lists them.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

N_PROMPTS, SHARD_ROWS, LAYERS = 110, 24, [0, 2, 4]  # 5 shards, the last one partial
KILLS = ["commit:1", "commit:2", "forward:9", "write:7", "manifest:3"]


def prompts(n: int = 140):
    """Deterministic mixed-length prompts; every 5th repeats an earlier one (a duplicate)."""
    from collide.corpus import Prompt

    rng = np.random.default_rng(7)
    made = []
    for i in range(n):
        if i % 5 == 4:
            ids = made[int(rng.integers(0, len(made)))]
        else:
            ids = (256, *rng.integers(0, 256, int(rng.integers(1, 30))).tolist())
            made.append(ids)
        yield Prompt(token_ids=ids, source=f"synthetic:{i}:0", text=f"prompt {i}")


def run_extraction(store_dir, positions: str = "last") -> None:
    from collide.config import ExtractConfig, ModelConfig, StoreConfig
    from collide.extract import extract_to_store
    from collide.models import load_model

    cfg = ModelConfig(name="tiny", source="random:llama", family="llama")
    identity = {"model": {"name": cfg.name, "source": cfg.source, "seed": cfg.seed}, "corpus": "synthetic:7",
                "layers": LAYERS, "n_prompts": N_PROMPTS}
    extract_to_store(load_model(cfg), prompts(), LAYERS, store_dir, N_PROMPTS, identity,
                     StoreConfig(shard_rows=SHARD_ROWS, positions=positions), ExtractConfig(batch_tokens=200, max_batch_size=16,
                                                                       progress=False))


def kill_at(spec: str) -> None:
    """Arrange for this process to SIGKILL itself at ``spec`` = "<point>:<n>" (n-th occurrence)."""
    import collide.extract as extract_mod
    import collide.store.writer as store_mod

    point, n = spec.split(":")
    count = itertools.count(1)  # next() is atomic: file writes run in several threads

    def nth() -> bool:
        return next(count) == int(n)

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "commit":  # right after the n-th shard is listed in the manifest
        real_commit = store_mod.StoreWriter.commit_shard

        def commit(self, *args, **kwargs):
            entry = real_commit(self, *args, **kwargs)
            if nth():
                die()
            return entry
        store_mod.StoreWriter.commit_shard = commit
    elif point == "forward":  # in the middle of a shard's forward passes
        real_forward = extract_mod.last_token_states

        def forward(*args, **kwargs):
            if nth():
                die()
            return real_forward(*args, **kwargs)
        extract_mod.last_token_states = forward
    elif point == "write":  # half-way through the n-th shard file write (4 files a shard): 7 = shard 1
        real_write = store_mod.atomic_write

        def write(path, fill):
            if nth():
                tmp = path.with_name(path.name + ".tmp")
                fill(tmp)
                os.truncate(tmp, tmp.stat().st_size // 2)
                die()
            return real_write(path, fill)
        store_mod.atomic_write = write
    elif point == "manifest":  # a shard's files are renamed, the manifest does not list them yet
        real_manifest = store_mod.StoreWriter._write_manifest

        def manifest(self, *args, **kwargs):
            if nth():
                die()
            real_manifest(self, *args, **kwargs)
        store_mod.StoreWriter._write_manifest = manifest


def worker(argv: list[str]) -> None:
    """``kill SPEC STORE``: extract until killed; ``run STORE...``: extract (or resume) each store.
    A store directory whose name ends in "-all" is made with store.positions=all."""
    import torch

    torch.set_num_threads(1)  # the same arithmetic in every process
    positions = lambda store_dir: "all" if store_dir.endswith("-all") else "last"
    if argv[0] == "kill":
        kill_at(argv[1])
        run_extraction(argv[2], positions(argv[2]))
        raise SystemExit(f"{argv[1]} never happened")
    for store_dir in argv[1:]:
        run_extraction(store_dir, positions(store_dir))


def spawn(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.Popen([sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def same_store(a: Path, b: Path) -> None:
    """Assert that two stores hold the same shards, files (sha256) and bit-identical states."""
    from collide.store import open_store

    sa, sb = open_store(a), open_store(b)
    assert sa.complete and sb.complete
    keys = ("index", "first_prompt_id", "rows", "files", "stream_items", "n_duplicates", "tokens_sha256",
            "batch_tokens", "nonfinite_rows")
    assert [{k: s[k] for k in keys} for s in sa.shards] == [{k: s[k] for k in keys} for s in sb.shards]
    assert sa.manifest["counts"] == sb.manifest["counts"]
    assert sa.prompts().equals(sb.prompts())
    for k in LAYERS:
        ids_a, xa = sa.layer(k)
        ids_b, xb = sb.layer(k)
        assert np.array_equal(ids_a, ids_b)
        assert np.array_equal(xa.view(np.uint32), xb.view(np.uint32))
        if sa.positions == "all":
            for (pa_, ya), (pb, yb) in zip(sa.position_states(k), sb.position_states(k), strict=True):
                assert pa_ == pb and np.array_equal(ya.view(np.uint32), yb.view(np.uint32))


def test_sigkill_at_several_points_then_resume_equals_an_uninterrupted_run(tmp_path):
    from collide.store import open_store, read_manifest
    from collide.store.verify import verify_store

    stores = {spec: tmp_path / spec.replace(":", "-") for spec in KILLS}
    killed = {spec: spawn("kill", spec, str(path)) for spec, path in stores.items()}
    for spec, proc in killed.items():
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == -signal.SIGKILL, f"{spec}: exit {proc.returncode}\n{output}"
    committed = {spec: len(read_manifest(path)["shards"]) for spec, path in stores.items()}
    assert committed["commit:1"] == 1 and committed["commit:2"] == 2
    assert committed["write:7"] == 1 and committed["manifest:3"] == 1  # shard 1 was being written
    assert committed["forward:9"] <= 2  # killed inside shard 1 or 2 (shard 0 may still be in the writer)
    assert all(read_manifest(path)["status"] == "in-progress" for path in stores.values())
    assert list(stores["write:7"].glob("*/part-00001.parquet.tmp"))  # half a file
    assert (stores["manifest:3"] / "layer=4" / "part-00001.parquet").exists()  # renamed, never listed
    assert all(verify_store(path) == [] for path in stores.values())  # what is listed is sound

    baseline = tmp_path / "uninterrupted"
    proc = spawn("run", str(baseline), *map(str, stores.values()))
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    manifest = read_manifest(baseline)
    assert len(manifest["shards"]) == 5 and manifest["counts"]["n_duplicates"] > 0
    for spec, path in stores.items():
        assert verify_store(path) == [], spec
        same_store(path, baseline)
        assert not list(path.rglob("*.tmp"))
    assert open_store(baseline).n_rows == N_PROMPTS


@pytest.mark.slow
def test_every_position_store_resumes_after_sigkill_with_identical_checksums(tmp_path):
    """store.positions=all: 7 files a shard (prompts, 3 layers, 3 positions); kills after shard 1's
    commit and half-way through shard 1's 3rd file, then a resume equals an uninterrupted run."""
    from collide.store import read_manifest
    from collide.store.verify import verify_store

    stores = {spec: tmp_path / (spec.replace(":", "-") + "-all") for spec in ("commit:1", "write:10")}
    killed = {spec: spawn("kill", spec, str(path)) for spec, path in stores.items()}
    for spec, proc in killed.items():
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == -signal.SIGKILL, f"{spec}: exit {proc.returncode}\n{output}"
    assert [len(read_manifest(path)["shards"]) for path in stores.values()] == [1, 1]
    assert list(stores["write:10"].glob("positions/*/part-00001.parquet.tmp")) or \
        list(stores["write:10"].glob("*/part-00001.parquet.tmp"))  # half a file
    baseline = tmp_path / "uninterrupted-all"
    proc = spawn("run", str(baseline), *map(str, stores.values()))
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    assert read_manifest(baseline)["positions"] == "all"
    for spec, path in stores.items():
        assert verify_store(path) == [], spec
        same_store(path, baseline)  # the files' sha256 included
        assert not list(path.rglob("*.tmp"))


def test_ctrl_c_leaves_a_resumable_store(tmp_path, monkeypatch):
    import collide.extract as extract_mod
    from collide.store import read_manifest
    from collide.store.verify import verify_store

    run_extraction(tmp_path / "baseline")
    real = extract_mod.last_token_states
    calls = [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 9:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(extract_mod, "last_token_states", interrupted)
    try:
        run_extraction(tmp_path / "s")
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the interrupt did not propagate")
    manifest = read_manifest(tmp_path / "s")
    assert manifest["status"] == "in-progress" and len(manifest["shards"]) >= 1
    assert verify_store(tmp_path / "s") == []
    monkeypatch.setattr(extract_mod, "last_token_states", real)
    run_extraction(tmp_path / "s")
    same_store(tmp_path / "s", tmp_path / "baseline")


if __name__ == "__main__":
    worker(sys.argv[1:])
