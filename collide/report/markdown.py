"""Markdown of collide's reports, pure functions of their JSON dicts.

* ``render_markdown``: a run's ``report.md`` (from its report.json);
* ``render_exhaustive`` and ``render_margin``: the sections that ``collide.exhaustive`` adds to it
  (``collide.report.add_section``) and its own ``exhaustive.md`` / ``margin.md``.

Conventions: distances are L2, not squared, shown with ``fmt_distance``; layer 0 is the
embedding layer; prompt and token texts are quoted so that backticks and newlines survive.
"""

from __future__ import annotations

import json
from pathlib import Path

from collide.layers import layer_list, layers_in_words
from collide.report.figures import fmt_distance

MD_COLLISIONS = 10  # colliding pairs per layer shown with their text in report.md
MD_TEXT_CHARS = 400  # prompt texts longer than this are cut in report.md
STATUS_TITLES = {"no_collisions": "injective on this sample", "collisions": "collisions found",
                 "inconclusive": "inconclusive", "no_contextual_layers": "nothing to decide"}


# --------------------------------------------------------------------------- words


def plural(n: int, noun: str, count: bool = True) -> str:
    word = noun if n == 1 else noun + "s"
    return f"{n:,} {word}" if count else word



# --------------------------------------------------------------------------- report.md


def _text_block(text: str) -> str:
    """A fenced block that survives backticks and newlines in the prompt."""
    cut = text if len(text) <= MD_TEXT_CHARS else text[:MD_TEXT_CHARS] + " [...]"
    fence = "```"
    while fence in cut:
        fence += "`"
    return f"{fence}text\n{cut}\n{fence}"


def _prompt(report: dict, pid: int) -> str:
    text = report["prompt_texts"].get(str(pid))
    return f"prompt {pid}:\n\n{_text_block(text)}" if text is not None else f"prompt {pid} (text not stored)"


