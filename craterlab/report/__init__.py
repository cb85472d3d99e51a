"""Reports of runs and sweeps: the study's tables with the paper's numbers, figures, HTML pages.

- :mod:`~craterlab.report.outputs`: what every run writes beside its metrics (``results.json``,
  the HTML retrieval page ``results.html``), also logged to MLflow.
- :mod:`~craterlab.report.runs`: run records loaded from a multirun directory or MLflow.
- :mod:`~craterlab.report.paper`: the numbers the paper publishes, keyed by configuration.
- :mod:`~craterlab.report.tables`: the results table of a run and the paper-layout tables.
- :mod:`~craterlab.report.figures`: mAP vs K, bytes, parameters and shortlist size (matplotlib).
- :mod:`~craterlab.report.pages`: the self-contained HTML page of what was retrieved.
- :mod:`~craterlab.report.cli`: ``python -m craterlab report SOURCE``.
"""

from __future__ import annotations

from craterlab.hookspecs import Register, hookimpl


def report_command(argv: list[str]) -> int:
    """Tables (ours beside the paper's) and figures of a sweep: ``report SOURCE [--out DIR]``."""
    from craterlab.report.cli import main

    return main(argv)


@hookimpl
def register_commands(register: Register) -> None:
    register("report", report_command, "tables beside the paper's numbers, and figures, of a sweep")
