"""The command line as a user meets it: `collide ...` run in this process through cli.main (the
checks, one-line errors and runs), and a few `python -m collide` subprocesses where only a fresh
process shows it (the entry point, a whole run, Ctrl-C)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from collide import cli
from collide.store import lock_store, open_store

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
QUIET = ["extract.progress=false", "search.progress=false"]


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def collide_process(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "collide", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=timeout)


@pytest.fixture
def collide(tmp_path, monkeypatch, capsys):
    """collide(*args) -> Result: `python -m collide ARGS` run in this process from tmp_path (what
    collide/__main__.py does: a first argument that is no command means `run`). Hydra's logging
    set-up of a run is undone afterwards, so no handler outlives the test."""
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()

    def run(*args) -> Result:
        argv = list(args) if args and args[0] in cli.COMMANDS else ["run", *args]
        handlers, level = root.handlers[:], root.level
        try:
            code = cli.main(argv)
        finally:
            for handler in root.handlers:
                if handler not in handlers:
                    handler.close()
            root.handlers[:] = handlers
            root.setLevel(level)
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def store_path(run: Path) -> Path:
    """The store a run used, from the record in its run directory."""
    return Path(json.loads((run / "store.json").read_text())["path"])


def error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("collide: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_help_and_cfg_job(tmp_path, collide):
    help_ = collide_process("--help", cwd=tmp_path)  # the real entry point, in a fresh process
    assert help_.returncode == 0 and "model: " in help_.stdout and "smollm2" in help_.stdout
    cfg = collide("--cfg", "job", "model=llama3", "corpus=c4", "n_prompts=7")
    assert cfg.returncode == 0
    assert "source: meta-llama/Llama-3.1-8B" in cfg.stdout and "path: allenai/c4" in cfg.stdout
    assert "n_prompts: 7" in cfg.stdout


def test_unknown_model_lists_the_choices(collide):
    proc = collide("model=llama4")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "'llama4'" in line and "llama3" in line and "smollm2" in line


def test_unknown_corpus_in_a_sweep_lists_the_choices(collide):
    proc = collide("-m", "corpus=stdlib-docs,wikipedai")
    assert proc.returncode == 2 and "wikipedia" in error_line(proc)


@pytest.mark.parametrize("override,named", [("model.dtpye=bf16", "dtpye"), ("n_prompts=many", "many")])
def test_bad_key_or_value_is_one_line(tmp_path, collide, override, named):
    proc = collide("model=tiny-random", override, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and named in error_line(proc)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sweep,named", [("n_prompts=10,many", "many"), ("model.dtpye=bf16,fp16", "dtpye")])
def test_bad_value_anywhere_in_a_sweep_is_one_line_before_any_job(tmp_path, collide, sweep, named):
    proc = collide("-m", "model=tiny-random", sweep, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 2 and named in error_line(proc)
    assert not (tmp_path / "sweep").exists()


def test_multirun_sweep_runs_every_job_and_compares_them(tmp_path, collide):
    sweep = tmp_path / "sweep"
    proc = collide("-m", "model=tiny-random", "model.dtype=fp32,bf16", "n_prompts=30", "layers=[0,4]",
                   f"hydra.sweep.dir={sweep}", *QUIET)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(sweep.glob("*/report.json"))
    assert [p.parent.name for p in jobs] == ["0-tiny-random-stdlib-docs", "1-tiny-random-stdlib-docs"]
    assert [json.loads(p.read_text())["dtype"] for p in jobs] == ["fp32", "bf16"]
    cmp = collide("compare", str(sweep), f"out={tmp_path / 'cmp'}")
    assert cmp.returncode == 0, cmp.stderr[-3000:]
    summary = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [(r["dtype"], r["complete"]) for r in summary["runs"]] == [("fp32", True), ("bf16", True)]
    assert summary["differing"] == ["dtype"]  # flagged: bf16 and fp32 states are not like for like


def test_layer_out_of_range_fails_before_any_forward(tmp_path, collide):
    proc = collide("model=tiny-random", "layers=[2,9]", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert "0..4" in error_line(proc)
    assert not (tmp_path / "runs" / "stores").exists()


def test_offline_hub_model_names_the_id_and_the_fix(tmp_path, collide):
    proc = collide("model=mistral", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    line = error_line(proc)
    assert "mistralai/Mistral-7B-v0.1" in line and "model.source=" in line


def test_too_many_prompts_says_how_many_the_corpus_gives(tmp_path, collide):
    data = tmp_path / "docs.txt"
    # one letter per paragraph: every window of every paragraph is distinct, so none is dropped as a duplicate
    data.write_text("\n\n".join(chr(ord("a") + i) * 40 for i in range(12)))
    proc = collide("model=tiny-random", "corpus=files", f"corpus.data_files=[{data}]", "n_prompts=50",
                   f"hydra.run.dir={tmp_path / 'run'}", *QUIET)
    assert proc.returncode == 2
    assert "12" in error_line(proc) and "n_prompts" in error_line(proc)
    assert not (tmp_path / "run").exists()  # the failed run wrote nothing there: no folder of .hydra/ and a log
    # the advice, followed, finishes the store that was cut short (no new store is extracted)
    advice = re.search(r"\((n_prompts=12) (store\.path=(\S+)) finishes this store", error_line(proc))
    cut_short = Path(advice.group(3))
    done = collide("model=tiny-random", "corpus=files", f"corpus.data_files=[{data}]", advice.group(1),
                   advice.group(2), f"hydra.run.dir={tmp_path / 'run'}", *QUIET)
    assert done.returncode == 0, done.stderr[-3000:]
    assert store_path(tmp_path / "run") == cut_short.resolve()
    assert open_store(cut_short).complete and open_store(cut_short).n_rows == 12
    assert [p.name for p in (tmp_path / "runs" / "stores").iterdir()] == [cut_short.name]


@pytest.mark.parametrize("name,argv,says", [
    ("lens", ["fit", "model=tiny-random", "layers=1"], "the interrupted layer restarts"),
    ("search", ["store"], "search from the start"),
    ("precache", [], "train from the start"),
    ("exhaustive", ["run"], "again to resume"),
])
def test_ctrl_c_says_what_running_the_command_again_does(monkeypatch, collide, name, argv, says):
    def interrupted(cfg, command=""):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, name, dataclasses.replace(cli.COMMANDS[name], fn=interrupted))
    proc = collide(name, *argv)
    assert proc.returncode == 130 and says in error_line(proc)


def test_myopic_lm_warns_under_the_measured_budget():
    from collide.commands.myopic_lm import short_budget
    from collide.config import MyopicLMConfig

    assert short_budget(MyopicLMConfig()) is None  # the default: 400 steps of 16 x 128
    warning = short_budget(MyopicLMConfig(tokens=16 * 128 * 399))
    assert warning.startswith("399 training step(s) per mode") and "raise tokens" in warning


def test_tiny_run_writes_the_documented_outputs(tmp_path, collide):
    """A whole `python -m collide` run in a fresh process, as a user starts it."""
    run = tmp_path / "run"
    proc = collide_process("model=tiny-random", "n_prompts=120", "layers=[0,2,4]", f"hydra.run.dir={run}", *QUIET,
                           cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert [entry["layer"] for entry in report["layers"]] == [0, 2, 4]
    assert report["n_prompts"] == 120 and report["model"]["name"] == "tiny-random"
    assert all(entry["certified"] for entry in report["layers"])
    assert all(entry["n_pairs"] == 120 * 119 // 2 for entry in report["layers"])
    assert (run / "report.md").exists() and (run / "figures" / "min_distance.png").stat().st_size > 10_000
    assert {p.name for p in (run / "collisions").iterdir()} == {"layer=0.parquet", "layer=2.parquet",
                                                                "layer=4.parquet"}
    assert open_store(store_path(run)).complete
    # a damaged shard is never compared as numbers: the search names the file and the fix
    damaged = store_path(run) / "layer=2" / "part-00000.parquet"
    data = bytearray(damaged.read_bytes())
    data[200] ^= 0xFF
    damaged.write_bytes(bytes(data))
    search = collide("search", str(store_path(run)), "layers=[2]")
    assert search.returncode == 2
    assert str(damaged) in error_line(search) and "collide verify" in error_line(search)


def test_ctrl_c_then_same_command_resumes(tmp_path, collide):
    run = tmp_path / "run"
    args = ["model=tiny-random", "n_prompts=360", "store.shard_rows=10", "corpus.max_tokens=64",
            f"hydra.run.dir={run}", "extract.max_batch_size=1", *QUIET]  # 36 shards, one prompt a forward: time to stop it
    # A shell that starts a job in the background (as CI runners may) makes it ignore SIGINT, and
    # Python keeps an ignored SIGINT ignored: restore the default so the child gets KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "collide", *args], env=ENV, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stores = tmp_path / "runs" / "stores"
    deadline = time.time() + 300
    def manifest():
        found = list(stores.glob("*/manifest.json"))
        return found[0] if found and json.loads(found[0].read_text())["shards"] else None

    while time.time() < deadline and manifest() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "run the same command to resume" in [ln for ln in stderr.splitlines() if ln.startswith("collide: error:")][0]
    partial = json.loads(manifest().read_text())
    assert partial["status"] == "in-progress" and 1 <= len(partial["shards"]) < 36
    done = collide(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    store = open_store(store_path(run))
    assert store.complete and store.n_rows == 360
    ids, _ = store.layer(1)
    assert (ids == range(360)).all()


def test_same_command_reuses_its_run_dir_and_a_store_being_written_is_refused(tmp_path, collide):
    args = ["model=tiny-random", "n_prompts=40", "layers=[1]", *QUIET]
    assert collide(*args).returncode == 0
    run = tmp_path / "runs" / "tiny-random-stdlib-docs-n40" / "layers=[1]"  # progress flags do not name it
    first = json.loads((run / "report.json").read_text())
    again = collide(*args)  # a complete store: searched again, no model needed
    assert again.returncode == 0 and "searching it without loading the model" in again.stdout + again.stderr
    assert "loading model" not in again.stdout + again.stderr
    untimed = [{k: v for k, v in e.items() if k != "seconds"} for e in first["layers"]]
    assert [{k: v for k, v in e.items() if k != "seconds"}
            for e in json.loads((run / "report.json").read_text())["layers"]] == untimed
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["stores", "tiny-random-stdlib-docs-n40"]
    other = tmp_path / "store-in-use"
    other.mkdir(parents=True)
    fd = lock_store(other)  # as if another copy of this command were writing its store
    try:
        busy = collide("model=tiny-random", "n_prompts=30", "layers=[1]", f"store.path={other}", *QUIET)
    finally:
        os.close(fd)
    assert busy.returncode == 2 and "being written by another writer" in error_line(busy)
    assert list(other.iterdir()) == []  # nothing was written into it


@pytest.mark.slow
def test_embedded_smollm2_end_to_end(tmp_path):
    """The real pretrained model on real English: the report's content, not just its existence."""
    run = tmp_path / "run"
    proc = collide_process("model=smollm2", "corpus=stdlib-docs", "n_prompts=60", "layers=[0,1,15,30]",
                           f"hydra.run.dir={run}", *QUIET, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert report["model"]["n_layers"] == 30 and report["model"]["d"] == 576
    layers = {entry["layer"]: entry for entry in report["layers"]}
    assert set(layers) == {0, 1, 15, 30}
    for k in (1, 15, 30):  # contextual layers: distinct prompts stay apart, certified
        assert layers[k]["certified"] and layers[k]["n_collisions"] == 0 and layers[k]["min_distance"] > 1e-3
    # prompts that end in the same token share their embedding state exactly
    last_tokens = [ids[-1] for ids in open_store(store_path(run)).prompts(["token_ids"]).column(0).to_pylist()]
    same_end = sum(a == b for i, a in enumerate(last_tokens) for b in last_tokens[i + 1:])
    assert layers[0]["n_collisions"] == same_end and (same_end == 0 or layers[0]["min_distance"] == 0)
    assert report["verdict"]["status"] == "no_collisions"
    assert "No collisions below 1e-6 in 5,310 pairs" in (run / "report.md").read_text()  # 3 x C(60, 2)


def test_invert_with_cluster_ray_goes_to_the_ray_workers(monkeypatch, collide):
    """`collide invert ... cluster=ray` hands the composed config to collide.cluster.invert_source_ray (stubbed:
    the Ray path itself runs in tests/cluster, inside the loopback-only namespace)."""
    seen = {}

    def fake(cfg, cluster_cfg, command=None):
        seen.update(kind=cluster_cfg.kind, workers=cluster_cfg.num_workers, layer=cfg.layer, command=command)
        return {"layer": 1, "prompts": [], "summary": {"n_done": 0, "n_prompts": 0, "n_not_recovered": 0,
                                                        "exact_prompts": None}}

    monkeypatch.setattr("collide.cluster.invert_source_ray", fake)
    proc = collide("invert", "states.npy", "model=tiny-random", "layer=1", "cluster=ray",
                   "cluster.num_workers=2")
    assert proc.returncode == 0, proc.stderr
    assert seen["kind"] == "ray" and seen["workers"] == 2 and seen["layer"] == 1 and "cluster=ray" in seen["command"]
