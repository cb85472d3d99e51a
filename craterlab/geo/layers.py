"""Results as map layers: GeoPackage (and GeoJSON on request) with the body's lat/lon CRS.

Written with geopandas through pyogrio, so they open in QGIS, ArcGIS or JMARS as they are:
points (search hits, dedup groups) and lines (matches between two observations). Coordinates
are longitude, latitude in degrees east of the body's geographic CRS, the one the crater
positions were given in. A line between two craters on either side of the antimeridian is drawn
the short way (its second longitude is moved by 360 degrees), not across the whole map.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from craterlab.errors import DataError
from craterlab.geo import require


def point(lon: float, lat: float) -> Any:
    shapely = require("shapely")
    return shapely.Point(float(lon), float(lat))


def line(lon_a: float, lat_a: float, lon_b: float, lat_b: float) -> Any:
    """The short line between two lon/lat points (unwrapped across the antimeridian)."""
    shapely = require("shapely")
    while lon_b - lon_a > 180:
        lon_b -= 360
    while lon_a - lon_b > 180:
        lon_b += 360
    return shapely.LineString([(float(lon_a), float(lat_a)), (float(lon_b), float(lat_b))])


def write_layer(
    stem: str | os.PathLike[str],
    records: Sequence[dict[str, Any]],
    geometries: Sequence[Any],
    crs: Any,
    layer: str,
    *,
    geojson: bool = False,
) -> list[Path]:
    """``stem``.gpkg (layer ``layer``) and, with ``geojson``, ``stem``.geojson; returns the
    paths. Each file is written to a temporary name and renamed, so a failure leaves no half
    layer behind."""
    gpd = require("geopandas")
    require("pyogrio")
    if len(records) != len(geometries):
        raise ValueError("one geometry per record")
    if crs is None:
        raise DataError(
            f"Layer {layer!r} needs the craters' CRS, but they carry none; ingest them from a "
            "georeferenced mosaic (the manifest's crs column)."
        )
    frame = gpd.GeoDataFrame(list(records), geometry=list(geometries), crs=crs)
    base = Path(stem)
    base.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for suffix, driver, on in ((".gpkg", "GPKG", True), (".geojson", "GeoJSON", geojson)):
        if not on:
            continue
        target = base.with_name(base.name + suffix)
        tmp = target.with_name(f".{target.name}.tmp{suffix}")
        tmp.unlink(missing_ok=True)
        options = {"layer": layer} if driver == "GPKG" else {}
        frame.to_file(tmp, driver=driver, engine="pyogrio", **options)
        os.replace(tmp, target)
        out.append(target)
    return out
