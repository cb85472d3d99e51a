"""``python -m craterlab report SOURCE``: a sweep's table (with the paper's numbers) and figures.

SOURCE is a multirun directory (or one run directory), an MLflow parent run id, or an MLflow
experiment name. The report goes to ``--out`` (default: ``<multirun dir>/report``, or
``outputs/reports/<name>`` for MLflow sources): ``table.md``, ``table.csv`` and the figures
as PNG and SVG (:mod:`craterlab.report.build`, which the sweep callback also calls at the end
of every multirun, attaching the result to the sweep's parent MLflow run).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from craterlab.errors import CraterlabError
from craterlab.report.build import sweep_name, table_name, write_report
from craterlab.report.runs import RunRecord, load_mlflow, load_sweep_dir
from craterlab.results import DEFAULT_STORE, RESULTS_FILE, default_uri


def holds_runs(path: Path) -> bool:
    """Whether ``path`` is a run directory or a multirun directory with finished jobs."""
    return (path / RESULTS_FILE).is_file() or any(path.glob(f"*/{RESULTS_FILE}"))


def find_store(start: Path | None = None) -> str:
    """The MLflow store a report reads by default: $MLFLOW_TRACKING_URI, else the nearest
    ``outputs/mlflow.db`` in ``start`` (the working directory) or a parent, else the default
    store under the working directory (which may not exist: then the error says so)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / DEFAULT_STORE).is_file():
            return f"sqlite:///{folder / DEFAULT_STORE}"
    return default_uri()


def store_root(uri: str) -> Path | None:
    """The outputs/ folder of a SQLite store (reports go beside it), or None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")).parent


def only_dataset(records: Sequence[RunRecord], dataset: str) -> list[RunRecord]:
    """The records of one dataset, or an error naming the datasets there are."""
    kept = [r for r in records if r.view()["dataset"] == dataset]
    if not kept:
        there = ", ".join(sorted({r.view()["dataset"] for r in records}))
        raise CraterlabError(f"No run on dataset {dataset!r}; the runs are on: {there}.")
    return kept


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m craterlab report",
        description="Tables (ours, the paper's, the difference) and figures of a sweep.",
    )
    parser.add_argument("source", help="multirun directory, MLflow parent run id or experiment")
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    parser.add_argument("--table", default=None, help="study table layout (default: the preset's)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else outputs/mlflow.db in this "
        "directory or the nearest parent that has one)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="report only the runs on this dataset (as the table prints it, e.g. "
        "craterbench_r or synthetic-tiny)",
    )
    args = parser.parse_args(list(argv))
    source = Path(args.source)
    if source.is_dir() and holds_runs(source):
        records = load_sweep_dir(source)
        out = args.out or source / "report"
    elif source.is_file():
        raise CraterlabError(f"{source} is a file; pass a multirun or run directory.")
    else:  # an MLflow run id or experiment (a folder of that name without runs is no sweep)
        uri = args.tracking_uri or find_store()
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
            raise CraterlabError(
                f"{args.source!r} is not a folder of finished runs, and there is no MLflow "
                f"store at {uri} to look it up in (none in this directory or its parents). "
                "Pass a multirun directory, or --tracking-uri with the store your runs were "
                "logged to."
            )
        records, name = load_mlflow(args.source, uri)
        base = store_root(uri) or Path("outputs")
        out = args.out or base / "reports" / name.replace("/", "_").replace(" ", "_")
    if args.dataset is not None:
        records = only_dataset(records, args.dataset)
    paths, markdown = write_report(records, out, args.table)
    print(markdown)
    print(f"{sweep_name(records, args.table or table_name(records))}")
    for p in paths:
        print(f"  wrote {p}")
    return 0
