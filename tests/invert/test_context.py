"""Tokens within ε of the same state: never reported unique when wrong, decided by the positions after them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from collide.config import ModelConfig, QuantConfig
from collide.invert.config import InvertConfig
from collide.invert import rankers
from collide.invert.output import position_record
from collide.invert.sipit import Inverter
from collide.models import all_token_states, load_model

BOS = 256


def states_of(lm, seqs: list[list[int]], layer: int) -> torch.Tensor:
    """(n, T, d) fp64 states at ``layer`` of equal-length sequences, one batched unpadded forward."""
    ids = torch.tensor(seqs)
    return all_token_states(lm, ids, torch.ones_like(ids), [layer])[layer].double()


class WrongFirst(Inverter):
    """Verifies ``first`` alone, then every other token: the order a poor ranker could give."""

    first: int = -1

    def _batches(self, prefix, tried, target, eps, rng, best):
        rest = [t for t in range(self.vocab) if t != self.first and not bool(tried[t])]
        return rankers.batches(iter([self.first] + rest), 1, 64)


def test_a_wrong_token_ranked_first_is_never_reported_unique():
    """'z' is 'a' moved 5% of the way to 'q': its states lie within ε of 'a''s. Verified first and alone, it is within ε but
    outside the noise radius, so the search goes on, meets 'a' at round-off distance and keeps 'z' as a tie."""
    lm = load_model(ModelConfig(name="tiny", source="random:llama", family="llama"))
    a, z = ord("a"), ord("z")
    rows = lm.model.get_input_embeddings().weight.data
    rows[z] = rows[a] + 0.05 * (rows[ord("q")] - rows[a])
    ids = [BOS] + list(b"bad")
    layer = 2
    target = states_of(lm, [ids], layer)[0]
    gap = float((states_of(lm, [ids[:2] + [z]], layer)[0, 2] - target[2]).norm())
    eps = 3 * gap  # 'z' within ε at position 2, far outside the noise radius (1e-4 of the norm)
    assert gap > 10 * 1e-4 * float(target[2].norm())
    inverter = WrongFirst(lm, layer, InvertConfig(source="-", policy="random", epsilon=eps), bos=BOS)
    inverter.first = z
    results = inverter.invert(target.float().numpy())
    assert [r.token for r in results] == ids and all(r.recovered for r in results)
    at = results[2]
    assert [alt.token for alt in at.alternatives] == [z] and at.alternatives[0].distance == pytest.approx(gap, rel=1e-3)
    assert at.tried > 1 and at.distance < 1e-3 * gap  # verified on after 'z': 'a' is at round-off
    assert not at.unique and at.ties == [z]  # the later positions do not exclude it at this ε
    record = position_record(at, lm.tokenizer, a)
    assert record["others_within_epsilon"] == 1 and record["unique"] is False and record["exact"]
    assert record["alternatives"][0]["token"] == z and record["alternatives"][0]["status"] in ("consistent", "open")
    # the wrong token is never the unique answer anywhere
    assert not any(r.unique and r.token != t for r, t in zip(results, ids))


@pytest.fixture(scope="module")
def int4():
    return load_model(ModelConfig(name="tiny", source="random:llama", family="llama",
                                  quant=QuantConfig(activations="int4")))


def close_pair(lm, layer: int, tail: list[int]):
    """(a, z, ε, true states): two tokens at position 1 whose states are close, such that with z there instead of a
    position 2 has no token within ε = 0.53 x their distance (searched among the 40 closest pairs)."""
    every = states_of(lm, [[BOS, t] + tail for t in range(256)], layer)
    first = every[:, 1]
    dist = torch.cdist(first, first).fill_diagonal_(float("inf"))
    for flat in torch.argsort(dist.flatten())[:80:2].tolist():
        a, z = divmod(flat, 256)
        eps = 0.53 * float(dist[a, z])
        after_z = states_of(lm, [[BOS, z, y] for y in range(320)], layer)[:, 2]
        if float((after_z - every[a, 2]).norm(dim=1).min()) > 1.05 * eps:
            return a, z, eps, every[a]
    raise AssertionError("no close pair found")


def test_quantized_tie_is_resolved_by_a_later_position(int4):
    """int4 activations, a state at position 1 between two tokens' states (a rounding flip can put it there): both
    are within ε. The nearer (wrong) one makes position 2 miss: backtracking takes the other, the wrong one is
    excluded by position 2. When the true one is nearer, the check after the prompt excludes the other."""
    layer, tail = 2, [ord("e"), ord("s")]
    a, z, eps, true = close_pair(int4, layer, tail)
    ids = [BOS, a] + tail
    cfg = InvertConfig(source="-", policy="random", batch=320, epsilon=eps, prove_ties=True)
    for share, via in ((0.52, "backtrack"), (0.48, "check")):  # where the state at position 1 lies, a -> z
        results = Inverter(int4, layer, cfg, bos=BOS).invert(toward(int4, true, z, tail, layer, share))
        assert [r.token for r in results] == ids and all(r.recovered for r in results), via
        alt = {x.token: x for x in results[1].alternatives}
        assert alt[z].status == "excluded" and alt[z].at == 2, via
        assert z not in results[1].ties
    unproven = Inverter(int4, layer, replace(cfg, prove_ties=False), bos=BOS).invert(
        toward(int4, true, z, tail, layer, 0.48))  # the check notes where z stops fitting, and sweeps nothing
    assert [r.token for r in unproven] == ids and z in unproven[1].ties and not unproven[1].unique
    assert {x.token: x for x in unproven[1].alternatives}[z].at == 2
    no_branch = InvertConfig(source="-", policy="random", batch=320, epsilon=eps, backtrack=0)
    stuck = Inverter(int4, layer, no_branch, bos=BOS).invert(toward(int4, true, z, tail, layer, 0.52))
    assert stuck[1].token == z and not stuck[2].recovered  # no branch to explore: the miss stands, reported
    assert stuck[1].alternatives[0].token == a and stuck[1].alternatives[0].status == "open"


def toward(lm, true: torch.Tensor, z: int, tail: list[int], layer: int, share: float) -> np.ndarray:
    """The true states with position 1 moved ``share`` of the way to token z's state there."""
    target = true.clone()
    target[1] = true[1] + share * (states_of(lm, [[BOS, z] + tail], layer)[0, 1] - true[1])
    return target.float().numpy()
