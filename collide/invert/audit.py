"""``collide audit SOURCE``: which layers of an activation cache give back its text, how much of it, and how fast.

``audit_source(cfg)`` (``collide.invert.config.AuditConfig``) samples ``n_prompts`` prompts of SOURCE (seeded,
the same sample at every layer), inverts them at each selected layer with ``collide invert``'s machinery
(``collide.invert.driver``: one model load, the lens of each layer read or fit on first use) and summarises
each layer: prompts given back verbatim, positions recovered, unique and tied, misses, seconds per prompt.

* SOURCE: a store made with ``store.positions=all`` (or a run directory using one), whose layers are
  chosen with ``layers`` (auto: about five spread over the stored ones, layer 0 left out when others are
  stored); or a ``.npy`` / ``.safetensors`` / ``.parquet`` dump of one layer, whose layer and norm
  convention are found from its first rows (``collide.invert.locate``) unless ``invert``-style keys say.
* Outputs in ``out`` (default ``<SOURCE>-audit`` beside SOURCE): ``L<k>/inversion.json`` and ``.md`` per
  layer (``collide invert``'s, rewritten after each prompt), and ``audit.json``, ``audit.md`` and
  ``figures/audit.png`` (``collide.atomic.write_outputs``), rewritten after each layer.
* ``budget_s``: no prompt starts once the audit has run that long; a layer left short is reported as
  unfinished (with what it did) and a layer never started as not started, never dropped.
* Running the same command again resumes: each layer's inversion goes on after its last finished prompt.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np

from collide.invert.config import InvertConfig
from collide.errors import CollideError
from collide.invert import audit_report, output
from collide.invert.config import AuditConfig
from collide.invert.driver import check_out, first_token, invert_prompts, load, place, plan
from collide.invert.sources import open_source

log = logging.getLogger(__name__)

AUTO_LAYERS = 5  # layers=auto picks about this many


def choose_layers(spec, stored: list[int]) -> list[int]:
    """``layers=``: auto = AUTO_LAYERS layers evenly spread over the stored ones (layer 0, the embeddings, left
    out when deeper layers are stored), the deepest included; otherwise ``collide.layers.select_layers``."""
    from collide.layers import select_layers

    if str(spec) != "auto":
        return select_layers(spec, stored)
    contextual = [k for k in sorted(stored) if k > 0] or sorted(stored)
    picks = np.unique(np.linspace(0, len(contextual) - 1, min(AUTO_LAYERS, len(contextual))).round().astype(int))
    return [contextual[i] for i in picks]


def sample(n_total: int, n: int, seed: int) -> list[int]:
    """``n`` prompt indices of ``n_total`` drawn without replacement (seeded), in SOURCE order."""
    if n < 1:
        raise CollideError(f"n_prompts={n} audits nothing; pass n_prompts=N with N >= 1")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n_total, size=min(n, n_total), replace=False).tolist())


def invert_config(cfg: AuditConfig, layer: Optional[int]) -> InvertConfig:
    """The ``collide invert`` settings of one audited layer."""
    return InvertConfig(source=cfg.source, model=cfg.model, layer=layer, policy=cfg.policy, epsilon=cfg.epsilon,
                        confirm=cfg.confirm, backtrack=cfg.backtrack, prove_ties=cfg.prove_ties, bos=cfg.bos,
                        progress=cfg.progress, lens=cfg.lens)


def default_out(source: str) -> Path:
    path = Path(source).expanduser().resolve()
    return path.parent / f"{path.name if path.is_dir() else path.stem}-audit"


def layer_entry(layer: Optional[int], doc: Optional[dict], asked: int, status: str, examples: int) -> dict:
    """One layer of ``audit.json`` from its ``inversion.json`` object (None: not started)."""
    entry = {"layer": layer, "status": status, "n_prompts": asked}
    if doc is None:
        return entry
    s, prompts = doc["summary"], doc["prompts"]
    with_truth = [p for p in prompts if "exact" in p]
    entry.update({
        "n_done": s["n_done"], "exact_prompts": s["exact_prompts"], "complete_prompts": s["complete_prompts"],
        "n_positions": s["n_positions"], "recovered_positions": s["n_recovered"], "unique_positions": s["n_unique"],
        "tied_positions": s["n_tied_positions"], "missed_positions": s["n_not_recovered"],
        "wrong_recovered": s["n_wrong_recovered"], "token_accuracy": s["token_accuracy"],
        "seconds_per_prompt": s["seconds_per_prompt"], "setup_seconds": doc.get("setup_seconds"),
        "mean_tried": s["mean_tried"],
        "epsilon_rule": doc["epsilon_rule"], "noise": (doc.get("noise") or {}).get("relative"),
        "location": doc.get("location"), "final_norm": doc["final_norm"],
        "ties": [{"prompt": p["key"], "position": q["position"], "token": q["token"],
                  "alternatives": [a["token"] for a in q["alternatives"] if a["status"] != "excluded"]}
                 for p in prompts for q in p["positions"] if q["ties"]][:20],
        "misses": [{"prompt": p["key"], "position": i} for p in prompts for i in p["not_recovered"]][:20],
    })
    shown = sorted(with_truth, key=lambda p: p["exact"])[:examples] if with_truth else prompts[:examples]
    entry["examples"] = [{"prompt": p["key"], "exact": p.get("exact"), "true_text": p.get("true_text"),
                          "recovered_text": p["recovered_text"]} for p in shown]
    return entry


def audit_source(cfg: AuditConfig, command: Optional[str] = None) -> dict:
    """Audit ``cfg.source`` (module docstring); returns the ``audit.json`` object (also written to ``out``)."""
    start = time.monotonic()
    deadline = None if cfg.budget_s is None else start + float(cfg.budget_s)
    out = check_out(Path(cfg.out) if cfg.out else default_out(cfg.source))
    first = open_source(cfg.source, None)
    if first.kind == "store":
        layers: list[Optional[int]] = choose_layers(cfg.layers, first.layers)
    elif str(cfg.layers) in ("auto", "all"):
        layers = [None]  # one layer per file, found from its first rows
    else:
        layers = [int(cfg.layers)]
    indices = sample(first.n_prompts, cfg.n_prompts, cfg.seed)
    plans = {k: plan(invert_config(cfg, k), first if k is None or k == first.layer else open_source(cfg.source, k),
                     indices) for k in layers}  # every prompt of every layer checked before the model loads
    model = next(iter(plans.values())).model
    lm = load(model)
    bos = first_token(cfg, lm.tokenizer)
    doc = {"schema_version": audit_report.SCHEMA_VERSION, "source": str(first.path), "source_kind": first.kind,
           "model": lm.name, "n_layers": lm.n_layers, "n_prompts": len(indices), "seed": cfg.seed,
           "prompt_keys": [first.keys[i] for i in indices], "budget_s": cfg.budget_s, "command": command,
           "layers": []}
    for k, p in plans.items():
        layer, location = place(p, lm, bos)
        if deadline is not None and time.monotonic() > deadline:  # what an earlier run left there, if anything
            previous = output.read(out / f"L{layer}")
            status = "not started" if previous is None else (
                "done" if previous["summary"]["n_done"] >= len(indices) else "unfinished")
            doc["layers"].append(layer_entry(layer, previous, len(indices), status, cfg.examples))
            continue
        icfg = invert_config(cfg, k)
        icfg.model = model
        inv = invert_prompts(icfg, p, lm, layer, out / f"L{layer}", command, location, deadline)
        finished = inv["summary"]["n_done"] == len(indices)
        doc["layers"].append(layer_entry(layer, inv, len(indices), "done" if finished else "unfinished",
                                         cfg.examples))
        doc["seconds"] = round(time.monotonic() - start, 1)
        audit_report.write(out, doc, cfg.figures)
    doc["seconds"] = round(time.monotonic() - start, 1)
    doc["verdict"] = audit_report.verdict(doc)
    audit_report.write(out, doc, cfg.figures)
    log.info("%s -> %s", doc["verdict"], out)
    return doc
