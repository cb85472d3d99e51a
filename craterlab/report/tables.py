"""Tables: the results table a run prints, and a sweep's table in the paper's layout.

A sweep table has one row per run and retrieval mode (or per group, keeping the best run of
a ``best_over`` field, as the paper's "best pooling" columns do) and, per metric, our value,
the paper's value and the difference. Runs with untrained weights are marked as the run
marks them.
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from craterlab.report.marks import UNTRAINED_NOTE, weights_mark
from craterlab.report.paper import PaperValue, lookup, run_key
from craterlab.report.runs import RunRecord, varying_fields
from craterlab.results import is_untrained

# ------------------------------------------------------------------ the run's results table


def _cell(value: float | None, fmt: str, width: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    return f"{value:>{width}{fmt}}"


def truncation_note(results: Mapping[str, Mapping[str, float]]) -> str | None:
    """A line saying mAP was computed on a truncated list, or None for the whole gallery."""
    for m in results.values():
        depth, size = m.get("depth"), m.get("gallery_size")
        if depth is not None and size is not None and depth < size:
            return (
                f"NOTE: mAP over the top {depth:.0f} of {size:.0f} gallery images (depth="
                f"{depth:.0f}, truncated): it can only be lower than the whole-gallery mAP "
                "of the study (depth=all)."
            )
    return None


def format_run_table(
    results: Mapping[str, Mapping[str, float]], weights: str, backbone: str, tokens: str
) -> str:
    """The results table printed at the end of a run."""
    columns = ["R@1", "R@5", "R@10", "mAP", "R@S", "bytes/img", "ms/query"]
    header = f"{'mode':<12}" + "".join(f"{c:>11}" for c in columns) + f"{'mAP 95% CI':>18}"
    lines = [
        "",
        f"Results — backbone {backbone} {weights_mark(weights)}, tokens {tokens}",
        header,
        "-" * len(header),
    ]
    for mode, m in results.items():
        row = "".join(_cell(m.get(c), ".3f", 11) for c in ("R@1", "R@5", "R@10", "mAP", "R@S"))
        row += _cell(m.get("bytes_per_image"), ".0f", 11) + _cell(m.get("ms_per_query"), ".3f", 11)
        lo, hi = m.get("mAP_ci_low"), m.get("mAP_ci_high")
        ci = f"[{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "-"
        lines.append(f"{mode:<12}{row}{ci:>18}")
    alt = ["recall@1", "recall@10", "mAP_identity", "mAP_retrieved"]
    lines.append(f"{'also logged':<12}" + "".join(f"{c:>15}" for c in alt))
    for mode, m in results.items():
        lines.append(f"{mode:<12}" + "".join(_cell(m.get(c), ".3f", 15) for c in alt))
    note = truncation_note(results)
    if note:
        lines.append(note)
    if is_untrained(weights):
        lines.append(UNTRAINED_NOTE)
    return "\n".join(lines)


# ------------------------------------------------------------------ the paper-layout tables


@dataclass(frozen=True)
class Layout:
    """How a study table is laid out: label fields, modes, metric columns, best-of field."""

    title: str
    rows: tuple[str, ...] = ()  # view fields naming a row; () = what the sweep varied
    modes: tuple[str, ...] = ()  # () = every mode the runs have
    metrics: tuple[str, ...] = ("R@1", "R@10", "mAP")
    best_over: tuple[str, ...] = ()  # keep the run with the best `best_by` over these fields
    best_by: str = "mAP"  # the paper's "best pooling" of Tables 2 / 5 is the best R@1
    # Side by side instead of one row per mode: (mode, column label template over the run's
    # view), e.g. ("single", "{pooling}") puts each pooling's single-vector metrics in its
    # own columns. Runs whose labels agree share a row; modes not listed are left out.
    columns: tuple[tuple[str, str], ...] = ()


LI = ("exhaustive",)
SV = ("single",)
RANKS = ("R@1", "R@5", "R@10", "mAP")
TABLE2 = Layout("", ("backbone",), SV, RANKS, best_over=("pooling",), best_by="R@1")
ASSIGNMENT = Layout("", ("k", "aggregator", "assign"), LI, ("R@1", "mAP"), best_over=("seeds",))
# Keyed by the presets' report.table (conf/experiment/*.yaml), named as the paper numbers them.
LAYOUTS: dict[str, Layout] = {
    "table2": replace(TABLE2, title="Table 2: frozen backbones, single vector, best pooling"),
    "table5": replace(TABLE2, title="Table 5: all 30 frozen backbones, best pooling"),
    "fig2": Layout(
        "Fig 2: mAP against backbone parameters (best pooling)",
        ("backbone",),
        SV,
        ("mAP",),
        best_over=("pooling",),
        best_by="R@1",
    ),
    "table6": Layout("Table 6: pooling per ViT", ("backbone", "pooling"), SV, ("R@1", "mAP")),
    "table7": Layout("Table 7: CNN backbones, GAP and GeM", ("backbone", "pooling"), SV, RANKS),
    "headline_k16": Layout("Headline: K=16, raw selection vs instance tokens", ("tokens",), LI),
    "fig3": Layout("Fig 3: mAP against K", ("backbone", "tokens", "k"), LI, ("mAP",)),
    "table3": Layout(
        "Table 3: aggregation baselines at matched bytes",
        ("backbone", "tokens", "pooling", "k"),
        ("single", "exhaustive"),
        ("R@1", "mAP", "bytes_per_image"),
    ),
    "fig4": Layout(
        "Fig 4: mAP against bytes per image",
        ("backbone", "tokens", "k"),
        ("single", "exhaustive"),
        ("mAP", "bytes_per_image"),
    ),
    "table4": Layout(
        "Table 4: two-stage retrieval against full late interaction",
        ("backbone", "shortlist"),
        ("single", "two_stage", "exhaustive"),
        ("R@1", "mAP", "R@S", "ms_per_query", "mAP_recovered"),
    ),
    "table8": Layout(
        "Table 8: token selection at K=64", ("backbone", "selector"), LI, ("R@1", "mAP")
    ),
    "table9": replace(ASSIGNMENT, title="Table 9: assignment, ViT-S/16 DINO (best seed per K)"),
    "table10": replace(
        ASSIGNMENT, title="Table 10: assignment, ViT-S/16 MarsDINO (best seed per K)"
    ),
    "table11": Layout(
        "Table 11: seeds, attention vs FPS (best assignment)",
        ("backbone", "seeds", "k"),
        LI,
        ("R@1", "mAP"),
        best_over=("assign",),
    ),
    "table12": Layout(
        "Table 12: token quantization, K=32",
        ("backbone", "quantizer"),
        LI,
        ("mAP", "bytes_per_image"),
    ),
    "table13": Layout(
        "Table 13: late interaction vs pooled instance tokens (best assignment)",
        ("backbone", "k", "pooling"),
        ("exhaustive", "single"),
        ("mAP",),
        best_over=("assign",),
    ),
    "finetune": Layout(
        "Fine-tuning baselines against the frozen backbone: CLS, GeM and late interaction",
        ("train", "augment"),
        ("single", "exhaustive"),
        ("R@1", "mAP"),
        columns=(("single", "{pooling}"), ("exhaustive", "LI K={k}")),
    ),
}
DEFAULT_METRICS = ("R@1", "R@10", "mAP", "R@S", "bytes_per_image", "ms_per_query")


@dataclass
class Table:
    """A rendered-agnostic table: label columns, per-metric (ours, paper, diff), notes."""

    title: str
    label_fields: list[str]
    metrics: list[str]
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    confidence: bool = True  # a "mAP 95% CI" column (one mode per row)


def layout_for(name: str | None, records: Sequence[RunRecord]) -> Layout:
    """The layout of a study table, or a generic one over what the sweep varied."""
    if name and name in LAYOUTS:
        return LAYOUTS[name]
    return Layout(f"Sweep results{f' ({name})' if name else ''}", metrics=DEFAULT_METRICS)


def comparable(record: RunRecord) -> bool:
    """A run's difference from the paper means something: trained weights on CraterBench-R."""
    return not record.untrained and record.view()["dataset"] == "craterbench_r"


