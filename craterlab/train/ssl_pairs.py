"""Views of one place from different images: the pairing behind ``pretrain.pair_views``.

The query views of a crater differ from its gallery crops mostly by the sun, and no
augmentation of one image can relight a surface. Repeat orbital coverage can: two images of
the same place under different illumination. With pairing on, one batch element is a *place*
(a group of images) and its DINO views are drawn from different images of it: the two global
crops from two distinct images, each local crop from any image of the place. The student then
learns to predict, from one illumination, the teacher's output on another.

Places come from where the images are, never from crater labels:

- ``place``: an explicit place key. A manifest's optional ``place`` column (any text; equal
  values are one place), or the dataset's own ``place_of(record)`` (the synthetic benchmark:
  the catalogue crater a rendering is aimed at, so there place == identity).
- ``coordinates``: image centres within ``pair_radius`` of each other are one place (joined
  transitively: single linkage over a KD-tree, scipy). Centres come from a manifest's
  ``lat, lon, crs`` columns (what ``ingest`` writes from a georeferenced mosaic; distance in
  km on the CRS's body, images of different CRSs never pair) or the dataset's own
  ``place_xy(record)`` (map units; the synthetic benchmark's world units).

An image without a place key or position is a place of its own; so is one with no neighbour.
Such a single-image place falls back to plain DINO views (both global crops from the one
image). A source with no place of two or more images is refused (:func:`place_groups`).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from craterlab.errors import DataError

log = logging.getLogger("craterlab.pretrain")

PLACE_COLUMN = "place"


def manifest_path(source: Any) -> Path | None:
    """The manifest CSV behind an image source, if any (``pretrain.images=x.csv`` or
    ``dataset=manifest``)."""
    for cand in (getattr(source, "manifest", None), getattr(source.dataset, "path", None)):
        if cand is not None and str(cand).lower().endswith(".csv") and Path(cand).is_file():
            return Path(cand)
    return None


def manifest_column(path: Path, column: str) -> dict[str, str]:
    """image_id -> the non-empty cells of one optional manifest column ({} without it)."""
    from craterlab.workflows.items import manifest_rows

    return {row["image_id"]: row[column] for _, row in manifest_rows(path, [column]) if row[column]}


def place_keys(source: Any) -> list[Hashable | None]:
    """Each image's explicit place key (None: unknown)."""
    records = source.records
    place_of = getattr(source.dataset, "place_of", None)
    if callable(place_of):
        return [place_of(r) for r in records]
    path = manifest_path(source)
    column = manifest_column(path, PLACE_COLUMN) if path is not None else {}
    return [column.get(r.image_id) for r in records]


def lonlat_points(lat: np.ndarray, lon: np.ndarray, radius_km: float) -> np.ndarray:
    """(n, 3) points on a sphere of ``radius_km``: their chord distance is the great-circle
    distance to within 0.01% below a tenth of the radius (the scale of a crop)."""
    la, lo = np.radians(lat), np.radians(lon)
    return radius_km * np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], 1)


def place_points(source: Any) -> tuple[np.ndarray, list[str]]:
    """Each image's centre as a point (NaN row: unknown) and its frame (points of different
    frames, e.g. bodies, never pair)."""
    records = source.records
    n = len(records)
    place_xy = getattr(source.dataset, "place_xy", None)
    if callable(place_xy):
        xy = [place_xy(r) for r in records]
        pts = np.array([p if p is not None else (math.nan, math.nan) for p in xy], float)
        return pts.reshape(n, 2), [""] * n
    path = manifest_path(source)
    pts = np.full((n, 3), math.nan)
    frames = [""] * n
    if path is None:
        return pts, frames
    from craterlab.geo.bodies import body_of, parse_crs
    from craterlab.workflows.items import manifest_places

    places = manifest_places(path)
    radii: dict[str, float] = {}
    for i, r in enumerate(records):
        if r.image_id not in places:
            continue
        lat, lon, _, crs = places[r.image_id]
        if crs not in radii:
            radii[crs] = body_of(parse_crs(crs, "manifest crs")).radius_m / 1000
        pts[i] = lonlat_points(np.array([lat]), np.array([lon]), radii[crs])[0]
        frames[i] = crs
    return pts, frames


