"""The numbers the CraterBench-R paper publishes, keyed so a report finds them for a run.

The data live in ``paper_numbers.yaml`` beside this module (its header says which tables are
incomplete and why). A value matches a run when every field of its ``match`` equals the
run's view field (:func:`craterlab.report.runs.run_view`, plus ``mode``); a list in ``match``
accepts any of its values. When several values match, the most specific one wins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from craterlab.errors import CraterlabError

DATA_FILE = Path(__file__).resolve().parent / "paper_numbers.yaml"


@dataclass(frozen=True)
class PaperValue:
    """One published number: a value, or a [low, high] range (a range or a rounded figure)."""

    table: str
    match: tuple[tuple[str, tuple[str, ...]], ...] | None
    metric: str
    value: float | None
    low: float | None
    high: float | None
    source: str

    def matches(self, view: Mapping[str, str], metric: str) -> bool:
        if self.match is None or metric != self.metric:
            return False
        return all(str(view.get(key, "-")) in allowed for key, allowed in self.match)

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


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if abs(x) < 10 else f"{x:,.1f}".removesuffix(".0")


def _parse(entry: Mapping, index: int, path: Path) -> PaperValue:
    try:
        match = entry.get("match")
        parsed = (
            None
            if match is None
            else tuple(
                (str(k), tuple(str(x) for x in (v if isinstance(v, list) else [v])))
                for k, v in match.items()
            )
        )
        value = entry.get("value")
        low, high = entry.get("low"), entry.get("high")
        if value is None and (low is None or high is None):
            raise ValueError("needs `value`, or both `low` and `high`")
        return PaperValue(
            table=str(entry["table"]),
            match=parsed,
            metric=str(entry["metric"]),
            value=None if value is None else float(value),
            low=None if low is None else float(low),
            high=None if high is None else float(high),
            source=str(entry.get("source", "")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CraterlabError(
            f"{path}: value #{index + 1} is malformed ({exc}). Each value needs table, match "
            "(a mapping or null), metric, and value or low/high."
        ) from exc


@lru_cache(maxsize=4)
def load_paper_numbers(path: Path = DATA_FILE) -> tuple[PaperValue, ...]:
    """Every value of the data file (cached)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    return tuple(_parse(e, i, Path(path)) for i, e in enumerate(data.get("values") or []))


def incomplete_tables(path: Path = DATA_FILE) -> list[str]:
    """Tables the data file declares incomplete (the paper's full text was not available)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    return [str(t) for t in data.get("incomplete_tables") or []]


def lookup(
    view: Mapping[str, str], metric: str, values: Sequence[PaperValue] | None = None
) -> PaperValue | None:
    """The paper's value of ``metric`` for a run view (with ``mode``), or None."""
    found = [v for v in (values or load_paper_numbers()) if v.matches(view, metric)]
    if not found:
        return None
    return max(found, key=lambda v: len(v.match or ()))
