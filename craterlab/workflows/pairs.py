"""Candidate pairs between two indexes (or an index and itself) and their scores.

Candidates come from the geometry pre-filter when it is on, else from stage 1 (each item's
``neighbors`` nearest single vectors in the other index). Each candidate pair is scored with
the index's own matcher in both directions (the late-interaction score is asymmetric); the
pair score is their mean. Crops of one crater (the 2x and 3x crops of a catalog entry) are
folded into crater pairs, keeping the best-scoring crop pair. Each pair carries both craters'
map positions (``lat_a, lon_a, diameter_km_a`` and ``_b``, empty in the CSV when a crop has
none), so the CSV joins in a GIS without the layer.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from craterlab.workflows.geometry import GeometryFilter, geometric_pairs, positions
from craterlab.workflows.items import Place

if TYPE_CHECKING:
    from craterlab.workflows.api import CraterIndex

PAIR_BLOCK = 512  # pairs scored per matcher call (bounds the decoded-token memory)


@dataclass
class CraterPair:
    """Two craters (catalog entries), their best crop pair and its score."""

    crater_a: str
    crater_b: str
    item_a: str
    item_b: str
    score: float
    distance: float = float("nan")
    ratio: float = float("nan")
    lat_a: float = float("nan")
    lon_a: float = float("nan")
    diameter_km_a: float = float("nan")
    lat_b: float = float("nan")
    lon_b: float = float("nan")
    diameter_km_b: float = float("nan")

    @property
    def place_a(self) -> Place:
        """Crater A on the map (NaNs when its crop has no map position)."""
        return Place(self.lat_a, self.lon_a, self.diameter_km_a)

    @property
    def place_b(self) -> Place:
        """Crater B on the map."""
        return Place(self.lat_b, self.lon_b, self.diameter_km_b)

    def csv_row(self) -> list[str]:
        """The row under :data:`PAIR_FIELDS` (distance and ratio empty when unknown)."""
        return [
            self.crater_a,
            self.crater_b,
            f"{self.score:.6f}",
            self.item_a,
            self.item_b,
            _optional(self.distance),
            _optional(self.ratio),
        ]


PAIR_FIELDS = ("crater_a", "crater_b", "score", "item_a", "item_b", "distance_px", "diameter_ratio")
PLACE_FIELDS = ("lat_a", "lon_a", "diameter_km_a", "lat_b", "lon_b", "diameter_km_b")
"""Appended after any extra column, so the older columns keep their places."""


def write_pairs_csv(
    path: str | os.PathLike[str],
    pairs: Iterable[CraterPair],
    extra_field: str | None = None,
    extra: Callable[[CraterPair], object] | None = None,
) -> Path:
    """Write pairs as CSV: ``PAIR_FIELDS``, one extra column when given, then
    ``PLACE_FIELDS``; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*PAIR_FIELDS, *([extra_field] if extra_field else []), *PLACE_FIELDS])
        for pair in pairs:
            w.writerow(
                [
                    *pair.csv_row(),
                    *([extra(pair)] if extra else []),
                    *pair.place_a.cells(),
                    *pair.place_b.cells(),
                ]
            )
    return out


def _optional(v: float) -> str:
    return "" if np.isnan(v) else f"{v:.3f}"


def candidate_rows(
    a: CraterIndex, b: CraterIndex, neighbors: int, flt: GeometryFilter, same: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(rows of a, rows of b) to score. ``same``: a and b are one index (no self pairs, no
    pairs within one crater, each unordered pair once)."""
    if flt.active:
        ia, ib = geometric_pairs(
            positions(a.items, "the index"), positions(b.items, "the index"), flt
        )
    else:
        ia, ib = _stage1_pairs(a, b, neighbors + (1 if same else 0))
    if same:
        crater = np.array([it.crater for it in a.items])
        ok = (ia != ib) & (crater[ia] != crater[ib])
        ia, ib = ia[ok], ib[ok]
        lo, hi = np.minimum(ia, ib), np.maximum(ia, ib)
        uniq = np.unique(np.stack([lo, hi], axis=1), axis=0) if len(lo) else np.zeros((0, 2), int)
        ia, ib = uniq[:, 0], uniq[:, 1]
    return ia.astype(np.int64), ib.astype(np.int64)


def _stage1_pairs(a: CraterIndex, b: CraterIndex, neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(neighbors, len(b))
    result = b.gallery.search(a.gallery.vectors, None, mode="single", depth=k)
    rows = result.ranking.indices
    ia = torch.arange(len(rows)).unsqueeze(1).expand_as(rows)
    valid = rows >= 0
    return ia[valid].numpy(), rows[valid].numpy()


def pair_scores(a: CraterIndex, b: CraterIndex, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Mean of the two directional matcher scores of each pair (rows of a, rows of b)."""
    matcher = a.matcher()
    out = np.empty(len(ia), dtype=np.float64)
    for start, stop in _blocks(len(ia)):
        ta = a.stored(torch.from_numpy(ia[start:stop]))[1]
        tb = b.stored(torch.from_numpy(ib[start:stop]))[1]
        own = torch.arange(stop - start).unsqueeze(1)
        ab = matcher.rerank(ta, tb, own)[:, 0]
        ba = matcher.rerank(tb, ta, own)[:, 0]
        out[start:stop] = ((ab + ba) / 2).double().cpu().numpy()
    return out


def _blocks(n: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, PAIR_BLOCK):
        yield start, min(start + PAIR_BLOCK, n)


def crater_pairs(
    a: CraterIndex, b: CraterIndex, ia: np.ndarray, ib: np.ndarray, scores: np.ndarray, same: bool
) -> list[CraterPair]:
    """Fold crop pairs into crater pairs, best crop pair first per crater pair."""
    best: dict[tuple[str, str], CraterPair] = {}
    for i, j, s in zip(ia.tolist(), ib.tolist(), scores.tolist(), strict=True):
        x, y = a.items[i], b.items[j]
        ca, cb, xa, xb = x.crater, y.crater, x, y
        if same and ca > cb:
            ca, cb, xa, xb = cb, ca, y, x
        key = (ca, cb)
        if key not in best or s > best[key].score:
            dist = ratio = float("nan")
            if xa.has_geometry and xb.has_geometry:
                dist = float(np.hypot(xa.x - xb.x, xa.y - xb.y))
                ratio = max(xa.diameter, xb.diameter) / max(min(xa.diameter, xb.diameter), 1e-12)
            best[key] = CraterPair(
                ca, cb, xa.id, xb.id, float(s), dist, ratio, *xa.place, *xb.place
            )
    return sorted(best.values(), key=lambda p: -p.score)
