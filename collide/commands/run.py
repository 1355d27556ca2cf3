"""``collide run [overrides]``: corpus -> model -> store -> certified search -> report (``collide.pipeline``).

A run that fails before writing anything into its run directory (Hydra made it, with ``.hydra/`` and the
job's log) leaves no run directory: its error line is the record (``discard_unwritten``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from collide.config import CollideConfig

SCHEMA = CollideConfig
SUMMARY = "corpus -> model -> store -> certified search -> report (the default of `python -m collide`)"
HYDRA_FILES = (".hydra",)  # what Hydra puts in a run directory before the run starts, besides the job's *.log


def run(cfg: CollideConfig, command: str = "", run_dir: Path | None = None) -> dict:
    """The pipeline into ``run_dir`` (default: Hydra's output directory); prints the per-layer table.

    On any failure, a run directory that holds only what Hydra put there is removed (``discard_unwritten``)."""
    from collide.pipeline import run_pipeline
    from collide.report import print_summary

    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        report = run_pipeline(cfg, run_dir, command)
    except BaseException:
        discard_unwritten(run_dir, default_parent=_default_run_dir())
        raise
    print_summary(report)
    return report


def _default_run_dir() -> bool:
    """Whether this is a Hydra run in a default run directory nested in a folder of its own
    (runs/<model>-<corpus>-n<N>/<overrides>, with overrides), not one named by hydra.run.dir= or a sweep's."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    hydra = HydraConfig.get()
    return (hydra.mode.name == "RUN" and bool(hydra.job.override_dirname)
            and not any(o.lstrip("+").startswith("hydra.run.dir=") for o in hydra.overrides.hydra))


def discard_unwritten(run_dir: Path, default_parent: bool = False) -> bool:
    """Remove ``run_dir`` if it holds nothing but ``.hydra/`` and log files (the run wrote nothing); with
    ``default_parent``, also its parent (``runs/<model>-<corpus>-n<N>/``) once empty. Returns whether it was removed."""
    if not run_dir.is_dir():
        return False
    if any(p.name not in HYDRA_FILES and not (p.is_file() and p.suffix == ".log") for p in run_dir.iterdir()):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    if default_parent and run_dir.parent.is_dir() and not any(run_dir.parent.iterdir()):
        run_dir.parent.rmdir()
    return not run_dir.exists()