def render_markdown(report: dict) -> str:
    """report.md, a pure function of the report dict."""
    m, c, hw, v = report["model"], report["corpus"], report["hardware"], report["verdict"]
    L = report["layer_convention"]["n_layers"]
    commit = (report["git_commit"] or "unknown")[:12] + (" (uncommitted changes)" if report["git_dirty"] else "")
    out = [f"# collide report: {m['name']} on {c['name']}", "",
           f"**Verdict: {STATUS_TITLES[v['status']]}.** {v['text'][0].upper() + v['text'][1:]}", ""]
    if v["min_distance"] is not None:
        out += [f"Smallest distance at a contextual layer: {fmt_distance(v['min_distance'], 6)} at layer "
                f"{v['min_distance_layer']}.", ""]
    corpus_desc = ", ".join(f"{k}={c[k]}" for k in ("kind", "path", "seed", "min_tokens", "max_tokens")
                            if c.get(k) is not None)
    out += ["## Run", "", "| | |", "|---|---|",
            f"| model | {m['name']} (`{m['source']}`{' @ ' + m['revision'] if m.get('revision') else ''}), "
            f"family {m['family']}, L = {L} blocks, d = {m['d']} |",
            f"| dtype | {report['dtype']} (states stored as {report['store_dtype']}) |",
            *_quantization_rows(report),
            f"| layers | 0 = embeddings, k = output of block k, {L} = last block "
            f"{'after' if m['final_norm'] == 'post' else 'before'} the final norm (`final_norm={m['final_norm']}`) |",
            f"| corpus | {c['name']} ({corpus_desc}) |",
            f"| prompts | {report['n_prompts']:,} distinct token sequences "
            + (f"({plural(report['n_duplicates'], 'duplicate')} dropped) |" if report["n_duplicates"] is not None
               else "(the first of a larger store) |"),
            f"| threshold | L2 < {fmt_distance(report['threshold'])} (not squared) |",
            f"| hardware | {hw['cpu']}, {hw['cores']} cores, {hw['ram_gib']} GiB RAM, GPU: {hw['gpu'] or 'none'} |",
            f"| software | collide {report['collide_version']}, commit {commit}, torch {hw['torch']}, "
            f"faiss {hw['faiss'] or 'not installed'} |",
            f"| command | `{report['command']}` |",
            f"| store | `{report['store']}` |", "",
            "## Timings", "", "| stage | seconds |", "|---|---:|"]
    out += [f"| {stage} | {s:.1f} |" for stage, s in report["timings"].items()]
    out += ["", "## Per-layer results", "",
            "Distances are L2 (not squared). NN = each prompt's distance to its nearest other prompt"
            + (f" ({nn_scope(report['layers'])})." if nn_scope(report["layers"]) else "."), "",
            "| layer | vectors | pairs | min distance | certified | closest pair | collisions "
            "| NN 5% | NN median | NN 95% | NN max | invalid rows |",
            "|---:|---:|---:|---:|:---:|---|---:|---:|---:|---:|---:|---:|"]
    for e in report["layers"]:
        nn = e["nn_distance"] or {}
        name = f"{e['layer']} (embeddings)" if e["is_embedding_layer"] else str(e["layer"])
        cert = "yes" if e["certified"] else f"**no** ({e['uncertified_reason'] or 'budget'})"
        pair = "{} / {}".format(*e["closest_pair"]) if e["closest_pair"] else "-"
        out.append(f"| {name} | {e['n_vectors']:,} | {e['n_pairs']:,} | {fmt_distance(e['min_distance'], 6)} | {cert} "
                   f"| {pair} | {e['n_collisions']:,} | {fmt_distance(nn.get('p5'))} | {fmt_distance(nn.get('p50'))} "
                   f"| {fmt_distance(nn.get('p95'))} | {fmt_distance(nn.get('max'))} | {len(e['invalid_rows'])} |")
    out += _diagnostics_section(report)
    if report["figures"]:
        out += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in report["figures"]]
    collided = [e for e in report["layers"] if e["n_collisions"] and not e["is_embedding_layer"]]
    if collided:
        out += ["", "## Colliding pairs", "",
                f"Pairs of distinct prompts under L2 {fmt_distance(report['threshold'])}. The full lists are in "
                "`collisions/layer=K.parquet`." + _collisions_are(report)]
        for e in collided:
            out += ["", f"### Layer {e['layer']}: {plural(e['n_collisions'], 'pair')}"]
            for col in e["collisions"][:MD_COLLISIONS]:
                out += ["", f"Distance {fmt_distance(col['distance'], 6)}:", "", _prompt(report, col["a"]), "",
                        _prompt(report, col["b"])]
    out += _closest_pairs_section(report)
    return "\n".join(out) + "\n"


def _quantization_rows(report: dict) -> list[str]:
    """The run table's rows on the quantized forward (the model) and the storage (the store), kept apart."""
    q = report.get("quantization")
    if q is None:
        return []
    lossless = "lossless" if q["storage"]["lossless"] else "**rounded**: a collision may come from storage"
    model = report["model"]
    noise = ([f"| added noise | {model['noise']}, RMS L2 norm {', '.join(f'{x:g}' for x in model['noise_scale'])} "
              "per layer (model.noise: a control, not the model's states) |"] if "noise" in model else [])
    return [f"| quantized forward | {q['forward'].get('description', 'none')} |", *noise,
            f"| storage | states stored as {q['storage']['dtype']} ({lossless}) |"]


def _collisions_are(report: dict) -> str:
    """What the colliding pairs are evidence of: the model's forward (quantized or not), or possibly the storage."""
    q = report.get("quantization")
    if q is None:
        return ""
    forward = q["forward"]
    quantized = forward.get("activations", "none") != "none" or forward.get("weights", "none") != "none"
    what = "the quantized forward (" + forward.get("description", "") + ")" if quantized else "the model's forward"
    if "noise" in report["model"]:
        what += f" plus the {report['model']['noise']} noise of model.noise (a control, not the model)"
    if q["collisions_are"] == "model":
        return (f" They are collisions of the model: {what} maps both prompts to these states, stored "
                f"losslessly as {q['storage']['dtype']}; a distance 0 means bitwise-identical states.")
    return (f" The states were stored as {q['storage']['dtype']}, narrower than the compute dtype: a collision may "
            f"come from the storage rounding, not from {what}; rerun with store.dtype=auto to tell them apart.")