def mode_view(view: Mapping[str, str]) -> dict[str, str]:
    """A run's view in one mode (``view["mode"]``): fields the mode does not use are "-" (the
    paper's key, :func:`craterlab.report.paper.run_key`), so stage 1 of every S is one row."""
    key = run_key(view)
    out = dict(view)
    for f in ("pooling", "selector", "aggregator", "seeds", "assign", "k", "quantizer"):
        if key[f] == "-":
            out[f] = "-"
    out["shortlist"] = key["shortlist"]
    if view.get("mode") == "single" and not key["pooling"].startswith("instance"):
        out["tokens"] = "-"
    return out


def _paper_view(view: Mapping[str, str], layout: Layout) -> dict[str, str]:
    """A best-of row's view as the paper keys it: a best-over assignment is ``best``."""
    if "assign" not in layout.best_over:
        return dict(view)
    return {**view, "assign": "best", "pooling_assign": "best"}


def build_table(records: Sequence[RunRecord], layout: Layout, name: str | None = None) -> Table:
    """Rows of ``records`` in ``layout``, each metric beside the paper's value (``name``: the
    paper table the layout reproduces, whose cells are preferred)."""
    labels = list(layout.rows) or varying_fields(records) or ["backbone"]
    if len({r.view()["dataset"] for r in records}) > 1 and "dataset" not in labels:
        labels = ["dataset", *labels]  # runs on two datasets are never one row or one ranking
    if layout.columns:
        return _side_by_side(records, layout, labels, name)
    candidates = []
    for record in records:
        view = record.view()
        for mode, metrics in record.results.items():
            if layout.modes and mode not in layout.modes:
                continue
            candidates.append((record, mode_view({**view, "mode": mode}), metrics))
    modes = {c[1]["mode"] for c in candidates}
    label_fields = labels + (["mode"] if len(modes) > 1 else [])
    # one row per (labels, weights status): a mode that does not use a swept field (stage 1
    # does not use S) gives one row, not one per job
    grouped: dict[tuple, tuple] = {}
    best_by = layout.best_by if layout.best_over else None
    duplicates: list[str] = []
    for cand in candidates:
        key = (*(cand[1][f] for f in label_fields), cand[0].untrained)
        if key not in grouped:
            grouped[key] = cand
        elif best_by is not None:
            score = cand[2].get(best_by, -math.inf)
            if score > grouped[key][2].get(best_by, -math.inf):
                grouped[key] = cand
        elif cand[2].get("mAP") != grouped[key][2].get("mAP"):
            duplicates.append(
                f"{_label(cand[1], label_fields)}: runs {grouped[key][0].name} and "
                f"{cand[0].name} differ (mAP {grouped[key][2].get('mAP')} vs "
                f"{cand[2].get('mAP')}); the first is shown."
            )
    candidates = list(grouped.values())
    if layout.best_over:
        label_fields = label_fields + [f for f in layout.best_over if f not in label_fields]
    table = Table(layout.title, label_fields, list(layout.metrics), notes=duplicates)
    for record, view, metrics in candidates:
        row: dict = {f: view[f] for f in label_fields}
        row["weights"] = weights_mark(record.weights)
        row["untrained"] = record.untrained
        row["comparable"] = comparable(record)
        row["run"] = record.name
        for metric in layout.metrics:
            ours = metrics.get(metric)
            paper: PaperValue | None = lookup(_paper_view(view, layout), metric, table=name)
            row[metric] = ours
            row[f"{metric} paper"] = paper.text() if paper else None
            row[f"{metric} diff"] = (
                paper.difference(ours) if paper is not None and ours is not None else None
            )
            if paper is not None:
                table.notes.append(f"{metric} of {_label(row, label_fields)}: {paper.source}")
        lo, hi = metrics.get("mAP_ci_low"), metrics.get("mAP_ci_high")
        row["mAP 95% CI"] = f"[{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else None
        row["_depth"] = (metrics.get("depth"), metrics.get("gallery_size"))
        row["_dataset"] = view["dataset"]
        table.rows.append(row)
    table.rows.sort(key=lambda r: tuple(_sort_key(r[f]) for f in label_fields))
    _add_table_notes(table)
    return table


