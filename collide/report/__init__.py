"""Report stage: a run's per-layer report (``run_report``), its Markdown (``markdown``), its figures
(``figures``) and the comparison of several runs (``compare``)."""

from collide.report.run_report import add_section, print_summary, read_report, write_report

__all__ = ["add_section", "print_summary", "read_report", "write_report"]