def radius_groups(points: np.ndarray, frames: Sequence[str], radius: float) -> list[int]:
    """Group label per point: connected components of 'within ``radius``' in each frame
    (unknown points alone)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    n = len(points)
    known = np.flatnonzero(~np.isnan(points).any(axis=1))
    rows, cols = [], []
    for frame in sorted({frames[i] for i in known}):
        idx = np.array([i for i in known if frames[i] == frame])
        pairs = cKDTree(points[idx]).query_pairs(radius, output_type="ndarray")
        rows.append(idx[pairs[:, 0]])
        cols.append(idx[pairs[:, 1]])
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(r)), (r, c)), shape=(n, n))
    return connected_components(graph, directed=False)[1].tolist()


def place_groups(source: Any, mode: str, radius: float | None = None) -> list[list[int]]:
    """The images of ``source`` grouped by place (lists of indices, in first-image order).

    Raises a :class:`DataError` naming the fix when no place has two or more images.
    """
    n = len(source.records)
    if mode == "place":
        keys: list[Any] = place_keys(source)
    elif mode == "coordinates":
        assert radius is not None
        points, frames = place_points(source)
        labels = radius_groups(points, frames, radius)
        keys = [None if np.isnan(points[i]).any() else labels[i] for i in range(n)]
    else:
        raise ValueError(f"unknown pairing mode {mode!r}")
    by_key: dict[Any, list[int]] = {}
    groups: list[list[int]] = []
    for i, k in enumerate(keys):
        if k is None:
            groups.append([i])
        elif k in by_key:
            by_key[k].append(i)
        else:
            by_key[k] = [i]
            groups.append(by_key[k])
    multi = [g for g in groups if len(g) > 1]
    if not multi:
        raise DataError(no_pairs_message(source, mode, radius, sum(k is not None for k in keys)))
    log.info(
        "pretrain.pair_views=%s: %d images in %d places, %d of them with 2+ images (%d images); "
        "%d single-image places get plain DINO views",
        mode,
        n,
        len(groups),
        len(multi),
        sum(map(len, multi)),
        len(groups) - len(multi),
    )
    return groups


def no_pairs_message(source: Any, mode: str, radius: float | None, known: int) -> str:
    """One paragraph: why no place has two images, and the ways out."""
    what = source.describe()
    if mode == "place":
        found = (
            f"none of its {len(source.records)} images has a place key"
            if known == 0
            else f"each of the {known} images with a place key is the only one of its place"
        )
    else:
        found = (
            f"none of its {len(source.records)} images has a map position"
            if known == 0
            else f"no two of the {known} positioned images lie within pair_radius={radius:g}"
        )
    return (
        f"pretrain.pair_views={mode} found no place with two or more images in {what}: "
        f"{found}. Paired views need repeat coverage, several images of one place: give the "
        f"manifest a '{PLACE_COLUMN}' column (equal values = one place; pretrain.pair_views="
        "place), or map positions (lat, lon, crs columns, as ingest writes from a "
        "georeferenced mosaic) with pretrain.pair_views=coordinates pretrain.pair_radius=KM "
        "(larger than the offset between two images of one place); on the synthetic benchmark "
        "render more views per place (dataset.train_views=N). Or turn pairing off: "
        "pretrain.pair_views=none."
    )


def pick_views(
    sizes: Sequence[int], n_global: int, n_local: int, rng: random.Random
) -> list[tuple[list[int], list[int]]]:
    """For each place of a batch (its number of images), which image each view is cut from:
    (global picks, local picks). The globals come from distinct images while the place has
    enough (a single-image place: all from its one image); each local from any image."""
    out = []
    for n in sizes:
        if n < 1:
            raise ValueError("a place needs at least one image")
        order = rng.sample(range(n), n) if n > 1 else [0]
        globals_ = [order[k % n] for k in range(n_global)]
        locals_ = [rng.randrange(n) for _ in range(n_local)]
        out.append((globals_, locals_))
    return out
