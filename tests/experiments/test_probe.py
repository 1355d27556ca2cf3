"""collide.experiments.probe: future-token probes on planted data, the baselines, the split and the bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from collide.cli import main as cli_main
from collide.config import ProbeConfig
from collide.errors import CollideError
from collide.experiments.probe import Rows, baselines, probe_states, split_prompts

V, D = 40, 24  # synthetic vocabulary and state width


def main(argv: list[str]) -> int:
    """``collide probe ARGV``: the command line the user types."""
    return cli_main(["probe", *argv])


def planted(n_prompts: int = 240, seed: int = 0):
    """Prompts of iid uniform tokens; layer 0 holds a noisy embedding of the token at t, layer 1 of
    the token at t+2 (a zero row where there is none), layer 2 pure noise."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((V, D)).astype(np.float32)
    tokens = [rng.integers(0, V, rng.integers(6, 16)) for _ in range(n_prompts)]
    noise = {k: [0.2 * rng.standard_normal((len(t), D)).astype(np.float32) for t in tokens] for k in (0, 1, 2)}

    def states(k: int):
        for i, t in enumerate(tokens):
            if k == 0:
                base = emb[t]
            elif k == 1:
                base = np.concatenate([emb[t[2:]], np.zeros((2, D), np.float32)])
            else:
                base = np.zeros((len(t), D), np.float32)
            yield i, base + noise[k][i]

    return tokens, states


def by_key(result: dict) -> dict:
    return {(e["layer"], e["tau"]): e for e in result["results"]}