def _side_by_side(
    records: Sequence[RunRecord], layout: Layout, labels: list[str], name: str | None = None
) -> Table:
    """One row per label, each (mode, column label) group of metrics in its own columns.

    Runs whose labels agree share a row (e.g. a CLS and a GeM evaluation of one checkpoint);
    when two of them report one cell differently, the first is kept and a note names both.
    """
    templates = dict(layout.columns)
    groups: dict[str, tuple] = {}  # column label -> sort key (the layout's order, then label)
    rows: dict[tuple, dict] = {}
    notes: list[str] = []
    for record in records:
        view = record.view()
        key = tuple(view[f] for f in labels)
        row = rows.setdefault(key, {**{f: view[f] for f in labels}, "_runs": []})
        row["_runs"].append(record.name)
        row["untrained"] = row.get("untrained", False) or record.untrained
        row["comparable"] = row.get("comparable", True) and comparable(record)
        row.setdefault("_weights", []).append(weights_mark(record.weights))
        row["_dataset"] = view["dataset"]
        for mode, metrics in record.results.items():
            if mode not in templates:
                continue
            group = templates[mode].format(**view)
            groups.setdefault(group, (list(templates).index(mode), _sort_key(group)))
            for metric in layout.metrics:
                column, ours = f"{group} {metric}", metrics.get(metric)
                if column in row:
                    if ours is not None and row[column] is not None and ours != row[column]:
                        notes.append(
                            f"{_label(row, labels)}: runs {row['_source'][column]} and "
                            f"{record.name} differ on {column} ({row[column]} vs {ours}); "
                            "the first is shown."
                        )
                    continue
                row[column] = ours
                row.setdefault("_source", {})[column] = record.name
                row["_depth"] = (metrics.get("depth"), metrics.get("gallery_size"))
                paper = lookup({**view, "mode": mode}, metric, table=name)
                row[f"{column} paper"] = paper.text() if paper else None
                row[f"{column} diff"] = (
                    paper.difference(ours) if paper is not None and ours is not None else None
                )
                if paper is not None:
                    notes.append(f"{column} of {_label(row, labels)}: {paper.source}")
    ordered = sorted(groups, key=groups.__getitem__)
    metrics = [f"{g} {m}" for g in ordered for m in layout.metrics]
    table = Table(layout.title, labels, metrics, notes=notes, confidence=False)
    for row in rows.values():
        marks = list(dict.fromkeys(row.pop("_weights")))
        row["weights"] = " / ".join(marks)
        row["run"] = " ".join(row.pop("_runs"))
        row.pop("_source", None)
        row.setdefault("_depth", (None, None))
        for metric in metrics:
            for column in (metric, f"{metric} paper", f"{metric} diff"):
                row.setdefault(column, None)
        table.rows.append(row)
    table.rows.sort(key=lambda r: tuple(_sort_key(r[f]) for f in labels))
    _add_table_notes(table)
    return table


