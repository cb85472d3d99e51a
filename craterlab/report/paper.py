"""The numbers the CraterBench-R paper publishes, one cell per number, keyed by configuration.

The data live in ``paper_numbers.yaml`` beside this module: every cell of Tables 2-13 and the
figures the text quotes. :func:`load_cells` expands the file into :class:`PaperCell` objects,
each with a value for every field of :data:`KEYS`. A run is compared with a cell only when
the run's key (:func:`run_key`: its view, with the fields its retrieval mode does not use
set to ``"-"``) equals the cell's key in every field and the metric is the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from craterlab.errors import CraterlabError

DATA_FILE = Path(__file__).resolve().parent / "paper_numbers.yaml"
# The configuration fields of a cell, in this order; "-" = the field does not apply.
KEYS = (
    "backbone",
    "weights",
    "pooling",
    "selector",
    "aggregator",
    "seeds",
    "assign",
    "k",
    "quantizer",
    "shortlist",
    "mode",
    "metric",
)
_RESERVED = {"label", "values", "by_column"}


@dataclass(frozen=True)
class PaperCell:
    """One published number (a value, or a [low, high] range for a range or rounded figure)."""

    table: str  # "table2" ... "table13", or "text"
    key: tuple[tuple[str, str], ...]  # (field, value) for every field of KEYS
    value: float | None
    low: float | None = None
    high: float | None = None
    label: str = ""  # the paper's row label (tables) or section (text)
    column: str = ""  # the paper's column group

    @property
    def fields(self) -> dict[str, str]:
        return dict(self.key)

    @property
    def metric(self) -> str:
        return self.fields["metric"]

    @property
    def source(self) -> str:
        if self.table == "text":
            return f"paper Sec. {self.label}"
        number = self.table.removeprefix("table")
        where = f"row {self.label}" + (f", {self.column}" if self.column else "")
        return f"paper Table {number}, {where}"

    def matches(self, view: Mapping[str, str], metric: str) -> bool:
        """True when every key field equals the run's (``view`` as :func:`run_key` makes it)."""
        if metric != self.metric:
            return False
        return all(str(view.get(f, "-")) == v for f, v in self.key if f != "metric")

    def difference(self, ours: float) -> float:
        """ours - paper; for a range, 0 inside it and the distance to the nearer bound outside."""
        if self.value is not None:
            return ours - self.value
        assert self.low is not None and self.high is not None
        if ours < self.low:
            return ours - self.low
        if ours > self.high:
            return ours - self.high
        return 0.0

    def text(self) -> str:
        if self.value is not None:
            return _fmt(self.value)
        return f"{_fmt(self.low)}-{_fmt(self.high)}"


# The name reports used before the data file held every cell.
PaperValue = PaperCell


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if abs(x) < 10 else f"{x:,.1f}".removesuffix(".0")


