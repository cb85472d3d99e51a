"""Catalog deduplication: pairs of craters in one index that are likely the same crater.

Candidate pairs (stage-1 neighbours, or the geometry pre-filter) are scored with the index's
matcher (see :mod:`craterlab.workflows.pairs`); pairs at or above a threshold are kept and
joined into connected groups. The threshold is given, or calibrated from labels: a manifest
whose ``crater_id`` names the true crater of each crop. Calibration sweeps the threshold over
the candidate scores (precision-recall curve; recall counts every labelled duplicate pair,
also those stage 1 never proposed) and picks the operating point with the best F1, or the
highest recall at ``min_precision``.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from craterlab.errors import ConfigError, DataError
from craterlab.workflows.geometry import GeometryFilter
from craterlab.workflows.items import NO_PLACE, Place, crater_places, load_items
from craterlab.workflows.options import finite, fraction, positive_int
from craterlab.workflows.pairs import (
    CraterPair,
    candidate_rows,
    crater_pairs,
    pair_scores,
    write_pairs_csv,
)

if TYPE_CHECKING:
    from craterlab.workflows.api import CraterIndex

log = logging.getLogger("craterlab")


@dataclass
class OperatingPoint:
    threshold: float
    precision: float
    recall: float
    f1: float
    positives: int
    """Labelled duplicate crater pairs in the index (the recall denominator)."""


@dataclass
class Calibration:
    """The precision-recall curve over candidate thresholds and the chosen point."""

    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    chosen: OperatingPoint

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Precision-recall curve with the chosen operating point, as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
        ax.plot(self.recall, self.precision, lw=1.5, label="candidate pairs")
        c = self.chosen
        ax.scatter(
            [c.recall],
            [c.precision],
            color="red",
            zorder=3,
            label=f"threshold {c.threshold:.3f} (P {c.precision:.2f}, R {c.recall:.2f})",
        )
        ax.set(
            xlabel="recall",
            ylabel="precision",
            xlim=(0, 1.02),
            ylim=(0, 1.02),
            title=f"dedup calibration ({c.positives} labelled duplicate pairs)",
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p)
        plt.close(fig)
        return p


@dataclass
class DedupResult:
    pairs: list[CraterPair]
    groups: list[list[str]]
    threshold: float
    candidates: int
    calibration: Calibration | None = None
    group_of: dict[str, int] = field(default_factory=dict)
    places: dict[str, Place] = field(default_factory=dict)
    """crater -> map position, for the craters of the groups that have one."""

    def group_places(self, g: int) -> list[Place]:
        """Map positions of group ``g``'s members, in the order of ``groups[g]`` (NaNs for a
        member without one)."""
        return [self.places.get(c, NO_PLACE) for c in self.groups[g]]

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        group = self.group_of.get
        return write_pairs_csv(path, self.pairs, "group", lambda q: group(q.crater_a, ""))

    def groups_csv(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(GROUP_FIELDS)
            for g, members in enumerate(self.groups):
                places = self.group_places(g)
                w.writerow(
                    (g, len(members), ";".join(members), *(_members(places, i) for i in range(3)))
                )
        return p


GROUP_FIELDS = ("group", "size", "craters", "lat", "lon", "diameter_km")
"""groups.csv: ``lat, lon, diameter_km`` list the members' values in the order of
``craters`` (';'-separated, an empty entry for a member without a map position; an empty cell
when no member has one)."""


def _members(places: list[Place], i: int) -> str:
    """Field ``i`` of every member, ';'-joined in member order (empty when none is placed)."""
    cells = [p.cells()[i] for p in places]
    return ";".join(cells) if any(cells) else ""


def dedup(
    index: CraterIndex,
    *,
    threshold: float | None = None,
    labels: str | os.PathLike[str] | Mapping[str, str] | None = None,
    min_precision: float | None = None,
    neighbors: int = 10,
    geometry: GeometryFilter | None = None,
) -> DedupResult:
    """Likely duplicate craters of ``index`` (see the module docstring)."""
    finite("threshold", threshold)
    fraction("min_precision", min_precision)
    positive_int("neighbors", neighbors)
    index.require_items()
    flt = geometry or GeometryFilter()
    if threshold is None and labels is None:
        raise ConfigError(
            "dedup needs a score threshold (--threshold T) or labels to calibrate one from "
            "(--labels MANIFEST.csv, whose crater_id names the true crater of each crop)."
        )
    ia, ib = candidate_rows(index, index, neighbors, flt, same=True)
    scores = pair_scores(index, index, ia, ib)
    pairs = crater_pairs(index, index, ia, ib, scores, same=True)
    calibration = None
    if labels is not None:
        truth = _labels(index, labels)
        calibration = calibrate(pairs, truth, min_precision)
        if threshold is None:
            threshold = calibration.chosen.threshold
    assert threshold is not None
    kept = [p for p in pairs if p.score >= threshold]
    groups = connected_groups(kept)
    group_of = {c: g for g, members in enumerate(groups) for c in members}
    places = {c: p for c, p in crater_places(index.items).items() if c in group_of}
    return DedupResult(kept, groups, float(threshold), len(pairs), calibration, group_of, places)


def _labels(
    index: CraterIndex, labels: str | os.PathLike[str] | Mapping[str, str]
) -> dict[str, str]:
    """crater (catalog entry) of the index -> true label, from item labels."""
    if isinstance(labels, Mapping):
        by_item = {str(k): str(v) for k, v in labels.items()}
    else:
        by_item = {it.id: it.crater for it in load_items(labels)}
    out: dict[str, str] = {}
    conflicts = []
    for it in index.items:
        if it.id not in by_item:
            continue
        label = by_item[it.id]
        if out.setdefault(it.crater, label) != label:
            conflicts.append(f"{it.crater}: {out[it.crater]!r} and {label!r}")
    if conflicts:
        raise DataError(
            "The labels give crops of one catalog entry different craters: "
            + "; ".join(conflicts[:10])
            + ". Fix the labels (one crater_id per catalog entry)."
        )
    if len(set(out.values())) == len(out):
        raise DataError(
            f"The labels cover {len(out)} catalog entries but no two share a crater_id, so "
            "there are no duplicates to calibrate on. Label known duplicates with the same "
            "crater_id."
        )
    return out


def calibrate(
    pairs: list[CraterPair], truth: Mapping[str, str], min_precision: float | None = None
) -> Calibration:
    """Precision and recall of 'score >= t' for every candidate score t."""
    by_label: dict[str, int] = {}
    for label in truth.values():
        by_label[label] = by_label.get(label, 0) + 1
    positives = sum(n * (n - 1) // 2 for n in by_label.values())
    scored = [
        (p.score, truth[p.crater_a] == truth[p.crater_b])
        for p in pairs
        if p.crater_a in truth and p.crater_b in truth
    ]
    if not scored:
        raise DataError("No candidate pair has labels on both sides; label more craters.")
    s = np.array([x[0] for x in scored])
    y = np.array([x[1] for x in scored], dtype=bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    precision = tp / np.arange(1, len(y) + 1)
    recall = tp / max(positives, 1)
    last = np.r_[s[1:] != s[:-1], True]  # one point per distinct threshold
    s, precision, recall = s[last], precision[last], recall[last]
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    if min_precision is not None:
        ok = np.flatnonzero(precision >= min_precision)
        if not len(ok):
            raise DataError(
                f"No threshold reaches precision {min_precision:.2f} on the labelled pairs "
                f"(best {precision.max():.2f}); lower --min-precision."
            )
        i = int(ok[np.argmax(recall[ok])])
    else:
        i = int(np.argmax(f1))
    chosen = OperatingPoint(
        float(s[i]), float(precision[i]), float(recall[i]), float(f1[i]), positives
    )
    return Calibration(s, precision, recall, chosen)


def connected_groups(pairs: list[CraterPair]) -> list[list[str]]:
    """Connected components of the pair graph (union-find), largest first."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        ra, rb = find(p.crater_a), find(p.crater_b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[str, list[str]] = {}
    for x in parent:
        groups.setdefault(find(x), []).append(x)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g))


__all__ = ["Calibration", "DedupResult", "calibrate", "connected_groups", "dedup"]
