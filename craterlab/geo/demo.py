"""A small georeferenced mosaic and its lat/lon crater catalog, for trying the planetary path.

Renders a window of the procedural surface (:mod:`craterlab.data.surface`, one world unit =
1 km) as a 16-bit GeoTIFF in a planetary CRS (Mars equirectangular centred on 180 E by default,
so the tile crosses the antimeridian; the Moon's north polar stereographic with
``crs="IAU_2015:30130"``), with a strip of no-data along its top edge, and writes the craters
whose centres lie in it as a catalog with Robbins' Mars column names (``CRATER_ID,
LATITUDE_CIRCLE_IMAGE, LONGITUDE_CIRCLE_IMAGE, DIAM_CIRCLE_IMAGE``), longitudes -180..180 or
0..360. ``craterlab ingest`` and ``craterlab dataset build`` read the pair as they would a CTX
tile and the Robbins database.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from craterlab.data.surface import CraterField, Photometry, render
from craterlab.geo import require
from craterlab.geo.bodies import parse_crs

NODATA = 0


@dataclass(frozen=True)
class DemoMosaic:
    image: Path
    catalog: Path
    craters: int
    crs: str


def write_demo_mosaic(
    out_dir: str | os.PathLike[str],
    *,
    crs: str = "IAU_2015:49915",
    centre: tuple[float, float] = (180.0, 5.0),
    size: int = 512,
    pixel_m: float = 60.0,
    diameters_km: tuple[float, float] = (2.0, 9.0),
    longitudes: str = "-180..180",
    nodata_rows: int = 24,
    seed: int = 3,
    sun_azimuth: float = 270.0,
    name: str = "mosaic",
) -> DemoMosaic:
    """Write ``out_dir/<name>.tif`` and ``out_dir/<name>_craters.csv`` (see the module
    docstring). ``centre`` is (lon, lat) in degrees of the mosaic's centre."""
    rasterio = require("rasterio")
    pyproj = require("pyproj")
    from rasterio.transform import from_origin

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = parse_crs(crs)
    to_map = pyproj.Transformer.from_crs(target.geodetic_crs, target, always_xy=True)
    to_geo = pyproj.Transformer.from_crs(target, target.geodetic_crs, always_xy=True)
    xc, yc = to_map.transform(*centre)
    half = size * pixel_m / 2
    transform = from_origin(xc - half, yc + half, pixel_m, pixel_m)

    width_km = size * pixel_m / 1000
    world_c = (width_km / 2 + 7.0, width_km / 2 + 11.0)
    field = CraterField(lam=1.0)
    light = Photometry(sun_azimuth=sun_azimuth, sun_elevation=30.0, noise=0.01)
    img8 = render(seed, field, world_c, width_km, size, light, seed + 1).astype(np.uint16)
    data = (img8 * 180 + 900).astype(np.uint16)  # 16-bit counts, never 0 (the no-data value)
    data[:nodata_rows] = NODATA

    image = out / f"{name}.tif"
    with rasterio.open(
        image,
        "w",
        driver="GTiff",
        width=size,
        height=size,
        count=1,
        dtype="uint16",
        crs=target.to_wkt(),
        transform=transform,
        nodata=NODATA,
        tiled=True,
        blockxsize=128,
        blockysize=128,
    ) as dst:
        dst.write(data, 1)

    x0, y0 = world_c[0] - width_km / 2, world_c[1] - width_km / 2
    c = field.craters_in(seed, x0, y0, x0 + width_km, y0 + width_km, diameters_km[0])
    keep = (c["d"] < diameters_km[1]) & (c["x"] > x0) & (c["x"] < x0 + width_km)
    keep &= (c["y"] > y0) & (c["y"] < y0 + width_km)
    col = (c["x"][keep] - x0) * 1000 / pixel_m
    row = (c["y"][keep] - y0) * 1000 / pixel_m
    mx, my = transform @ (col, row)
    lon, lat = to_geo.transform(np.asarray(mx), np.asarray(my))
    lon = np.asarray(lon)
    if longitudes == "0..360":
        lon = np.mod(lon, 360.0)
    catalog = out / f"{name}_craters.csv"
    idx = np.flatnonzero(keep)
    with open(catalog, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["CRATER_ID", "LATITUDE_CIRCLE_IMAGE", "LONGITUDE_CIRCLE_IMAGE", "DIAM_CIRCLE_IMAGE"]
        )
        for n, i in enumerate(idx):
            cid = f"{seed % 100:02d}-1-{n:06d}"  # Robbins-style ids: 03-1-000017
            w.writerow([cid, f"{lat[n]:.6f}", f"{lon[n]:.6f}", f"{c['d'][i]:.3f}"])
    return DemoMosaic(image, catalog, len(idx), crs)
