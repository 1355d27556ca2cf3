"""Bad inputs across every command, as a new user types them: each one is refused with exit status 2 and
exactly one stderr line that names the input, no traceback, and no file under the working folder created,
changed or removed. The commands run in this process through cli.main, from a folder holding a finished
tiny run (store.positions=all), a positions=last run, a damaged store copy, lens bundles and bad files.
No pretrained model is loaded: collide.models.load_model refuses every model but tiny-random, and cases
that must fail before any model is loaded refuse that one too.

Then hypothesis-drawn dumps of states (shapes, dtypes, NaN/Inf positions; .npy, .safetensors, .parquet)
for `collide invert`: a well-formed dump is read exactly (what reaches the model is what was written), a
malformed one is refused in one line naming the file before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from collide import cli

TINY_D = 64  # width of the tiny-random model (collide/conf/model/tiny-random.yaml)
LENS_FIT = ["lens.n_prompts=8", "lens.n_prefixes=2", "lens.continuations=16", "lens.table=false",
            "lens.progress=false"]  # a lens bundle of tiny-random that fits in about a second


class ModelLoaded(Exception):
    """Raised by the guarded load_model: a case reached a model it must not load."""


class Case(NamedTuple):
    id: str  # pytest id: <command>-<what is wrong>
    argv: list  # the command line after `collide`, run from the workspace
    named: str  # what the one error line must contain: the input, as the user typed it (or the fix naming it)
    loads: str = "none"  # none: no model may load; tiny: tiny-random may (the error comes after it loads)


QUIET = ["extract.progress=false", "search.progress=false"]
CASES = [
    # collide run (through the Hydra app, as `collide run` runs)
    Case("run-unknown-model", ["run", "model=llama4"], "llama4"),
    Case("run-misspelt-key", ["run", "model=tiny-random", "model.dtpye=bf16"], "dtpye"),
    Case("run-one-prompt", ["run", "model=tiny-random", "n_prompts=1", *QUIET], "n_prompts=1"),
    Case("run-negative-threshold", ["run", "model=tiny-random", "threshold=-1", *QUIET], "threshold=-1"),
    Case("run-layer-out-of-range", ["run", "model=tiny-random", "layers=[2,9]", *QUIET], "layers=[2, 9]", "tiny"),
    Case("run-binary-corpus", ["run", "model=tiny-random", "corpus=files", "corpus.data_files=[binary.txt]", *QUIET],
         "binary.txt"),
    Case("run-nul-bytes-corpus", ["run", "model=tiny-random", "corpus=files", "corpus.data_files=[nul.txt]", *QUIET],
         "nul.txt"),
    Case("run-empty-corpus", ["run", "model=tiny-random", "corpus=files", "corpus.data_files=[empty.txt]", *QUIET],
         "empty.txt"),
    Case("run-corpus-matches-nothing", ["run", "model=tiny-random", "corpus=files", "corpus.data_files=[no*.jsonl]",
                                        *QUIET], "no*.jsonl"),
    Case("run-corpus-is-a-folder", ["run", "model=tiny-random", "corpus=files", "corpus.data_files=[outdir]",
                                    *QUIET], "outdir"),
    Case("run-bad-jsonl", ["run", "model=tiny-random", "corpus=files", "corpus.data_files=[bad.jsonl]", *QUIET],
         "bad.jsonl:1"),
    Case("run-fake-parquet", ["run", "model=tiny-random", "corpus=files", "corpus.data_files=[fake.parquet]", *QUIET],
         "fake.parquet"),
    Case("run-zero-min-tokens", ["run", "model=tiny-random", "corpus.min_tokens=0", *QUIET], "corpus.min_tokens=0"),
    # collide search
    Case("search-missing-store", ["search", "nowhere"], "nowhere does not exist"),
    Case("search-not-a-store", ["search", "afile"], "afile"),
    Case("search-out-is-a-folder", ["search", "run", "out=outdir"], "out=outdir"),
    Case("search-out-not-json", ["search", "run", "out=summary.txt"], "out=summary.txt"),
    Case("search-layer-not-stored", ["search", "run", "layers=[3]"], "layers=[3]"),
    Case("search-negative-max-listed", ["search", "run", "max_listed=-1"], "max_listed=-1"),
    Case("search-damaged-store", ["search", "damaged-store", "search.progress=false"], "layer=2/part-00000.parquet"),
    # collide verify
    Case("verify-missing-store", ["verify", "nowhere"], "nowhere does not exist"),
    Case("verify-run-folder", ["verify", "run"], "run/store.json"),
    # collide compare
    Case("compare-out-is-a-file", ["compare", "run", "out=afile"], "out=afile"),
    Case("compare-missing-run", ["compare", "nowhere"], "nowhere"),
    Case("compare-no-report", ["compare", "outdir"], "outdir"),
    Case("compare-bad-depth-axis", ["compare", "run", "depth_axis=sideways"], "sideways"),
    # collide exhaustive
    Case("exhaustive-missing-run", ["exhaustive", "nowhere"], "nowhere"),
    Case("exhaustive-zero-prompts", ["exhaustive", "run", "n_prompts=0"], "n_prompts=0"),
    Case("exhaustive-bad-vocab", ["exhaustive", "run", "vocab=abc"], "abc"),
    # collide invert
    Case("invert-missing-source", ["invert", "nowhere.npy", "model=tiny-random", "layer=1"], "nowhere.npy"),
    Case("invert-unknown-model", ["invert", "states.npy", "model=llama4", "layer=1"], "llama4"),
    Case("invert-unsupported-suffix", ["invert", "states.txt", "model=tiny-random", "layer=1"], "states.txt"),
    Case("invert-empty-file", ["invert", "empty.npy", "model=tiny-random", "layer=1"], "empty.npy"),
    Case("invert-out-is-a-file", ["invert", "run", "out=afile", "policy=random"], "afile"),
    Case("invert-zero-prompts", ["invert", "run", "n_prompts=0", "policy=random"], "n_prompts=0"),
    Case("invert-ragged-safetensors", ["invert", "ragged.safetensors", "model=tiny-random", "layer=1",
                                       "policy=random"], "ragged.safetensors"),
    Case("invert-nan-rows", ["invert", "nan.npy", "model=tiny-random", "layer=1", "policy=random"], "nan.npy"),
    # collide lens
    Case("lens-unknown-model", ["lens", "fit", "model=llama4", "layers=1"], "llama4"),
    Case("lens-no-model", ["lens", "fit", "layers=1"], "model=NAME"),
    Case("lens-unknown-action", ["lens", "fitt", "model=tiny-random", "layers=1"], "fitt"),
    Case("lens-truncated-bundle", ["lens", "fit", "model=tiny-random", "layers=1", "lens.path=lens-truncated",
                                   *LENS_FIT], "lens-truncated", "tiny"),
    Case("lens-nan-weights", ["lens", "fit", "model=tiny-random", "layers=1", "lens.path=lens-nan", *LENS_FIT],
         "lens-nan", "tiny"),
    Case("lens-root-is-a-file", ["lens", "fit", "model=tiny-random", "layers=1", "lens.root=afile", *LENS_FIT],
         "afile", "tiny"),
    # collide probe
    Case("probe-missing-source", ["probe", "nowhere"], "nowhere"),
    Case("probe-last-token-store", ["probe", "lastrun"], "store.positions=all"),
    Case("probe-negative-tau", ["probe", "run", "taus=[-1]"], "taus=[-1]"),
    Case("probe-bad-fraction", ["probe", "run", "test_fraction=1.5"], "test_fraction=1.5"),
    Case("probe-out-is-a-file", ["probe", "run", "out=afile"], "out=afile"),
    # collide precache
    Case("precache-negative-lr", ["precache", "lr=-1"], "lr=-1"),
    Case("precache-zero-steps", ["precache", "steps=0"], "steps=0"),
    Case("precache-p-above-one", ["precache", "p=2"], "p=2"),
    Case("precache-heads-not-dividing", ["precache", "n_heads=3"], "n_heads=3"),
    Case("precache-out-is-a-file", ["precache", "out=afile"], "out=afile"),
    # collide myopic-lm
    Case("myopic-lm-negative-lr", ["myopic-lm", "lr=-1"], "lr=-1"),
    Case("myopic-lm-one-token", ["myopic-lm", "tokens=1"], "tokens=1"),
    Case("myopic-lm-val-fraction-one", ["myopic-lm", "val_fraction=1"], "val_fraction=1"),
    Case("myopic-lm-huge-window", ["myopic-lm", "seq_len=100000"], "seq_len=100000"),
    Case("myopic-lm-out-is-a-file", ["myopic-lm", "out=afile"], "out=afile"),
    # the command line itself
    Case("unknown-command", ["frobnicate"], "frobnicate"),
    Case("unknown-option", ["search", "run", "--frob"], "--frob"),
]


# --------------------------------------------------------------------------- the workspace


def write_lens_bundles(ws: Path) -> None:
    """A tiny-random lens bundle fit once, copied as lens-truncated (weights cut in half) and lens-nan (a NaN
    weight, its recorded sha256 and size updated, so only the NaN is wrong)."""
    from safetensors.numpy import load_file, save_file

    assert cli.main(["lens", "fit", "model=tiny-random", "layers=1", f"lens.path={ws / 'lens-good'}", *LENS_FIT]) == 0
    for name in ("lens-truncated", "lens-nan"):
        shutil.copytree(ws / "lens-good", ws / name)
    weights = ws / "lens-truncated" / "lens.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    weights = ws / "lens-nan" / "lens.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k, v in sorted(tensors.items()) if v.dtype.kind == "f" and v.size)
    tensors[name].flat[0] = np.nan
    save_file(tensors, str(weights))
    meta = json.loads((ws / "lens-nan" / "lens.json").read_text())
    meta["lens.safetensors"] = {"sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                                "bytes": weights.stat().st_size}
    (ws / "lens-nan" / "lens.json").write_text(json.dumps(meta, indent=2) + "\n")


def write_states_files(ws: Path) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    np.save(ws / "states.npy", rng.standard_normal((2, 5, TINY_D)).astype(np.float32))
    nan = rng.standard_normal((2, 5, TINY_D)).astype(np.float32)
    nan[1, 3] = np.nan  # the second prompt's fourth position
    np.save(ws / "nan.npy", nan)
    save_file({"p0": rng.standard_normal((5, TINY_D)).astype(np.float32),
               "p1": rng.standard_normal((4, TINY_D)).astype(np.float32),
               "p2": rng.standard_normal((3, TINY_D // 2)).astype(np.float32)}, str(ws / "ragged.safetensors"))
    (ws / "empty.npy").write_bytes(b"")
    (ws / "states.txt").write_text("0.1 0.2 0.3\n")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The folder every case runs from: run/ (a finished tiny-random run, store.positions=all, layers 1 and 2),
    lastrun/ (positions=last), damaged-store/ (a copy of run's store with a flipped byte in layer 2), lens
    bundles, states files and bad corpus files."""
    from collide.pipeline import run_pipeline

    ws = tmp_path_factory.mktemp("bad-inputs")
    common = ["model=tiny-random", "layers=[1,2]", f"store.root={ws / 'runs' / 'stores'}", *QUIET,
              "report.figures=false", "report.diagnostics=false"]
    run_pipeline(cli.compose("run", [*common, "n_prompts=12", "store.positions=all"]), ws / "run", "fixture")
    run_pipeline(cli.compose("run", [*common, "n_prompts=8"]), ws / "lastrun", "fixture")
    store = Path(json.loads((ws / "run" / "store.json").read_text())["path"])
    shutil.copytree(store, ws / "damaged-store")
    damaged = ws / "damaged-store" / "layer=2" / "part-00000.parquet"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    write_lens_bundles(ws)
    write_states_files(ws)
    (ws / "afile").write_text("an existing file\n")
    (ws / "outdir").mkdir()
    (ws / "binary.txt").write_bytes(bytes(range(128, 256)) * 8)
    (ws / "nul.txt").write_bytes(b"plain words at first\n\n" + b"\x00" * 64)
    (ws / "empty.txt").write_bytes(b"")
    (ws / "bad.jsonl").write_text('{"text": oops}\n{"text": "fine"}\n')
    (ws / "fake.parquet").write_text("this is text, not Parquet\n")
    return ws