def _key(fields: Mapping[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    unknown = set(fields) - set(KEYS)
    if unknown:
        raise CraterlabError(
            f"{where}: unknown key field(s) {sorted(unknown)}; a cell's key fields are "
            f"{', '.join(KEYS)}."
        )
    if "metric" not in fields:
        raise CraterlabError(f"{where}: no metric. Give each column (or text entry) a metric.")
    return tuple((f, str(fields.get(f, "-"))) for f in KEYS)


def _table_cells(name: str, table: Mapping[str, Any], path: Path) -> list[PaperCell]:
    cells = []
    columns = table.get("columns") or []
    for group in table.get("groups") or []:
        for row in group.get("rows") or []:
            values = row.get("values") or []
            where = f"{path}: {name}, row {row.get('label')!r}"
            if len(values) != len(columns):
                raise CraterlabError(
                    f"{where} has {len(values)} values for {len(columns)} columns; give one "
                    "value per column (null where the paper prints a dash)."
                )
            row_key = {k: v for k, v in row.items() if k not in _RESERVED}
            for column, value in zip(columns, values, strict=True):
                if value is None:
                    continue
                col = dict(column)
                group_name = str(col.pop("group", ""))
                by_column = (row.get("by_column") or {}).get(group_name, {})
                fields = {**table.get("key", {}), **group.get("key", {}), **row_key}
                fields.update({**col, **by_column})
                cells.append(
                    PaperCell(
                        table=name,
                        key=_key(fields, where),
                        value=float(value),
                        label=str(row.get("label")),
                        column=" ".join(x for x in (group_name, col["metric"]) if x),
                    )
                )
    return cells


def _text_cell(entry: Mapping[str, Any], index: int, path: Path) -> PaperCell:
    where = f"{path}: text entry #{index + 1}"
    fields = {k: v for k, v in entry.items() if k not in {"section", "value", "low", "high"}}
    value, low, high = entry.get("value"), entry.get("low"), entry.get("high")
    if value is None and (low is None or high is None):
        raise CraterlabError(f"{where} needs `value`, or both `low` and `high`.")
    return PaperCell(
        table="text",
        key=_key(fields, where),
        value=None if value is None else float(value),
        low=None if low is None else float(low),
        high=None if high is None else float(high),
        label=str(entry.get("section", "")),
    )


@lru_cache(maxsize=4)
def load_cells(path: Path = DATA_FILE) -> tuple[PaperCell, ...]:
    """Every cell of the data file: the tables' in table order, then the text's (cached)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    cells: list[PaperCell] = []
    for name, table in (data.get("tables") or {}).items():
        cells += _table_cells(str(name), table, Path(path))
    cells += [_text_cell(e, i, Path(path)) for i, e in enumerate(data.get("text") or [])]
    return tuple(cells)


def load_paper_numbers(path: Path = DATA_FILE) -> tuple[PaperCell, ...]:
    """Every cell of the data file (the name earlier reports used)."""
    return load_cells(path)


def table_titles(path: Path = DATA_FILE) -> dict[str, str]:
    """The title of each table of the data file, by its name (``table4`` ...)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    return {str(k): str(v.get("title", k)) for k, v in (data.get("tables") or {}).items()}


# ------------------------------------------------------------------ runs -> keys


@lru_cache(maxsize=1)
def _backbone_options() -> dict[str, str]:
    """The run view's backbone string (``vit_small_patch16_224.dino``) -> conf/backbone option."""
    from craterlab.plugins import config_dir
    from craterlab.report.runs import run_view

    out = {}
    for path in sorted((config_dir() / "backbone").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        flat = {f"backbone.{k}": v for k, v in cfg.items() if not isinstance(v, dict)}
        out[run_view(flat)["backbone"]] = path.stem
    return out


def weights_key(view: Mapping[str, str]) -> str:
    """``frozen``, or the conf/baseline row that fine-tuned the weights (``triplet_single``)."""
    train = str(view.get("train", "-"))
    if train in ("-", "none"):
        return "frozen"
    augment = str(view.get("augment", "-")).removesuffix("_crop")
    return train if augment in ("-", "none") else f"{train}_{augment}"


def run_key(view: Mapping[str, str]) -> dict[str, str]:
    """The key of a run's results in one retrieval mode (``view`` holds ``mode``).

    Fields the mode does not use are ``"-"``: a single vector has no tokens, K, quantizer or
    shortlist (unless its pooling is built from instance tokens); exhaustive late interaction
    has no single-vector pooling or shortlist; a selector only counts without aggregation.
    """
    mode = str(view.get("mode", "-"))
    backbone = str(view.get("backbone", "-"))
    aggregator = str(view.get("aggregator", "-"))
    key = {f: str(view.get(f, "-")) for f in KEYS if f != "metric"}
    key["backbone"] = _backbone_options().get(backbone, backbone)
    key["weights"] = weights_key(view)
    key["mode"] = mode
    if aggregator != "none":
        key["selector"] = "-"
    if key["selector"] == "all":
        key["k"] = "-"
    if mode == "single":
        instance_pooling = key["pooling"].startswith("instance")
        drop = ["selector", "aggregator", "quantizer", "shortlist"]
        drop += [] if instance_pooling else ["seeds", "assign", "k"]
        if instance_pooling:
            key["seeds"] = str(view.get("pooling_seeds", key["seeds"]))
            key["assign"] = str(view.get("pooling_assign", key["assign"]))
        for f in drop:
            key[f] = "-"
    elif mode == "exhaustive":
        key["pooling"] = key["shortlist"] = "-"
    return key


def lookup(
    view: Mapping[str, str],
    metric: str,
    cells: Sequence[PaperCell] | None = None,
    table: str | None = None,
) -> PaperCell | None:
    """The paper's ``metric`` for a run's results in one mode (``view`` holds ``mode``).

    Every key field must match. When several tables publish the cell, ``table``'s is used
    (the table the run's preset reproduces), else the first table's, then the text's.
    """
    key = run_key(view)
    found = [c for c in (cells or load_cells()) if c.matches(key, metric)]
    if not found:
        return None
    preferred = [c for c in found if c.table == table]
    return (preferred or found)[0]
