"""``collide run [overrides]``: corpus -> model -> store -> certified search -> report (``collide.pipeline``)."""

from __future__ import annotations

from pathlib import Path

from collide.config import CollideConfig

SCHEMA = CollideConfig
SUMMARY = "corpus -> model -> store -> certified search -> report (the default of `python -m collide`)"


def run(cfg: CollideConfig, command: str = "", run_dir: Path | None = None) -> dict:
    """The pipeline into ``run_dir`` (default: Hydra's output directory); prints the per-layer table."""
    from collide.pipeline import run_pipeline
    from collide.report import print_summary

    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
    report = run_pipeline(cfg, run_dir, command)
    print_summary(report)
    return report
