"""Reports of runs and sweeps: the study's tables with the paper's numbers, figures, HTML pages.

- :mod:`~craterlab.report.outputs`: what every run writes beside its metrics (``results.json``,
  the HTML retrieval page ``results.html``), also logged to MLflow.
- :mod:`~craterlab.report.runs`: run records loaded from a multirun directory or MLflow.
- :mod:`~craterlab.report.paper`: the numbers the paper publishes, keyed by configuration.
- :mod:`~craterlab.report.tables`: the results table of a run and the paper-layout tables.
- :mod:`~craterlab.report.figures`: mAP vs K, bytes, parameters and shortlist size (matplotlib).
- :mod:`~craterlab.report.pages`: the self-contained HTML page of what was retrieved.
- :mod:`~craterlab.report.build`: the report of a set of runs (table and figures).
- ``python -m craterlab report SOURCE`` is :mod:`craterlab.commands.report`.
"""

from __future__ import annotations