def snapshot(root: Path) -> dict:
    """{relative path: (size, mtime_ns, sha256)} of every file, and {relative path: None} of every folder."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            out[rel] = None
        else:
            out[rel] = (path.stat().st_size, path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


@pytest.fixture
def collide(workspace, monkeypatch, capsys):
    """collide(argv, loads) -> (status, stderr): cli.main run from the workspace, load_model guarded (``loads``
    as in Case), Hydra's logging set-up of a run undone afterwards."""
    import collide.exhaustive.driver
    import collide.models

    monkeypatch.chdir(workspace)
    real = collide.models.load_model

    def run(argv: list, loads: str = "none"):
        def guarded(cfg, *args, **kwargs):
            if loads != "tiny" or not str(cfg.source).startswith("random:"):
                raise ModelLoaded(f"{cfg.name} ({cfg.source})")
            return real(cfg, *args, **kwargs)

        monkeypatch.setattr(collide.models, "load_model", guarded)
        monkeypatch.setattr(collide.exhaustive.driver, "load_model", guarded)
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        capsys.readouterr()
        try:
            status = cli.main(list(argv))
        finally:
            for handler in root.handlers:
                if handler not in handlers:
                    handler.close()
            root.handlers[:] = handlers
            root.setLevel(level)
        return status, capsys.readouterr().err

    return run


