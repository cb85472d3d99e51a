"""``python -m craterlab report SOURCE``: a sweep's table (with the paper's numbers) and figures.

SOURCE is a multirun directory (or one run directory), an MLflow parent run id, or an MLflow
experiment name. The report goes to ``--out`` (default: ``<multirun dir>/report``, or
``outputs/reports/<name>`` for MLflow sources): ``table.md``, ``table.csv`` and the figures
as PNG and SVG (:mod:`craterlab.report.build`, which the sweep callback also calls at the end
of every multirun, attaching the result to the sweep's parent MLflow run).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from craterlab.errors import CraterlabError
from craterlab.report.build import sweep_name, table_name, write_report
from craterlab.report.runs import load_mlflow, load_sweep_dir
from craterlab.results import default_uri


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m craterlab report",
        description="Tables (ours, the paper's, the difference) and figures of a sweep.",
    )
    parser.add_argument("source", help="multirun directory, MLflow parent run id or experiment")
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    parser.add_argument("--table", default=None, help="study table layout (default: the preset's)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: outputs/)")
    args = parser.parse_args(list(argv))
    source = Path(args.source)
    if source.is_dir():
        records = load_sweep_dir(source)
        out = args.out or source / "report"
    elif source.exists():
        raise CraterlabError(f"{source} is a file; pass a multirun or run directory.")
    else:
        records, name = load_mlflow(args.source, args.tracking_uri or default_uri())
        out = args.out or Path("outputs") / "reports" / name.replace("/", "_").replace(" ", "_")
    paths, markdown = write_report(records, out, args.table)
    print(markdown)
    print(f"{sweep_name(records, args.table or table_name(records))}")
    for p in paths:
        print(f"  wrote {p}")
    return 0