def nn_scope(layers: list[dict]) -> str:
    """Whose nearest neighbours the layers' NN statistics cover, in words ("nn of 4,096 sampled rows, each
    exact"; layers that differ are named), or "" when no layer says (an older report)."""
    said = {}
    for e in layers:
        text = (e.get("nearest") or {}).get("description")
        if text:
            said.setdefault(text, []).append(e["layer"])
    if len(said) <= 1:
        return next(iter(said), "")
    return "; ".join(f"layer{'s' if len(ks) > 1 else ''} {layer_list(ks)}: {text}" for text, ks in said.items())


def _diagnostics_section(report: dict) -> list[str]:
    """Separation margin and co-Lipschitz estimate per layer (collide.report.diagnostics)."""
    entries = [e for e in report["layers"] if e.get("diagnostics")]
    if not entries:
        return []
    out = ["", "## Geometric diagnostics", "",
           "After arXiv 2511.14808, with collide's definitions: the **separation margin** is the min L2 between "
           "two distinct prompts' states (relative: over the median state norm, and over the median norm of the "
           "states minus their mean); the **co-Lipschitz** estimate "
           "is, over nearest-neighbour pairs in state space, the L2 distance per token edit (Levenshtein "
           "distance of the token-id sequences), in L2 per edit; its min estimates the lower Lipschitz constant.",
           "", "| layer | margin | relative margin | median norm | relative to centred | median centred norm "
           "| co-Lipschitz min | p5 | median | min pair (edits) | NN pairs |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for e in entries:
        d = e["diagnostics"]
        c = d["co_lipschitz"] or {}
        pair = "{} / {} ({})".format(*c["pair"], c["pair_prompt_distance"]) if c else "-"
        n = f"{c['n_pairs']:,}{' (sample)' if c.get('sampled') else ''}" if c else "-"
        out.append(f"| {e['layer']}{' (emb)' if e['is_embedding_layer'] else ''} "
                   f"| {fmt_distance(d['separation_margin'])} | {fmt_distance(d['relative_margin'])} "
                   f"| {fmt_distance(d['state_norm_p50'])} | {fmt_distance(d.get('relative_margin_centred'))} "
                   f"| {fmt_distance(d.get('centred_norm_p50'))} | {fmt_distance(c.get('min'))} "
                   f"| {fmt_distance(c.get('p5'))} | {fmt_distance(c.get('p50'))} | {pair} | {n} |")
    return out


def _closest_pairs_section(report: dict) -> list[str]:
    """The closest pair of each layer as text, grouped by pair (many layers share their closest pair)."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for e in report["layers"]:
        if e["closest_pair"]:
            groups.setdefault(tuple(e["closest_pair"]), []).append(e)
    if not groups:
        return []
    out = ["", "## Closest pairs", "", "What nearly collided: the closest pair of prompts at each layer."]
    for (a, b), entries in groups.items():
        dists = ", ".join(f"{fmt_distance(e['min_distance'], 4)} at layer {e['layer']}" for e in entries[:6])
        more = f" and {len(entries) - 6} more layers" if len(entries) > 6 else ""
        out += ["", f"### Layer{'s' if len(entries) > 1 else ''} {layer_list([e['layer'] for e in entries])}: "
                f"prompts {a} and {b}", "", f"L2 distance {dists}{more}.", "", _prompt(report, a), "",
                _prompt(report, b)]
    return out



# --------------------------------------------------------------------------- exhaustive sections


def _token(text: str, token_id: int) -> str:
    """An appended token for people: its decoded text as a JSON string, and its id."""
    return f"`{json.dumps(text, ensure_ascii=False)}` (id {token_id})"


def _quote_block(text: str | None) -> str:
    """A Markdown quote of a prompt text (or a note that the store keeps none)."""
    if text is None:
        return "(text not stored)"
    return "\n".join("> " + line for line in text.splitlines() or [""])


def _table_row(layer: int, entry: dict, pair: str) -> str:
    """One markdown row: layer, pairs, min distance, certified, collisions, closest pair."""
    name = f"{layer} (embeddings)" if layer == 0 else str(layer)
    return (f"| {name} | {entry['n_pairs']:,} | {fmt_distance(entry['min_distance'], 6)} | "
            f"{'yes' if entry['certified'] else '**no**'} | {entry['n_collisions']:,} | {pair} |")


def render_exhaustive(result: dict, figure: str | None, per_set: bool, json_file: str) -> str:
    """Markdown of an exhaustive result: the report.md section (``per_set=False``) or exhaustive.md.

    ``figure`` and ``json_file`` (where the collisions are listed) are paths relative to the
    Markdown file; ``figure=None`` leaves the figure out."""
    sel, tok, S, n = result["selection"], result["tokens"], result["n_sets"], result["tokens"]["n_tokens"]
    how = (f"the {S} prompts of the run closest to another prompt at layer {sel['layer']}"
           if sel["method"] == "closest" else f"prompts {', '.join(map(str, sel['prompt_ids']))} of the run")
    appended = "every token of the vocabulary" if tok["vocab"] == "all" else \
        f"a seeded sample of {n:,} tokens (seed {tok['seed']})"
    identical = result["per_layer"][0]["n_collisions_identical_inputs"]
    distinct_collisions = sum(e["distinct_inputs"]["n_collisions"] for e in result["per_layer"])
    out = ["## Exhaustive continuation test", "",
           f"Base prompts: {how}. Appended to each: {appended}, {n:,} continuations per prompt. Pairs compared "
           f"within each prompt's set: **{result['n_pairs_per_layer']:,} per layer** ({S} x C({n:,}, 2)) at "
           f"{layers_in_words(result['layers'])}. Distances are L2 (not squared); a collision is a distance "
           f"below {fmt_distance(result['threshold'])}.", ""]
    if distinct_collisions == 0:
        out += [f"**No collisions** between continuations with different inputs: no two different next tokens "
                f"took the same prompt within {fmt_distance(result['threshold'])} of each other at any tested "
                "layer.", ""]
    else:
        out += [f"**{distinct_collisions:,} colliding pairs** of continuations with different inputs, summed over "
                f"the tested layers (listed in `{json_file}`).", ""]
    if tok["n_duplicate_input_groups"]:
        out += [f"Besides, {tok['n_duplicate_input_groups']:,} groups of appended tokens have bitwise-identical "
                "input embeddings (e.g. ids " + ", ".join(map(str, tok["duplicate_input_groups"][0][:6])) + "): "
                "identical inputs after an identical prefix, so they collide at every layer by construction "
                f"({identical:,} pairs per layer at distance exactly 0, found by the search and counted apart; "
                "the distances below are over pairs with different inputs).", ""]
    out += ["| layer | pairs | min distance | certified | collisions | closest continuation pair |",
            "|---:|---:|---:|:---:|---:|---|"]
    for e in result["per_layer"]:
        d = e["distinct_inputs"]
        c = d["closest_pair"]
        pair = "-" if c is None else \
            f"{_token(c['token_texts'][0], c['tokens'][0])} vs {_token(c['token_texts'][1], c['tokens'][1])} " \
            f"after prompt {c['base_prompt_id']}"
        out.append(_table_row(e["layer"], d, pair))
    deepest = result["per_layer"][-1]
    c = deepest["distinct_inputs"]["closest_pair"]
    if c is not None:
        base = next(s for s in result["sets"] if s["set"] == c["set"])
        out += ["", f"Closest continuation pair (different inputs) at layer {deepest['layer']}: after prompt "
                f"{c['base_prompt_id']}, "
                f"appending {_token(c['token_texts'][0], c['tokens'][0])} or "
                f"{_token(c['token_texts'][1], c['tokens'][1])} gives states {fmt_distance(c['distance'], 6)} apart. "
                "The prompt:", "", _quote_block(base.get("base_text"))]
    if result["across_sets"]:
        out += ["", f"Across all {S} sets together (C({S * n:,}, 2) pairs per layer):", "",
                "| layer | pairs | min distance | certified | collisions | closest pair |",
                "|---:|---:|---:|:---:|---:|---|"]
        for e in result["across_sets"]:
            c = e["closest_pair"]
            pair = "-" if c is None else \
                f"{_token(c['token_texts'][0], c['tokens'][0])} after prompt {c['base_prompt_ids'][0]} vs " \
                f"{_token(c['token_texts'][1], c['tokens'][1])} after prompt {c['base_prompt_ids'][1]}"
            out.append(_table_row(e["layer"], e, pair))
        if result["across_sets"][0]["layer"] == 0:
            out += ["", "At layer 0 a continuation's state is the appended token's embedding (plus a position "
                    "embedding in models that have one), so the same token appended to two prompts collides there "
                    "by construction (with position embeddings: when the two prompts have the same length)."]
    t = result["timings"]
    out += ["", f"Time: extraction {t['extract_s']:.1f} s, search {t['search_s']:.1f} s"
            + (f", across sets {t['across_sets_s']:.1f} s" if "across_sets_s" in t else "")
            + f" ({result['device']}, {result['batch_size']} continuations per step)."]
    if per_set:
        shown = result["layers"][-6:]
        out += ["", "### Per prompt set", "", "| set | base prompt | prefix tokens | "
                + " | ".join(f"min at layer {k}" for k in shown) + " |", "|---:|---:|---:|" + "---:|" * len(shown)]
        for s in result["sets"]:
            mins = {e["layer"]: e["min_distance"] for e in s["layers"]}
            out.append(f"| {s['set']} | {s['base_prompt_id']} | {s['prefix_tokens']} | "
                       + " | ".join(fmt_distance(mins[k], 6) for k in shown) + " |")
    if figure:
        out += ["", f"![exhaustive continuation test]({figure})"]
    return "\n".join(out) + "\n"


def render_margin(result: dict, figure: str | None, per_set: bool) -> str:
    """Markdown of a margin result: the report.md section (``per_set=False``) or margin.md (with a row per prompt)."""
    tok, S = result["tokens"], result["n_sets"]
    paper = any(e["paper_gpt2_small"] is not None for e in result["per_layer"])
    out = ["## Margin of single-token continuations", "",
           f"For each of {S} prompts, {tok['n_tokens']:,} single-token continuations (a seeded sample per prompt, "
           f"seed {tok['seed']}); the minimum pairwise L2 among them at each layer, then the mean over prompts "
           "(the paper's appendix experiment).", "",
           "| layer | mean min distance | std | smallest | largest | certified | collisions |"
           + (" paper, GPT-2 Small |" if paper else ""),
           "|---:|---:|---:|---:|---:|:---:|---:|" + ("---:|" if paper else "")]
    for e in result["per_layer"]:
        out.append(f"| {e['layer']} | {fmt_distance(e['mean_min_distance'], 4)} | "
                   f"{fmt_distance(e['std_min_distance'], 3)} | "
                   f"{fmt_distance(e['min_min_distance'], 4)} | {fmt_distance(e['max_min_distance'], 4)} | "
                   f"{'yes' if e['certified'] else '**no**'} | {e['n_collisions']:,} |"
                   + (f" {fmt_distance(e['paper_gpt2_small'], 4)} |" if paper else ""))
    t = result["timings"]
    out += ["", f"Time: extraction {t['extract_s']:.1f} s, search {t['search_s']:.1f} s ({result['device']})."]
    if per_set:
        out += ["", "### Per prompt", "", "| prompt | prefix tokens | " +
                " | ".join(f"layer {k}" for k in result["layers"][-6:]) + " |",
                "|---:|---:|" + "---:|" * len(result["layers"][-6:])]
        for s in result["sets"]:
            out.append(f"| {s['base_prompt_id']} | {s['prefix_tokens']} | "
                       + " | ".join(fmt_distance(e["min_distance"], 4) for e in s["layers"][-6:]) + " |")
    if figure:
        out += ["", f"![margin of single-token continuations]({figure})"]
    return "\n".join(out) + "\n"
