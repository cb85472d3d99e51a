"""``python -m craterlab report SOURCE``: a sweep's table (with the paper's numbers) and figures.

SOURCE is a multirun directory (or one run directory), an MLflow parent run id, or an MLflow
experiment name. The report goes to ``--out`` (default: ``<multirun dir>/report``, or
``outputs/reports/<name>`` for MLflow sources): ``table.md``, ``table.csv`` and the figures
as PNG and SVG. The sweep callback calls :func:`write_report` at the end of every multirun
and attaches the result to the sweep's parent MLflow run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from craterlab.errors import CraterlabError
from craterlab.report.figures import write_figures
from craterlab.report.runs import RunRecord, load_mlflow, load_sweep_dir, varying_fields
from craterlab.report.tables import build_table, layout_for, to_markdown, write_table


def table_name(records: Sequence[RunRecord]) -> str | None:
    """The study table the runs' preset reproduces (``report.table``), if they agree."""
    names = {r.config.get("report.table") for r in records} - {None, "None", "null", ""}
    return names.pop() if len(names) == 1 else None


def sweep_name(records: Sequence[RunRecord], table: str | None = None) -> str:
    """A name that says what the sweep varied: 'table4: backbone x shortlist (8 runs)'."""
    varied = " x ".join(varying_fields(records)) or "one configuration"
    return f"{table + ': ' if table else ''}{varied} ({len(records)} runs)"


def write_report(
    records: Sequence[RunRecord], out_dir: Path, table: str | None = None
) -> tuple[list[Path], str]:
    """Write the table (Markdown + CSV) and figures; returns the files and the Markdown."""
    table = table or table_name(records)
    built = build_table(records, layout_for(table, records), table)
    paths = write_table(built, Path(out_dir))
    paths += write_figures(records, Path(out_dir))
    return paths, to_markdown(built)


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
        from craterlab.mlflow_tracker import default_uri

        records, name = load_mlflow(args.source, args.tracking_uri or default_uri())
        out = args.out or Path("outputs") / "reports" / name.replace("/", "_").replace(" ", "_")
    paths, markdown = write_report(records, out, args.table)
    print(markdown)
    print(f"{sweep_name(records, args.table or table_name(records))}")
    for p in paths:
        print(f"  wrote {p}")
    return 0