def _add_table_notes(table: Table) -> None:
    """Truncation, other-dataset and untrained-weights notes, ahead of the paper sources."""
    truncated = {d for r in table.rows for d in [r.pop("_depth")] if d[0] and d[1] and d[0] < d[1]}
    if truncated:
        depths = ", ".join(sorted({f"{d:.0f} of {n:.0f}" for d, n in truncated}))
        table.notes.insert(0, f"mAP on a truncated ranked list (depth: top {depths} images).")
    datasets = sorted({str(r.get("_dataset")) for r in table.rows} - {"craterbench_r"})
    if datasets:
        table.notes.insert(
            0,
            f"Dataset {', '.join(datasets)}, not CraterBench-R: the paper's numbers are shown "
            "for reference only.",
        )
    for row in table.rows:
        row.pop("_dataset", None)
    if any(r["untrained"] for r in table.rows):
        table.notes.insert(0, UNTRAINED_NOTE.removeprefix("NOTE: ").capitalize())
    if any(not r.get("comparable", True) for r in table.rows):
        table.notes.insert(
            0,
            "A difference marked (not comparable) is a run with untrained weights or on a "
            "dataset other than CraterBench-R: the paper's value is kept beside it, but the "
            "difference says nothing about the reproduction.",
        )


def _sort_key(value: str) -> tuple:
    """Numbers in numeric order, then text; "none" / "-" (a frozen or absent part, the
    reference row) first."""
    if value in ("none", "-"):
        return (-1, 0.0, "")
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _label(row: Mapping, fields: Sequence[str]) -> str:
    return ", ".join(f"{f}={row[f]}" for f in fields)


