"""``collide probe SOURCE``: linear probes from the state at t to the token at t+tau (``collide.experiments.probe``)."""

from __future__ import annotations

from collide.config import ProbeConfig

SCHEMA = ProbeConfig
POSITIONAL = "source"
SUMMARY = "linear probes: what each layer's state at t says about the token at t+tau"
RERUN = "nothing was written: run the same `collide probe` command again to probe from the start"


def run(cfg: ProbeConfig, command: str = "") -> dict:
    """Probe SOURCE's store, then a table of top-1 accuracy per layer (rows) and tau (columns)."""
    from collide.commands import check_out_dir
    from collide.console import print_table
    from collide.experiments.probe import probe_source

    if cfg.out:
        check_out_dir(cfg.out)
    result = probe_source(cfg, command)
    by = {(e["layer"], e["tau"]): e for e in result["results"]}
    rows = [[str(k)] + [f"{by[k, t]['top1']:.3f}" for t in result["taus"]] for k in result["layers"]]
    rows.append(["bigram"] + [f"{b['bigram']['top1']:.3f}" for b in result["baselines"]])
    print_table(f"probe top-1 accuracy: {result['model']}", ["layer"] + [f"tau={t}" for t in result["taus"]], rows)
    return result
