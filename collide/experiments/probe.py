"""``collide probe RUN``: what the state at position t says about the token at t+tau.

For each stored layer and each lookahead tau, a linear probe reads the state at position t of a
prompt and predicts the token at t+tau of the same prompt (arXiv 2404.00859 asks why it can).
Positions are those of the prompt's ``token_ids`` (BOS included where the tokenizer adds one);
every t with t+tau inside the prompt is a row. tau=0 reads the token at t itself (a sanity check).

Method (closed form, no iterations):

- **Split by prompt**, seeded: ``test_fraction`` of the prompts are scored, ``val_fraction`` choose
  the ridge strength, the rest are fitted; the final probe is refitted on fit + validation
  prompts ("training"), and every baseline is counted on those same training prompts.
- **Vocabulary:** the K = ``vocab`` most frequent targets of the training rows are classes, plus
  one "other" class for every other token, so rare targets still shape the fit. A prediction is
  a ranking of the K real tokens only: "other" is never predicted (it could never be correct),
  and a test target outside the K is a miss. ``coverage`` (share of test targets among the K) is
  the ceiling of the probe's accuracy.
- **Probe:** ridge regression from the standardised state (mean and std per dimension over the
  training positions of the layer) to the one-hot target, with an intercept; the strength is
  ``alpha`` x the mean eigenvalue of the centred Gram matrix, alpha chosen among ``alphas`` by
  validation top-1. One eigendecomposition serves every alpha.
- **Baselines**, over the full vocabulary: the most frequent training target (top-5: the five
  most frequent), and a bigram from the token at t (the most frequent training target after
  that token at distance tau, backed off to the frequency ranking for unseen or rare tokens).

Outputs (``out``, default the store's parent: the run directory): ``probe.json``, ``probe.md``
and ``figures/probe_accuracy.png``. Accuracies are fractions of test rows in [0, 1].
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from collide.config import ProbeConfig
from collide.errors import CollideError

log = logging.getLogger(__name__)

SCHEMA = "collide-probe/1"
TOP = 5  # the wider of the two accuracies reported (top-1 and top-5)

# (prompt_id, states) of one layer in prompt_id order, row p = the state at position p
LayerStates = Callable[[int], Iterable[tuple[int, np.ndarray]]]


# --------------------------------------------------------------------------- split and rows


def split_prompts(n: int, test_fraction: float, val_fraction: float, seed: int) -> np.ndarray:
    """Part of each of n prompts (index order): 0 = fit, 1 = validation, 2 = test; seeded permutation.

    CollideError when a part would be empty, naming the smallest number of prompts that splits.
    """
    if not (0 < test_fraction < 1 and 0 < val_fraction < 1 and test_fraction + val_fraction < 1):
        raise CollideError(f"test_fraction={test_fraction}, val_fraction={val_fraction}: each must be in (0, 1) "
                           "and their sum below 1, e.g. test_fraction=0.2 val_fraction=0.1")

    def sizes(m: int) -> tuple[int, int, int]:
        n_test, n_val = round(m * test_fraction), round(m * val_fraction)
        return m - n_test - n_val, n_val, n_test

    if min(sizes(n)) < 1:
        need = next(m for m in range(3, 10_000) if min(sizes(m)) >= 1)
        raise CollideError(f"{n} prompts are too few to split into fit, validation and test prompts (test_fraction="
                           f"{test_fraction}, val_fraction={val_fraction}); extract at least {need} prompts "
                           f"(n_prompts={max(need, 100)} or more) or raise the fractions")
    _, n_val, n_test = sizes(n)
    part = np.zeros(n, np.int8)
    order = np.random.default_rng(seed).permutation(n)
    part[order[:n_test]] = 2
    part[order[n_test:n_test + n_val]] = 1
    return part


class Rows:
    """The probe rows of one tau: row r reads the state at ``index[r]`` of a layer's stacked matrix.

    ``current`` is the token at t, ``target`` the token at t+tau, ``part`` the prompt's split part.
    """

    def __init__(self, tokens: list[np.ndarray], part: np.ndarray, tau: int):
        lengths = np.array([len(t) for t in tokens], np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        keep = lengths > tau
        self.index = np.concatenate([s + np.arange(n - tau) for s, n in zip(starts[keep], lengths[keep])]
                                    or [np.empty(0, np.int64)])
        flat = np.concatenate(tokens).astype(np.int64)
        self.current = flat[self.index]
        self.target = flat[self.index + tau]
        self.part = np.repeat(part[keep], lengths[keep] - tau)


def check_taus(taus: list[int], tokens: list[np.ndarray], part: np.ndarray) -> None:
    """CollideError unless every tau leaves rows in the fit, validation and test prompts."""
    if not taus or min(taus) < 0:
        raise CollideError(f"taus={taus}: give lookaheads >= 0, e.g. taus=[1,2,3,4]")
    lengths = np.array([len(t) for t in tokens])
    for name, p in (("fit", 0), ("validation", 1), ("test", 2)):
        longest = int(lengths[part == p].max())
        if max(taus) >= longest:
            raise CollideError(f"tau={max(taus)} is longer than every {name} prompt (the longest has {longest} tokens, "
                               f"BOS included): keep taus below {longest}, or extract longer prompts "
                               f"(e.g. corpus.min_tokens=48 corpus.max_tokens=64)")


# --------------------------------------------------------------------------- baselines


def topk_hits(ranked: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """(top-1, top-5 accuracy) of rankings ``ranked`` (n, m), best first (m >= 1; -1 = no guess), against
    ``target`` (n,)."""
    if len(target) == 0:
        return float("nan"), float("nan")
    hit = ranked[:, :TOP] == target[:, None]
    return float(hit[:, 0].mean()), float(hit.any(axis=1).mean())


def baselines(rows: Rows) -> dict:
    """Most-frequent-token and bigram (token at t -> token at t+tau) baselines on the test rows.

    Both are counted on the training rows (fit + validation prompts) over the full vocabulary;
    ties rank the smaller token id first. The bigram fills the slots its context lacks (an unseen
    token at t, or fewer than TOP distinct followers) with the most frequent tokens overall.
    """
    train, test = rows.part < 2, rows.part == 2
    values, counts = np.unique(rows.target[train], return_counts=True)
    unigram = values[np.lexsort((values, -counts))][:TOP]
    pairs, pair_counts = np.unique(np.stack([rows.current[train], rows.target[train]]), axis=1, return_counts=True)
    order = np.lexsort((pairs[1], -pair_counts, pairs[0]))  # by context, then count desc, then id
    contexts, followers = pairs[0][order], pairs[1][order]
    table: dict[int, list[int]] = {}
    for context, follower in zip(contexts.tolist(), followers.tolist()):
        ranked = table.setdefault(context, [])
        if len(ranked) < TOP:
            ranked.append(follower)
    fallback = unigram.tolist()

    def ranking(context: int) -> list[int]:
        ranked = table.get(context, [])
        ranked = (ranked + [t for t in fallback if t not in ranked])[:TOP]
        return ranked + [-1] * (TOP - len(ranked))  # fewer than TOP distinct training targets

    target = rows.target[test]
    uni = np.broadcast_to(unigram, (len(target), len(unigram)))
    bi = np.array([ranking(c) for c in rows.current[test].tolist()], np.int64).reshape(-1, TOP)
    (u1, u5), (b1, b5) = topk_hits(uni, target), topk_hits(bi, target)
    return {"most_frequent": {"top1": u1, "top5": u5}, "bigram": {"top1": b1, "top5": b5}}


# --------------------------------------------------------------------------- ridge probe


def class_targets(target: np.ndarray, train: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(vocabulary: the k most frequent training targets, class of each row: its vocabulary index or k = other)."""
    values, counts = np.unique(target[train], return_counts=True)
    vocab = values[np.lexsort((values, -counts))][:k]
    order = np.argsort(vocab)
    at = np.minimum(np.searchsorted(vocab, target, sorter=order), len(vocab) - 1)
    found = vocab[order[at]] == target
    return vocab, np.where(found, order[at], len(vocab))


