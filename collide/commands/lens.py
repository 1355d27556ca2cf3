"""``collide lens fit model=NAME layers=...``: fit and cache the lenses and position-0 tables of ``collide invert``."""

from __future__ import annotations

from collide.invert.config import LensCommandConfig

SCHEMA = LensCommandConfig
POSITIONAL = "action"
SUMMARY = "fit the ranking lens and position-0 table `collide invert` uses (collide lens fit model=... layers=...)"
ACTIONS = ("fit",)
RERUN = ("the layers already fitted are kept (under lens.root, or in lens.path): the same `collide lens fit` "
         "command reads them and fits the rest; the interrupted layer restarts")


def run(cfg: LensCommandConfig, command: str = "") -> list[dict]:
    """Fit (or find in the cache) one bundle per layer, then one table row per layer."""
    from collide.console import print_table, say
    from collide.invert.driver import first_token
    from collide.invert.lens import load_or_fit
    from collide.layers import parse_layers
    from collide.errors import CollideError
    from collide.models import load_model

    if cfg.action not in ACTIONS:
        raise CollideError(f"collide lens {cfg.action!r} is not an action; use `collide lens fit model=NAME layers=K`")
    lm = load_model(cfg.model)
    layers = parse_layers(cfg.layers, lm.n_layers)
    if len(layers) > 1 and cfg.lens.path:
        raise CollideError("lens.path names one directory but several layers were asked for; drop lens.path "
                           "(bundles go under lens.root) or pass one layer")
    bos = first_token(cfg, lm.tokenizer)
    done = []
    for layer in layers:
        lens = load_or_fit(lm, layer, cfg.lens, [] if bos is None else [bos])
        done.append({"layer": layer, "path": str(lens.path), **lens.info})
    print_table(f"lenses of {lm.name}", ["layer", "own states", "continuation states", "table rows", "path"],
                [[str(e["layer"]), f"{e['n_own_states']:,}", f"{e['n_continuation_states']:,}",
                  f"{e['n_table_rows']:,}", e["path"]] for e in done], left=["path"])
    say(f"{len(done)} lens bundle(s) ready in {cfg.lens.path or cfg.lens.root}; `collide invert` reads "
        + ("it when given the same lens.path" if cfg.lens.path else "them from there"))
    return done
