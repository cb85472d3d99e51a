"""A report of runs: the study table beside the paper's numbers (Markdown + CSV) and figures.

Used by ``python -m craterlab report`` (:mod:`craterlab.commands.report`) and, at the end of every
multirun, by :func:`craterlab.sweeps.report.finish_sweep`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from craterlab.report.figures import write_figures
from craterlab.report.runs import RunRecord, varying_fields
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