def test_probe_reads_the_planted_token_and_nothing_else():
    tokens, states = planted()
    result = probe_states(tokens, np.arange(len(tokens)), states, [0, 1, 2], D,
                          ProbeConfig(source="-", taus=[0, 1, 2], vocab=V))
    got = by_key(result)
    coverage = {b["tau"]: b["coverage"] for b in result["baselines"]}
    assert all(c == 1.0 for c in coverage.values())  # K = V: every test target is a class
    assert got[0, 0]["top1"] > 0.97 and got[1, 2]["top1"] > 0.97  # the planted (layer, tau) pairs
    # elsewhere the targets are independent of the state: near chance (1/40 top-1, 5/40 top-5)
    for key in [(0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]:
        assert got[key]["top1"] < 0.08 and got[key]["top5"] < 0.25, (key, got[key])
    assert result["split"] == {"fit": 168, "validation": 24, "test": 48, "seed": 0}
    assert got[1, 2]["n_test_rows"] == result["baselines"][2]["n_test_rows"]


def test_small_vocab_other_is_never_a_hit():
    """With K = 10 classes the probe can only be right on targets among the 10 (the coverage)."""
    tokens, states = planted()
    result = probe_states(tokens, np.arange(len(tokens)), states, [0], D, ProbeConfig(source="-", taus=[0], vocab=10))
    coverage = result["baselines"][0]["coverage"]
    assert 0.15 < coverage < 0.4
    assert result["results"][0]["top1"] <= coverage + 1e-12
    assert result["results"][0]["top1"] > coverage - 0.03  # and right on nearly all of those


def test_bigram_baseline_on_a_deterministic_cycle():
    """Token t+1 = token t + 1 mod 7: the bigram knows the token tau ahead, the most frequent token does not."""
    tokens = [(np.arange(12) + start) % 7 for start in range(70)]
    part = split_prompts(len(tokens), 0.2, 0.1, seed=1)
    for tau in (1, 3):
        b = baselines(Rows(tokens, part, tau))
        assert b["bigram"] == {"top1": 1.0, "top5": 1.0}
        assert 0.05 < b["most_frequent"]["top1"] < 0.3 and b["most_frequent"]["top5"] < 0.9


def test_rows_pair_each_position_with_the_token_tau_ahead():
    tokens = [np.array([5, 6, 7, 8]), np.array([1, 2]), np.array([9, 9, 3])]
    rows = Rows(tokens, np.array([0, 1, 2]), tau=2)
    assert rows.index.tolist() == [0, 1, 6]  # the 2-token prompt has no row
    assert rows.current.tolist() == [5, 6, 9] and rows.target.tolist() == [7, 8, 3]
    assert rows.part.tolist() == [0, 0, 2]


def test_split_is_seeded_and_prompt_level():
    a, b = split_prompts(100, 0.2, 0.1, seed=3), split_prompts(100, 0.2, 0.1, seed=3)
    assert np.array_equal(a, b) and np.bincount(a).tolist() == [70, 10, 20]
    assert not np.array_equal(a, split_prompts(100, 0.2, 0.1, seed=4))


def test_too_few_prompts_name_the_fix():
    with pytest.raises(CollideError, match=r"4 prompts are too few .* extract at least \d+ prompts"):
        split_prompts(4, 0.2, 0.1, seed=0)


def test_tau_longer_than_the_prompts_names_the_fix():
    tokens, states = planted()
    with pytest.raises(CollideError, match=r"tau=15 is longer than every .* keep taus below 15"):
        probe_states(tokens, np.arange(len(tokens)), states, [0], D, ProbeConfig(source="-", taus=[1, 15]))


def write_store(path, tokens, states, layers, positions="all"):
    """A complete store of ``tokens`` in two shards; ``states(k)`` yields (prompt_id, (n_tokens, D))."""
    from collide.store import StoreWriter, prompt_table

    header = dict(model={"name": "planted"}, dtype="fp32", positions=positions, final_norm="post",
                  layer_convention="t", layers=layers, d=D, keep_text=False, n_prompts=len(tokens), n_layers=2,
                  shard_rows=128, batch_tokens=64, max_batch_size=8)
    every = {k: [s for _, s in states(k)] for k in layers}
    writer = StoreWriter.open(path, {"planted": 1}, header)
    for first in range(0, len(tokens), 128):
        rows = range(first, min(first + 128, len(tokens)))
        last = {k: np.stack([every[k][i][-1] for i in rows]) for k in layers}
        full = {k: np.concatenate([every[k][i] for i in rows]) for k in layers} if positions == "all" else None
        writer.commit_shard(prompt_table(first, [tokens[i].tolist() for i in rows], ["s"] * len(rows)), last,
                            positions=full)
    writer.finish()


def test_run_on_a_store_writes_json_markdown_and_figure(tmp_path):
    tokens, states = planted()
    write_store(tmp_path / "stores" / "s", tokens, states, [0, 1])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "store.json").write_text(json.dumps({"path": str(tmp_path / "stores" / "s")}))
    assert main([str(run_dir), "taus=[0,2]", f"vocab={V}", "layers=1:1"]) == 0
    result = json.loads((run_dir / "probe.json").read_text())  # out defaults to the run directory
    assert result["layers"] == [1] and result["taus"] == [0, 2] and result["model"] == "planted"
    direct = probe_states(tokens, np.arange(len(tokens)), states, [1], D,
                          ProbeConfig(source="-", taus=[0, 2], vocab=V))
    assert result["results"] == direct["results"]  # the store hands the probe exactly the planted states
    assert by_key(result)[1, 2]["top1"] > 0.97
    assert "| 1 | " in (run_dir / "probe.md").read_text()
    assert (run_dir / "figures" / "probe_accuracy.png").stat().st_size > 10_000


def test_store_without_every_position_names_the_fix(tmp_path, capsys):
    tokens, states = planted(n_prompts=20)
    write_store(tmp_path / "store", tokens, states, [0], positions="last")
    assert main([str(tmp_path)]) == 2  # a run directory holding store/
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "keeps only each prompt's last-token state" in err
    assert "store.positions=all" in err


def test_bad_override_is_one_line(capsys):
    assert main(["somewhere", "vocab=many"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("collide: error:") and "vocab" in err and err.count("\n") == 0