def assert_refused(status: int, stderr: str, named: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("collide: error: "), lines
    assert named in lines[0], lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, workspace, collide):
    before = snapshot(workspace)
    status, stderr = collide(case.argv, case.loads)
    assert_refused(status, stderr, case.named)
    after = snapshot(workspace)
    assert {k: v for k, v in after.items() if before.get(k, "new") != v} == {}
    assert sorted(set(before) - set(after)) == []


def test_every_command_has_cases():
    assert {c.argv[0] for c in CASES} >= set(cli.COMMANDS) - {"models", "audit"}


# --------------------------------------------------------------------------- hypothesis: dumps for collide invert


class Dump(NamedTuple):
    suffix: str  # .npy | .safetensors | .parquet
    prompts: list  # one (T, d) array per prompt, in the dtype written
    layout: str  # parquet: "prompt" (a states column) or "position" (prompt_id, position, state); else ""


FLOATS = ("float16", "float32", "float64")


@st.composite
def dumps(draw, dtypes=FLOATS, bad="", suffixes=(".npy", ".safetensors", ".parquet")):
    """A dump of 1..3 prompts of 1..4 positions and width 1..6 in one of ``dtypes``; ``bad`` = "nan" puts one NaN
    or Inf somewhere, "empty" gives one prompt no position (every prompt, in a .npy)."""
    suffix = draw(st.sampled_from(suffixes))
    if suffix == ".parquet":  # Parquet lists of float32 or float64
        dtypes = [d for d in dtypes if d in ("float32", "float64")]
    dtype = draw(st.sampled_from(sorted(dtypes)))
    n, d = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    same = draw(st.integers(1, 4))
    lengths = [same] * n if suffix == ".npy" else [draw(st.integers(1, 4)) for _ in range(n)]
    if bad == "empty":
        empty = draw(st.integers(0, n - 1))
        lengths = [0 if suffix == ".npy" or i == empty else t for i, t in enumerate(lengths)]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    prompts = [(rng.standard_normal((t, d)) * 10).astype(dtype) for t in lengths]
    if bad == "nan":
        where = draw(st.integers(0, sum(lengths) * d - 1))
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        for x in prompts:
            if where < x.size:
                x.flat[where] = value
                break
            where -= x.size
    # a prompt with no position has no rows in the one-row-per-position layout: only the other one shows it
    layouts = ["prompt"] if bad == "empty" else ["prompt", "position"]
    layout = draw(st.sampled_from(layouts)) if suffix == ".parquet" else ""
    return Dump(suffix, prompts, layout)


