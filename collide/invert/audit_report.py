"""What ``collide audit`` writes: ``audit.json`` (the object ``collide.invert.audit`` builds), ``audit.md`` (the
verdict in words, a table per layer, texts side by side) and ``figures/audit.png``, through
``collide.atomic.write_outputs``. Everything here reads the JSON object alone, so the report can be redrawn.

Words: a prompt is given back *exactly* when every position's recovered token is its true token (up to tokens
with identical embedding rows); *complete* when every position has a token within ε (SOURCE without true
tokens); a position is *tied* when another token within ε was not excluded by the positions after it.
"""

from __future__ import annotations

from pathlib import Path

from collide.atomic import write_outputs

SCHEMA_VERSION = "1.0"


def _span(layers: list[int]) -> str:
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}–{layers[-1]}"


def _seconds(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2g} s" if round(lo, 1) == round(hi, 1) else f"{lo:.2g}–{hi:.2g} s"


def _score(e: dict) -> tuple[int, str]:
    """(prompts given back, the word for it): exact when SOURCE has true tokens, else complete."""
    if e.get("exact_prompts") is not None:
        return e["exact_prompts"], "the exact text"
    return e["complete_prompts"], "a complete text (every position within ε)"


def verdict(doc: dict) -> str:
    """The audit in words: runs of audited layers with the same outcome, then what was left unfinished."""
    parts, run = [], []

    def flush() -> None:
        if run:
            got, word = _score(run[0])
            timing = _seconds([e["seconds_per_prompt"] for e in run])
            parts.append(f"{_span([e['layer'] for e in run])} give{'s' if len(run) == 1 else ''} back {word} of "
                         f"{got}/{run[0]['n_prompts']} sampled prompts in {timing} each")
            run.clear()

    for e in doc["layers"]:
        if e["status"] != "done":
            flush()
            where = f"layer {e['layer']}" if e["layer"] is not None else "the layer"
            if e["status"] == "not started":
                parts.append(f"{where} was not started within the {doc['budget_s']:g} s budget")
            else:
                parts.append(f"{where} was not finished within the {doc['budget_s']:g} s budget "
                             f"({e['n_done']} of {e['n_prompts']} prompts)")
            continue
        got, _ = _score(e)
        if run and _score(run[0])[0] != got:
            flush()
        if got != e["n_prompts"]:
            flush()
            word = "exactly" if e.get("exact_prompts") is not None else "completely"
            share = e["recovered_positions"] / max(1, e["n_positions"])
            parts.append(f"layer {e['layer']} gives back {got}/{e['n_prompts']} sampled prompts {word} "
                         f"({100 * share:.0f}% of positions recovered, {e['missed_positions']} missed) in "
                         f"{e['seconds_per_prompt']:.2g} s each")
            continue
        run.append(e)
    flush()
    tied = sum(e.get("tied_positions") or 0 for e in doc["layers"])
    text = "; ".join(parts) + "."
    text = text[0].upper() + text[1:]
    return text + (f" {tied} position(s) stay tied: another token within ε was not excluded (see the table)."
                   if tied else "")


def markdown(doc: dict) -> str:
    """``audit.md``: verdict, one row per layer, then the examples of each layer."""
    lines = [f"# Audit of {doc['source']}", "", f"**Verdict:** {doc.get('verdict') or verdict(doc)}", "",
             f"- model `{doc['model']}` (L = {doc['n_layers']}); {doc['n_prompts']} prompts sampled with seed "
             f"{doc['seed']}: {', '.join(map(str, doc['prompt_keys'][:12]))}"
             + (" ..." if len(doc["prompt_keys"]) > 12 else ""),
             f"- {doc.get('seconds', 0):.0f} s in all" + (f" (budget {doc['budget_s']:g} s)" if doc["budget_s"] else ""),
             "", "| layer | status | prompts exact / complete | positions recovered | unique | tied | missed | "
             "s / prompt | setup s | mean candidates | noise |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in doc["layers"]:
        if "n_done" not in e:
            lines.append(f"| {e['layer']} | {e['status']} | | | | | | | | | |")
            continue
        exact = "-" if e["exact_prompts"] is None else e["exact_prompts"]
        noise = "-" if e.get("noise") is None else f"{e['noise']:.2g}"
        lines.append(f"| {e['layer']} | {e['status']} | {exact} / {e['complete_prompts']} of {e['n_done']} | "
                     f"{e['recovered_positions']}/{e['n_positions']} | {e['unique_positions']} | {e['tied_positions']} | "
                     f"{e['missed_positions']} | {e['seconds_per_prompt'] or 0:.2f} | {e['setup_seconds'] or 0:.0f} | "
                     f"{e['mean_tried'] or 0:.0f} | {noise} |")
    lines += ["", "Setup: the layer's lens read or fit, and the noise measure. Noise: the gap between SOURCE's known "
              "first rows and the model's own states, relative to their norm.", ""]
    if doc["layers"]:
        lines += ["![audit](figures/audit.png)", ""]
    for e in doc["layers"]:
        if e.get("examples"):
            lines += [f"## Layer {e['layer']}", "", f"ε: {e['epsilon_rule']}", "",
                      "| prompt | exact | original | recovered |", "|---|---|---|---|"]
            for x in e["examples"]:
                exact = {True: "yes", False: "**no**"}.get(x["exact"], "n/a")
                lines.append(f"| {x['prompt']} | {exact} | {_cell(x['true_text'])} | {_cell(x['recovered_text'])} |")
            lines.append("")
    return "\n".join(lines)


def _cell(text) -> str:
    if text is None:
        return "n/a"
    return "`" + str(text).replace("`", "'").replace("|", "\\|").replace("\n", "\\n") + "`"


def figure(doc: dict, path: Path) -> Path:
    """Per audited layer: the share of prompts given back and of positions recovered (left), seconds per
    prompt (right)."""
    from collide.report.figures import _new_figure, _save

    done = [e for e in doc["layers"] if "n_done" in e and e["n_done"]]
    fig = _new_figure((9.0, 3.6))
    left, right = fig.subplots(1, 2)
    x = [str(e["layer"]) for e in done]
    prompts = [_score(e)[0] / e["n_done"] for e in done]
    positions = [e["recovered_positions"] / max(1, e["n_positions"]) for e in done]
    at = range(len(done))
    left.bar([i - 0.2 for i in at], prompts, width=0.4, label="prompts given back")
    left.bar([i + 0.2 for i in at], positions, width=0.4, label="positions recovered")
    left.set_xticks(list(at), x)
    left.set_ylim(0, 1.05)
    left.set_xlabel("layer")
    left.set_ylabel("share")
    left.legend(loc="lower left", fontsize=8)
    right.bar(list(at), [e["seconds_per_prompt"] or 0 for e in done], color="tab:gray")
    right.set_xticks(list(at), x)
    right.set_xlabel("layer")
    right.set_ylabel("seconds per prompt")
    fig.suptitle(f"{doc['model']}: {doc['n_prompts']} sampled prompts", fontsize=10)
    return _save(fig, path)


def write(out: Path, doc: dict, figures: bool = True) -> Path:
    """``audit.json``, ``audit.md`` and (``figures``) ``figures/audit.png`` in ``out``, each atomic."""
    draw = {"figures/audit.png": lambda p: figure(doc, p)} if figures else None
    return write_outputs(out, "audit", doc, markdown(doc), draw)
