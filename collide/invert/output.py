"""What ``collide.invert`` writes: ``inversion.json`` (rewritten atomically after each prompt, so an
interrupted inversion resumes at the next prompt) and ``inversion.md`` (the texts and a verdict).

Distances are L2 (not squared), fp64. A position counts as exact when the true token is in the
recovered token's group of bitwise-identical input-embedding rows (such tokens have identical
states at every layer, so no inversion can tell them apart); those positions are listed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from collide.atomic import write_outputs
from collide.errors import CollideError
from collide.invert.results import PositionResult

SCHEMA_VERSION = "1.1"  # 1.1: alternatives, unique, epsilon_noise, others_within_epsilon, noise
JSON_NAME, MD_NAME = "inversion.json", "inversion.md"


def position_record(res: PositionResult, tokenizer, true_id: Optional[int]) -> dict:
    """One position of ``inversion.json``."""
    record = {"position": res.position, "token": res.token, "token_text": tokenizer.decode([res.token]),
              "group": res.group if len(res.group) > 1 else None, "recovered": res.recovered,
              "unique": res.unique, "distance": res.distance, "epsilon": res.epsilon,
              "epsilon_noise": res.epsilon_noise, "tried": res.tried,
              "others_within_epsilon": len(res.alternatives), "best_rejected": res.best_rejected,
              "ratio": res.ratio, "margin": res.margin, "certified": res.certified, "known": res.known,
              "seconds": round(res.seconds, 4), "ties": res.ties,
              "alternatives": [{"token": a.token, "token_text": tokenizer.decode([a.token]), "distance": a.distance,
                                "status": a.status, "at": a.at, "note": a.note} for a in res.alternatives]}
    if true_id is not None:
        record["true_token"] = true_id
        record["exact"] = true_id in res.group
    return record


def prompt_record(key: str, results: list[PositionResult], tokenizer, n_positions: int,
                  true_ids: Optional[list[int]], true_text: Optional[str], seconds: float) -> dict:
    """One entry of the ``prompts`` list: recovered ids and text, per-position records, exactness; ``seconds``:
    the prompt's wall time (positions, backtracking and the check of alternatives)."""
    ids = [r.token for r in results]
    positions = [position_record(r, tokenizer, None if true_ids is None or r.position >= len(true_ids)
                                 else int(true_ids[r.position])) for r in results]
    record = {"key": key, "n_positions": n_positions, "n_searched": len(results),
              "complete": len(results) == n_positions and all(r.recovered for r in results),
              "recovered_ids": ids, "recovered_text": tokenizer.decode(ids, skip_special_tokens=True),
              "not_recovered": [r.position for r in results if not r.recovered],
              "indistinguishable": [r.position for r in results if len(r.group) > 1],
              # positions where another token's state was also within ε and not excluded by the later positions
              "tied": [r.position for r in results if r.ties],
              "seconds": round(seconds, 4), "positions": positions}
    if true_ids is not None:
        true_ids = [int(t) for t in true_ids]
        record["true_ids"] = true_ids
        record["true_text"] = true_text if true_text is not None else tokenizer.decode(true_ids,
                                                                                       skip_special_tokens=True)
        record["n_exact_tokens"] = sum(p["exact"] for p in positions)
        record["exact"] = (len(true_ids) == n_positions and record["complete"]
                           and record["n_exact_tokens"] == n_positions)
        # tokens claimed that are not the true ones: recovered (within ε, nearest consistent) / unique
        record["wrong_recovered"] = [p["position"] for p in positions if p["recovered"] and not p["exact"]]
        record["wrong_unique"] = [p["position"] for p in positions if p["unique"] and not p["exact"]]
    return record


def summary(prompts: list[dict], n_total: int, n_distinct: int) -> dict:
    """Token accuracy (over prompts with true ids), exact prompts, seconds per token, vocabulary explored."""
    positions = [p for prompt in prompts for p in prompt["positions"]]
    searched = [p for p in positions if not p["known"]]
    scored = [p for p in positions if "exact" in p]
    seconds = sum(p["seconds"] for p in prompts)
    with_truth = [p for p in prompts if "exact" in p]
    certified = [p["certified"] for p in positions if p["certified"] is not None]
    return {
        "n_prompts": n_total, "n_done": len(prompts), "n_positions": len(positions),
        "n_recovered": sum(p["recovered"] for p in positions),
        "n_not_recovered": sum(not p["recovered"] for p in positions),
        "complete_prompts": sum(p["complete"] for p in prompts),
        "token_accuracy": sum(p["exact"] for p in scored) / len(scored) if scored else None,
        "exact_prompts": sum(p["exact"] for p in with_truth) if with_truth else None,
        "n_scored_prompts": len(with_truth),
        "n_indistinguishable_positions": sum(len(p["indistinguishable"]) for p in prompts),
        "n_unique": sum(p["unique"] for p in positions),
        "n_tied_positions": sum(len(p["tied"]) for p in prompts),
        "n_wrong_recovered": sum(len(p["wrong_recovered"]) for p in with_truth) if with_truth else None,
        "n_wrong_unique": sum(len(p["wrong_unique"]) for p in with_truth) if with_truth else None,
        "seconds": round(seconds, 3),
        "seconds_per_token": seconds / len(positions) if positions else None,
        "seconds_per_prompt": seconds / len(prompts) if prompts else None,
        "mean_tried": sum(p["tried"] for p in searched) / len(searched) if searched else None,
        "vocab_explored": (sum(p["tried"] for p in searched) / (len(searched) * n_distinct)) if searched else None,
        "n_certified": sum(certified) if certified else None,
    }