def _num(value: float | None, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if metric.startswith("bytes") or abs(value) >= 100:
        return f"{value:,.0f}"
    if metric.endswith("_ms") or metric == "ms_per_query":
        return f"{value:.2f}"
    return f"{value:.3f}"


def _diff(value: float | None, metric: str) -> str:
    if value is None:
        return "—"
    return ("+" if value >= 0 else "") + _num(value, metric)


def columns(table: Table) -> list[str]:
    """The column names of the CSV and Markdown renderings."""
    cols = list(table.label_fields) + ["weights"]
    for metric in table.metrics:
        cols += [metric, f"{metric} paper", f"{metric} diff"]
    return cols + (["mAP 95% CI"] if table.confidence else [])


def to_markdown(table: Table) -> str:
    """The table in Markdown; a metric's paper and diff columns are left out when no row has
    a paper value for it (the CSV keeps every column)."""
    empty = {
        f"{m} {suffix}"
        for m in table.metrics
        if all(row.get(f"{m} paper") is None for row in table.rows)
        for suffix in ("paper", "diff")
    }
    cols = [c for c in columns(table) if c not in empty]
    lines = [f"### {md_cell(table.title)}", "", "| " + " | ".join(map(md_cell, cols)) + " |"]
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for row in table.rows:
        cells = []
        for col in cols:
            base = col.removesuffix(" diff")
            if col in table.metrics:
                cells.append(_num(row[col], col))
            elif col.endswith(" diff") and base in table.metrics:
                diff = _diff(row[col], base)
                comparable = row.get("comparable", True) or row[col] is None
                cells.append(diff if comparable else f"{diff} (not comparable)")
            else:
                cells.append("—" if row.get(col) is None else md_cell(row[col]))
        lines.append("| " + " | ".join(cells) + " |")
    if table.notes:
        lines.append("")
        lines += [f"- {html.escape(str(n), quote=False)}" for n in dict.fromkeys(table.notes)]
    return "\n".join(lines) + "\n"


def md_cell(value: object) -> str:
    """Text as one Markdown table cell: HTML escaped (a run's strings, such as its weights,
    come from its config or a tracking store and may carry markup), ``|`` escaped, one line."""
    text = html.escape(str(value), quote=False)
    return " ".join(text.replace("|", "\\|").split())


def to_csv(table: Table) -> str:
    cols = columns(table) + ["comparable", "run"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(cols)
    for row in table.rows:
        writer.writerow(["" if row.get(c) is None else row[c] for c in cols])
    return buffer.getvalue()


def write_table(table: Table, out_dir: Path, stem: str = "table") -> list[Path]:
    """``<stem>.md`` and ``<stem>.csv`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, cs = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    md.write_text(to_markdown(table))
    cs.write_text(to_csv(table))
    return [md, cs]
