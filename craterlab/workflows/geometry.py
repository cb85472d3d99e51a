"""The geometry pre-filter of dedup and match: two crops can be the same crater only if their
centres are close and their diameters similar.

Positions and diameters are pixels of the source image (the ``x, y, diameter`` columns that
``craterlab ingest`` writes). Matching two observations with the filter assumes both are in
one frame (co-registered tiles, or map coordinates written into the manifests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from craterlab.data.base import listing
from craterlab.errors import DataError
from craterlab.workflows.items import Item


@dataclass(frozen=True)
class GeometryFilter:
    """``max_distance``: centre distance in pixels; ``max_offset``: centre distance in units
    of the larger diameter; ``max_ratio``: larger / smaller diameter. None: not checked."""

    max_distance: float | None = None
    max_offset: float | None = None
    max_ratio: float | None = None

    def __post_init__(self) -> None:
        from craterlab.workflows.options import geometry

        geometry(self.max_distance, self.max_offset, self.max_ratio)

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.max_distance, self.max_offset, self.max_ratio))

    def radius(self, diameters: np.ndarray) -> float:
        """The largest centre distance any pair may have (for the spatial grid)."""
        r = math.inf
        if self.max_distance is not None:
            r = self.max_distance
        if self.max_offset is not None:
            r = min(r, self.max_offset * float(np.max(diameters, initial=0.0)))
        return r

    def keep(
        self,
        xa: np.ndarray,
        ya: np.ndarray,
        da: np.ndarray,
        xb: np.ndarray,
        yb: np.ndarray,
        db: np.ndarray,
    ) -> np.ndarray:
        """Boolean mask over pairs (element-wise arrays) that pass the filter."""
        dist = np.hypot(xa - xb, ya - yb)
        ok = np.ones(dist.shape, dtype=bool)
        if self.max_distance is not None:
            ok &= dist <= self.max_distance
        big, small = np.maximum(da, db), np.minimum(da, db)
        if self.max_offset is not None:
            ok &= dist <= self.max_offset * big
        if self.max_ratio is not None:
            ok &= big <= self.max_ratio * np.maximum(small, 1e-12)
        return ok


def positions(items: Sequence[Item], what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, y, diameter arrays of items; items without them are an error naming them."""
    missing = [it.id for it in items if not it.has_geometry]
    if missing:
        raise DataError(
            f"The geometry filter needs a position and diameter for every item, but "
            f"{len(missing)} item(s) of {what} have none:" + listing(missing) + "\nIndex a "
            "manifest with x, y, diameter columns (python -m craterlab ingest writes them), "
            "or drop the geometry options."
        )
    return (
        np.array([it.x for it in items]),
        np.array([it.y for it in items]),
        np.array([it.diameter for it in items]),
    )


def geometric_pairs(
    a: tuple[np.ndarray, np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray, np.ndarray],
    flt: GeometryFilter,
) -> tuple[np.ndarray, np.ndarray]:
    """(rows of a, rows of b) of every pair that passes the filter, via a spatial grid."""
    xa, ya, da = a
    xb, yb, db = b
    radius = flt.radius(np.concatenate([da, db]))
    if not math.isfinite(radius):  # only a diameter ratio: every pair is a candidate
        ia, ib = np.meshgrid(np.arange(len(xa)), np.arange(len(xb)), indexing="ij")
        ia, ib = ia.ravel(), ib.ravel()
    else:
        cell = max(radius, 1e-9)
        keys_b = np.floor(xb / cell).astype(np.int64), np.floor(yb / cell).astype(np.int64)
        buckets: dict[tuple[int, int], list[int]] = {}
        for j, key in enumerate(zip(*keys_b, strict=True)):
            buckets.setdefault((int(key[0]), int(key[1])), []).append(j)
        pa, pb = [], []
        for i in range(len(xa)):
            cx, cy = int(np.floor(xa[i] / cell)), int(np.floor(ya[i] / cell))
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    for j in buckets.get((cx + dx, cy + dy), ()):
                        pa.append(i)
                        pb.append(j)
        ia, ib = np.array(pa, dtype=np.int64), np.array(pb, dtype=np.int64)
    ok = flt.keep(xa[ia], ya[ia], da[ia], xb[ib], yb[ib], db[ib])
    return ia[ok], ib[ok]