def read(out: Path) -> Optional[dict]:
    """The ``inversion.json`` object in ``out``, or None when there is none (or it is not whole JSON)."""
    try:
        return json.loads((out / JSON_NAME).read_text())
    except (OSError, ValueError):
        return None


def load_previous(out: Path, header: dict) -> list[dict]:
    """The prompts already inverted into ``out`` by the same inversion (same header), to resume after."""
    path = out / JSON_NAME
    if not path.is_file():
        return []
    try:
        previous = json.loads(path.read_text())
    except ValueError as exc:
        raise CollideError(f"{path} is not valid JSON ({exc}); delete it to start the inversion again") from exc
    differ = sorted(k for k in header if previous.get(k) != header[k])
    if differ:
        raise CollideError(f"{path} holds an inversion with different {differ}; pass another out=DIR or delete "
                           f"{out} to start again")
    return list(previous.get("prompts", []))


def write(out: Path, header: dict, prompts: list[dict], n_total: int, n_distinct: int) -> dict:
    """Write ``inversion.json`` and ``inversion.md`` atomically; returns the JSON object."""
    doc = {**header, "prompts": prompts, "summary": summary(prompts, n_total, n_distinct)}
    write_outputs(out, JSON_NAME.removesuffix(".json"), doc, markdown(doc))
    return doc


def outcome_text(doc: dict) -> str:
    """The outcome in plain words."""
    s = doc["summary"]
    done = f"{s['n_done']} of {s['n_prompts']} prompts inverted"
    if s["n_not_recovered"]:
        return (f"{done}: {s['n_not_recovered']} position(s) had no candidate within ε after the whole vocabulary "
                "(noise, another model, layer or norm convention than the states came from?); they are marked, "
                "never guessed silently.")
    if s["exact_prompts"] is not None:
        acc = f"{100 * s['token_accuracy']:.1f}%"
        tail = "" if not s["n_indistinguishable_positions"] else (
            f" ({s['n_indistinguishable_positions']} position(s) up to tokens with identical embedding rows)")
        return (f"{done}: {s['exact_prompts']} of {s['n_scored_prompts']} recovered exactly, token accuracy "
                f"{acc}{tail}.")
    return f"{done}: every position verified within ε (no true tokens in SOURCE to score against)."


def markdown(doc: dict) -> str:
    """``inversion.md``: the verdict, the settings, and each recovered text beside its original."""
    s = doc["summary"]
    lines = [f"# Inversion of {doc['source']}", "", f"**Verdict:** {outcome_text(doc)}", "",
             f"- model `{doc['model']['name']}`, layer {doc['layer']} of {doc['n_layers']} "
             f"(final norm: {doc['final_norm']}), compute {doc['compute_dtype']}, states stored as "
             f"{doc['stored_dtype']}",
             f"- policy `{doc['policy']['policy']}`, batch {doc['policy']['batch']}; ε: {doc['epsilon_rule']}",
             f"- {s['seconds_per_token'] or 0:.3f} s per token, {s['seconds_per_prompt'] or 0:.2f} s per prompt; "
             f"{100 * (s['vocab_explored'] or 0):.3f}% of the vocabulary explored per searched position", ""]
    if s["n_certified"] is not None:
        lines += [f"- {s['n_certified']} of {s['n_positions']} positions certified unique (margin Δ > 2ε)", ""]
    lines += ["| # | exact | original | recovered |", "|---|---|---|---|"]
    for p in doc["prompts"]:
        exact = {True: "yes", False: "**no**"}.get(p.get("exact"), "n/a")
        original = p.get("true_text")
        lines.append(f"| {p['key']} | {exact} | {_cell(original) if original is not None else 'n/a'} | "
                     f"{_cell(p['recovered_text'])} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return "`" + text.replace("`", "'").replace("|", "\\|").replace("\n", "\\n") + "`"