def write_dump(dump: Dump, path: Path) -> None:
    if dump.suffix == ".npy":
        np.save(path, np.stack(dump.prompts) if len(dump.prompts) > 1 else dump.prompts[0])
    elif dump.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({f"p{i}": x for i, x in enumerate(dump.prompts)}, str(path))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        value = pa.from_numpy_dtype(dump.prompts[0].dtype)
        if dump.layout == "prompt":
            table = pa.table({"states": pa.array([x.tolist() for x in dump.prompts],
                                                 pa.list_(pa.list_(value)))})
        else:
            rows = [(i, p, x[p].tolist()) for i, x in enumerate(dump.prompts) for p in range(len(x))]
            table = pa.table({"prompt_id": pa.array([r[0] for r in rows], pa.int64()),
                              "position": pa.array([r[1] for r in rows], pa.int32()),
                              "state": pa.array([r[2] for r in rows], pa.list_(value))})
        pq.write_table(table, path)


DUMP_SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def invert_dump(collide, folder: Path, dump: Dump) -> tuple:
    """(status or "model loaded", stderr, path): `collide invert DUMP model=tiny-random layer=1`, no model allowed."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    path = folder / f"dump{dump.suffix}"
    write_dump(dump, path)
    before = snapshot(folder)
    try:
        status, stderr = collide(["invert", str(path), "model=tiny-random", "layer=1", "policy=random",
                                  f"out={folder / 'out'}"])
    except ModelLoaded:
        status, stderr = "model loaded", ""
    assert snapshot(folder) == before  # nothing written (nor the out folder made) before the model
    return status, stderr, path


@DUMP_SETTINGS
@given(dump=dumps())
def test_well_formed_dumps_are_read_exactly(dump, collide, workspace):
    from collide.invert.sources import open_source

    status, stderr, path = invert_dump(collide, workspace.parent / "dump-ok", dump)
    assert status == "model loaded", stderr  # accepted: the next step is the model
    source = open_source(str(path), 1)
    assert source.n_prompts == len(dump.prompts) and source.d == dump.prompts[0].shape[1]
    read = [t.states for t in source.targets()]
    assert len(read) == len(dump.prompts)
    for got, wrote in zip(read, dump.prompts):
        assert got.dtype == np.float32 and np.array_equal(got, wrote.astype(np.float32))


@DUMP_SETTINGS
@given(dump=dumps(bad="nan"))
def test_dumps_with_nan_or_inf_are_refused_before_the_model(dump, collide, workspace):
    status, stderr, path = invert_dump(collide, workspace.parent / "dump-nan", dump)
    assert_refused(status, stderr, path.name)


@DUMP_SETTINGS
@given(dump=dumps(dtypes=("int32", "int64"), suffixes=(".npy", ".safetensors")))  # Parquet lists are read as floats
def test_dumps_of_integers_are_refused_before_the_model(dump, collide, workspace):
    status, stderr, path = invert_dump(collide, workspace.parent / "dump-int", dump)
    assert_refused(status, stderr, path.name)


@DUMP_SETTINGS
@given(dump=dumps(bad="empty"))
@example(dump=Dump(".parquet", [np.zeros((0, 3), np.float32), np.ones((2, 3), np.float32)], "prompt"))
def test_dumps_with_an_empty_prompt_are_refused_before_the_model(dump, collide, workspace):
    status, stderr, path = invert_dump(collide, workspace.parent / "dump-empty", dump)
    assert_refused(status, stderr, path.name)