def _moments(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple:
    """Uncentred sums of rows x (n, d) with classes y (n,): (n, sum x, sum x x^T, per-class sums of x, class counts)."""
    xy = torch.zeros(n_classes, x.shape[1]).index_add_(0, y, x)  # fp32 sums of standardised rows
    return (len(y), x.double().sum(0), (x.T @ x).double(), xy.double(), torch.bincount(y, minlength=n_classes).double())


def _add(a: tuple, b: tuple) -> tuple:
    return tuple(u + v for u, v in zip(a, b))


class Ridge:
    """Ridge regression to one-hot classes with an intercept, solved for many strengths at once.

    From the uncentred moments of the training rows: centred Gram A = V diag(s) V^T, and for a
    strength lam the weights W = V diag(1 / (s + lam)) V^T Xc^T Y, intercept b = mean(Y) - mean(x) W.
    """

    def __init__(self, moments: tuple):
        n, sx, gram, xy, counts = moments
        self.mean_x, self.mean_y = sx / n, counts / n
        a = gram - torch.outer(sx, sx) / n
        self.s, self.v = torch.linalg.eigh(a)
        self.s = self.s.clamp(min=0)
        self.vtb = self.v.T @ (xy.T - torch.outer(sx, counts) / n)  # V^T Xc^T Y, (d, classes)
        self.scale = float(self.s.mean())  # lam = alpha x the mean eigenvalue

    def weights(self, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.v @ (self.vtb / (self.s + alpha * self.scale)[:, None])
        return w.float(), (self.mean_y - self.mean_x @ w).float()


def ranked_classes(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, k: int) -> np.ndarray:
    """The TOP best of the k real classes per row (scores x w + b; the "other" column is never ranked)."""
    scores = x @ w[:, :k] + b[:k]
    return scores.topk(min(TOP, k), dim=1).indices.numpy()


def probe_layer(x: torch.Tensor, rows: Rows, vocab: np.ndarray, classes: np.ndarray, alphas: list[float]) -> dict:
    """One probe (layer, tau): x (N, d) standardised states of every position, stacked prompt by prompt;
    ``vocab`` and ``classes`` from ``class_targets`` on ``rows``."""
    train = rows.part < 2
    n_real = len(vocab)
    y = torch.from_numpy(classes)
    xs = {p: x[torch.from_numpy(rows.index[rows.part == p])] for p in (0, 1, 2)}
    ys = {p: y[torch.from_numpy(rows.part == p)] for p in (0, 1, 2)}
    fit_moments = _moments(xs[0], ys[0], n_real + 1)
    ridge = Ridge(fit_moments)
    val_scores = []
    for alpha in alphas:  # validation top-1; a row of class "other" is a miss whatever is predicted
        ranked = ranked_classes(xs[1], *ridge.weights(alpha), n_real)
        val_scores.append(float((ranked[:, 0] == ys[1].numpy()).mean()))
    best = max(range(len(alphas)), key=lambda i: (val_scores[i], alphas[i]))  # ties: the stronger ridge
    final = Ridge(_add(fit_moments, _moments(xs[1], ys[1], n_real + 1)))
    ranked = ranked_classes(xs[2], *final.weights(alphas[best]), n_real)
    top1, top5 = topk_hits(vocab[ranked], rows.target[rows.part == 2])
    return {"top1": top1, "top5": top5, "alpha": alphas[best], "val_top1": val_scores[best],
            "n_train_rows": int(train.sum()), "n_test_rows": int((rows.part == 2).sum())}


def standardised(states: Iterable[tuple[int, np.ndarray]], ids: np.ndarray, lengths: np.ndarray,
                 train_rows: np.ndarray, d: int) -> torch.Tensor:
    """One layer's states stacked prompt by prompt (N, d), standardised with the training positions' mean and std."""
    x = np.empty((int(lengths.sum()), d), np.float32)
    row, expected = 0, iter(zip(ids.tolist(), lengths.tolist()))
    for prompt_id, matrix in states:
        want_id, n = next(expected, (None, None))
        if prompt_id != want_id or np.shape(matrix) != (n, d):
            raise CollideError(f"states of prompt {prompt_id} have shape {np.shape(matrix)}, expected prompt {want_id} "
                               f"with ({n}, {d}); the store is inconsistent: run `collide verify` on it")
        x[row:row + n] = matrix
        row += n
    if row != len(x):
        raise CollideError(f"the store yielded states for {row} of {len(x)} positions; run `collide verify` on it")
    t = torch.from_numpy(x)
    fit = t[torch.from_numpy(train_rows)].double()
    mean, std = fit.mean(0), fit.std(0)
    std[std == 0] = 1.0
    return t.sub_(mean.float()).div_(std.float())


def probe_states(tokens: list[np.ndarray], ids: np.ndarray, layer_states: LayerStates, layers: list[int],
                 d: int, cfg: ProbeConfig) -> dict:
    """Probe results for every layer and tau: ``tokens[i]`` are the token ids of prompt ``ids[i]``,
    ``layer_states(k)`` yields (prompt_id, (n_tokens, d) float32 states) of layer k in ids order."""
    if cfg.vocab < 1:
        raise CollideError(f"vocab={cfg.vocab}: give the number of target classes, e.g. vocab=1024")
    if not cfg.alphas or min(cfg.alphas) <= 0:
        raise CollideError(f"alphas={cfg.alphas}: give positive ridge strengths, e.g. alphas=[1e-3,1e-2,1e-1]")
    part = split_prompts(len(tokens), cfg.test_fraction, cfg.val_fraction, cfg.seed)
    taus = sorted(set(cfg.taus))
    check_taus(taus, tokens, part)
    lengths = np.array([len(t) for t in tokens], np.int64)
    rows = {tau: Rows(tokens, part, tau) for tau in taus}
    per_tau, classes = {}, {tau: class_targets(r.target, r.part < 2, cfg.vocab) for tau, r in rows.items()}
    for tau, r in rows.items():
        vocab = classes[tau][0]
        test = r.target[r.part == 2]
        per_tau[tau] = {"tau": tau, "n_train_rows": int((r.part < 2).sum()), "n_test_rows": int(len(test)),
                        "coverage": float(np.isin(test, vocab).mean()), **baselines(r)}
    train_positions = np.repeat(part < 2, lengths)
    results = []
    for k in layers:
        t0 = time.perf_counter()
        x = standardised(layer_states(k), ids, lengths, train_positions, d)
        for tau in taus:
            results.append({"layer": k, "tau": tau, **probe_layer(x, rows[tau], *classes[tau], list(cfg.alphas))})
        log.info("layer %d: top-1 %s (%.1f s)", k, ", ".join(f"tau={e['tau']} {e['top1']:.3f}"
                                                             for e in results[-len(taus):]), time.perf_counter() - t0)
    return {"split": {"fit": int((part == 0).sum()), "validation": int((part == 1).sum()),
                      "test": int((part == 2).sum()), "seed": cfg.seed},
            "vocab": cfg.vocab, "taus": taus, "layers": list(layers), "baselines": [per_tau[t] for t in taus],
            "results": results}


# --------------------------------------------------------------------------- outputs


def markdown(result: dict) -> str:
    """probe.md: what was probed, the baselines, and top-1 / top-5 per layer (rows) and tau (columns)."""
    s, taus = result["split"], result["taus"]
    lines = [f"# Future-token probes: {result['model']}, {result['n_prompts']:,} prompts", "",
             f"Store `{result['store']}`. A linear probe (ridge to one-hot, strength chosen on validation prompts) "
             f"reads the state at position t and predicts the token at t+tau. Prompts split {s['fit']} fit / "
             f"{s['validation']} validation / {s['test']} test (seed {s['seed']}); accuracies are on the test "
             f"prompts. Classes: the {result['vocab']} most frequent training targets plus \"other\", which is "
             "never predicted; coverage is the share of test targets among those classes (the probe's ceiling).",
             "", "| tau | test rows | coverage | most frequent top-1 / top-5 | bigram top-1 / top-5 |",
             "|---|---|---|---|---|"]
    for b in result["baselines"]:
        lines.append(f"| {b['tau']} | {b['n_test_rows']:,} | {b['coverage']:.3f} | "
                     f"{b['most_frequent']['top1']:.3f} / {b['most_frequent']['top5']:.3f} | "
                     f"{b['bigram']['top1']:.3f} / {b['bigram']['top5']:.3f} |")
    by = {(e["layer"], e["tau"]): e for e in result["results"]}
    lines += ["", "Probe accuracy, top-1 / top-5 (rows: layers, 0 = embeddings; columns: tau):", "",
              "| layer | " + " | ".join(f"tau={t}" for t in taus) + " |", "|---" * (len(taus) + 1) + "|"]
    for k in result["layers"]:
        cells = [f"{by[k, t]['top1']:.3f} / {by[k, t]['top5']:.3f}" for t in taus]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", f"{result['seconds']:.1f} s wall for {len(result['layers'])} layers x {len(taus)} taus."]
    return "\n".join(lines) + "\n"


def probe_source(cfg: ProbeConfig, command: str | None = None) -> dict:
    """Probe the store of ``cfg.source`` and write probe.json, probe.md and the figure; returns probe.json's dict.

    ``command``: the command line that asked for it, recorded in probe.json."""
    from collide.atomic import write_outputs
    from collide.layers import select_layers
    from collide.report.figures import probe_figure
    from collide.store import open_run_store

    t0 = time.perf_counter()
    store = open_run_store(cfg.source, every_position=True)
    store_dir = store.path
    default_out = store_dir.parent if Path(cfg.source).resolve() == store_dir.resolve() else Path(cfg.source)
    layers = select_layers(cfg.layers, store.layers)
    table = store.prompts(["prompt_id", "token_ids"])
    ids = table.column("prompt_id").to_numpy()
    tokens = [np.asarray(t, np.int64) for t in table.column("token_ids").to_pylist()]
    result = {"schema": SCHEMA, "command": command, "source": str(cfg.source), "store": str(store_dir),
              "model": store.manifest.get("model", {}).get("name", "?"), "n_prompts": len(tokens),
              "config": json.loads(json.dumps(asdict(cfg), default=str))}
    result.update(probe_states(tokens, ids, store.position_states, layers, store.d, cfg))
    result["seconds"] = time.perf_counter() - t0
    out = Path(cfg.out) if cfg.out else default_out
    figures = {"figures/probe_accuracy.png": lambda path: probe_figure(result, path)} if cfg.figures else {}
    written = write_outputs(out, "probe", result, markdown(result), figures)
    log.info("wrote %s (%.1f s)", written, result["seconds"])
    return result
