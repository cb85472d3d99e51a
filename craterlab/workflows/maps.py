"""The map layers of search, dedup and match (beside their CSV), from the items' lat/lon.

Items ingested from a georeferenced mosaic carry their crater's lat, lon, diameter in km and
the body's lat/lon CRS (:class:`craterlab.workflows.items.Item`). From them:

- search: one point per hit, at the hit's crater, with the query id, rank, scores and the
  query crater's position as attributes (layer ``hits``);
- dedup: one point per crater of a duplicate group, with the group id (layer ``groups``);
- match: one line per match, from the crater in A to the crater in B (layer ``matches``).

Layers are written by :func:`craterlab.geo.layers.write_layer` (GeoPackage, GeoJSON on
request). Items without a map position give no layer, and the command says why.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from craterlab.errors import DataError
from craterlab.workflows.items import Item

if TYPE_CHECKING:
    from craterlab.workflows.dedup import DedupResult
    from craterlab.workflows.match import MatchResult
    from craterlab.workflows.results import SearchHits

NO_MAP = (
    "no map layer: the crops carry no lat/lon (ingest them with --image MOSAIC --catalog "
    "CATALOG from a georeferenced mosaic to get layers)"
)


def layer_crs(items: Iterable[Item]) -> Any | None:
    """The one lat/lon CRS of the items with a map position (None when none has one)."""
    from craterlab.geo.bodies import parse_crs

    labels = {it.crs for it in items if it.has_lonlat}
    if not labels:
        return None
    crss = {label: parse_crs(label, "the manifest's crs") for label in sorted(labels)}
    first = next(iter(crss.values()))
    if any(not first.equals(c) for c in crss.values()):
        raise DataError(
            "The crops come from mosaics in different CRSs ("
            + "; ".join(c.name for c in crss.values())
            + "), so one map layer cannot hold them. Write separate layers per body, or "
            "ingest the mosaics with one --crs."
        )
    return first


def _km(v: float) -> float | None:
    return None if math.isnan(v) else v


def search_layer(
    hits: SearchHits,
    queries: Sequence[Item],
    gallery: Sequence[Item],
    stem: str | os.PathLike[str],
    geojson: bool = False,
) -> list[Path] | str:
    """Hits as points at their crater (see the module docstring); NO_MAP when not placed."""
    from craterlab.geo.layers import point, write_layer

    crs = layer_crs([*queries, *gallery])
    if crs is None:
        return NO_MAP
    by_id = {it.id: it for it in gallery}
    query_by_id = {it.id: it for it in queries}
    records, geoms = [], []
    for h in hits.hits:
        g = by_id.get(h.gallery_id)
        if g is None or not g.has_lonlat:
            continue
        q = query_by_id.get(h.query)
        placed = q is not None and q.has_lonlat
        records.append(
            {
                "query": h.query,
                "rank": h.rank,
                "gallery_id": h.gallery_id,
                "crater": g.crater,
                "score": h.score,
                "stage1_score": h.stage1_score,
                "lat": g.lat,
                "lon": g.lon,
                "diameter_km": _km(g.diameter_km),
                "query_lat": q.lat if placed else None,
                "query_lon": q.lon if placed else None,
                "query_diameter_km": _km(q.diameter_km) if placed else None,
            }
        )
        geoms.append(point(g.lon, g.lat))
    return write_layer(stem, records, geoms, crs, "hits", geojson=geojson)


def _crater_places(items: Sequence[Item]) -> dict[str, Item]:
    """crater -> one of its placed items (crops of one crater share its position)."""
    out: dict[str, Item] = {}
    for it in items:
        if it.has_lonlat:
            out.setdefault(it.crater, it)
    return out


def dedup_layer(
    result: DedupResult, items: Sequence[Item], stem: str | os.PathLike[str], geojson: bool = False
) -> list[Path] | str:
    """Craters of duplicate groups as points with their group id."""
    from craterlab.geo.layers import point, write_layer

    crs = layer_crs(items)
    if crs is None:
        return NO_MAP
    places = _crater_places(items)
    records, geoms = [], []
    for g, members in enumerate(result.groups):
        for crater in members:
            it = places.get(crater)
            if it is None:
                continue
            records.append(
                {
                    "group": g,
                    "group_size": len(members),
                    "crater": crater,
                    "lat": it.lat,
                    "lon": it.lon,
                    "diameter_km": _km(it.diameter_km),
                }
            )
            geoms.append(point(it.lon, it.lat))
    return write_layer(stem, records, geoms, crs, "groups", geojson=geojson)


def match_layer(
    result: MatchResult,
    items_a: Sequence[Item],
    items_b: Sequence[Item],
    stem: str | os.PathLike[str],
    geojson: bool = False,
) -> list[Path] | str:
    """Matches as lines from the crater in A to the crater in B."""
    from craterlab.geo.layers import line, write_layer

    crs = layer_crs([*items_a, *items_b])
    if crs is None:
        return NO_MAP
    pa, pb = _crater_places(items_a), _crater_places(items_b)
    records, geoms = [], []
    for m in result.matches:
        a, b = pa.get(m.crater_a), pb.get(m.crater_b)
        if a is None or b is None:
            continue
        records.append(
            {
                "crater_a": m.crater_a,
                "crater_b": m.crater_b,
                "score": m.score,
                "item_a": m.item_a,
                "item_b": m.item_b,
                "lat_a": a.lat,
                "lon_a": a.lon,
                "lat_b": b.lat,
                "lon_b": b.lon,
                "diameter_km_a": _km(a.diameter_km),
                "diameter_km_b": _km(b.diameter_km),
            }
        )
        geoms.append(line(a.lon, a.lat, b.lon, b.lat))
    return write_layer(stem, records, geoms, crs, "matches", geojson=geojson)
