"""Catalogued craters placed on a mosaic: where each lands, how large, and who is left out.

A lat/lon catalog is projected through the mosaic's CRS and transform; a pixel catalog is
taken as pixels of the mosaic (and given lat/lon when the mosaic has a CRS). Craters are left
out, counted and named, when their centre is outside the mosaic, when they are smaller than
``min_diameter_px`` / ``min_diameter_km``, or when their smallest crop would be upscaled more
than ``max_upscale`` times to reach the backbone's input. A catalog of another body than the
mosaic, or one with no crater on the mosaic at all, is an error naming both files and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from craterlab.data.base import listing
from craterlab.errors import ConfigError, DataError
from craterlab.geo.catalogs import Catalog, Crater
from craterlab.geo.rasters import Crop, Mosaic


@dataclass(frozen=True)
class Placed:
    """A crater on the mosaic: pixel centre and diameter, and lat/lon/km when known."""

    crater: Crater
    col: float
    row: float
    diameter_px: float
    lon: float = math.nan
    lat: float = math.nan
    diameter_km: float = math.nan

    @property
    def id(self) -> str:
        return self.crater.id

    @property
    def has_lonlat(self) -> bool:
        return not math.isnan(self.lon)


@dataclass(frozen=True)
class Limits:
    """Which craters are worth a crop (None: not checked)."""

    min_diameter_px: float | None = None
    min_diameter_km: float | None = None
    max_upscale: float | None = 4.0

    def __post_init__(self) -> None:
        for name in ("min_diameter_px", "min_diameter_km", "max_upscale"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a positive number, got {v!r} "
                    "(leave it out to not check it)."
                )


@dataclass
class Placement:
    """The craters to cut, and those left out by reason ('<id>: why')."""

    placed: list[Placed]
    outside: list[str] = field(default_factory=list)
    too_small: list[str] = field(default_factory=list)
    upscaled: list[str] = field(default_factory=list)

    def report(self) -> list[str]:
        lines = []
        for what, names in (
            ("outside the mosaic", self.outside),
            ("below the minimum diameter", self.too_small),
            ("upscaled beyond --max-upscale", self.upscaled),
        ):
            if names:
                lines.append(f"skipped {len(names)} crater(s) {what}:" + listing(names))
        return lines


def check_body(mosaic: Mosaic, catalog: Catalog) -> None:
    """A catalog that names a body must go with a mosaic of that body."""
    if catalog.body and mosaic.body and catalog.body.lower() != mosaic.body.name.lower():
        raise DataError(
            f"Catalog {catalog.path} lists craters of {catalog.body} (column "
            f"{catalog.columns.get('body')!r}), but mosaic {mosaic.path} is in a CRS of "
            f"{mosaic.body.name} ({mosaic.crs.name}). Pair the catalog with a mosaic of "
            f"{catalog.body}, or fix the mosaic's CRS with --crs."
        )


def place(
    mosaic: Mosaic,
    catalog: Catalog,
    *,
    factors: tuple[float, ...] = (2.0, 3.0),
    out_px: int = 224,
    limits: Limits | None = None,
) -> Placement:
    """Project every crater onto the mosaic and apply the limits (see the module docstring)."""
    limits = limits or Limits()
    check_body(mosaic, catalog)
    craters = catalog.craters
    if catalog.kind == "latlon":
        mosaic.require_crs(f"the lat/lon craters of {catalog.path}")
        lon = np.array([c.lon for c in craters])
        lat = np.array([c.lat for c in craters])
        col, row = mosaic.to_pixel(lon, lat)
    else:
        col = np.array([c.x for c in craters])
        row = np.array([c.y for c in craters])
    inside = mosaic.inside(col, row)
    result = Placement([])
    for i, c in enumerate(craters):
        if not inside[i]:
            where = (
                f"lat {c.lat:g}, lon {c.lon:g}"
                if catalog.kind == "latlon"
                else f"x {c.x:g}, y {c.y:g}"
            )
            result.outside.append(f"{c.id} (line {c.line}, {where})")
    if not inside.any():
        raise DataError(_all_outside(mosaic, catalog, col, row))
    georef = mosaic.crs is not None and mosaic.georeferenced
    for i in np.flatnonzero(inside):
        c = craters[i]
        px_m = mosaic.pixel_size_m(col[i], row[i]) if georef else math.nan
        if catalog.kind == "latlon":
            d_km, d_px = c.diameter_km, c.diameter_km * 1000 / px_m
            lon_i, lat_i = c.lon, c.lat
        else:
            d_px = c.diameter_px
            d_km = d_px * px_m / 1000 if georef else math.nan
            lon_i = lat_i = math.nan
            if georef:
                lo, la = mosaic.to_lonlat(np.array([col[i]]), np.array([row[i]]))
                lon_i, lat_i = float(lo[0]), float(la[0])
        if (limits.min_diameter_px and d_px < limits.min_diameter_px) or (
            limits.min_diameter_km and not d_km >= limits.min_diameter_km
        ):
            result.too_small.append(f"{c.id}: {_size(d_px, d_km)}")
            continue
        upscale = out_px / (min(factors) * d_px)
        if limits.max_upscale and upscale > limits.max_upscale:
            result.upscaled.append(
                f"{c.id}: {_size(d_px, d_km)}, its {min(factors):g}x crop would be upscaled "
                f"{upscale:.1f}x to {out_px} px"
            )
            continue
        result.placed.append(
            Placed(c, float(col[i]), float(row[i]), float(d_px), lon_i, lat_i, d_km)
        )
    return result


def _size(d_px: float, d_km: float) -> str:
    km = f"{d_km:.3g} km = " if not math.isnan(d_km) else ""
    return f"D {km}{d_px:.1f} px"


def _all_outside(mosaic: Mosaic, catalog: Catalog, col: np.ndarray, row: np.ndarray) -> str:
    n = len(catalog.craters)
    if catalog.kind == "pixel":
        return (
            f"None of the {n} craters of {catalog.path} lies on mosaic {mosaic.path} "
            f"({mosaic.width}x{mosaic.height} px): their x range {col.min():g}..{col.max():g}, "
            f"y range {row.min():g}..{row.max():g}. A pixel catalog is in pixels of this "
            "mosaic; pass the mosaic it was measured on, or a lat/lon catalog."
        )
    corners_c = np.array([0, mosaic.width, 0, mosaic.width, mosaic.width / 2])
    corners_r = np.array([0, 0, mosaic.height, mosaic.height, mosaic.height / 2])
    lon, lat = mosaic.to_lonlat(corners_c, corners_r)
    lats = [c.lat for c in catalog.craters]
    lons = [c.lon for c in catalog.craters]
    return (
        f"None of the {n} craters of {catalog.path} lies on mosaic {mosaic.path}: the catalog "
        f"spans lat {min(lats):g}..{max(lats):g}, lon {min(lons):g}..{max(lons):g} "
        f"(column {catalog.columns['lon']!r}, {catalog.longitudes}), the mosaic lat "
        f"{np.nanmin(lat):.4g}..{np.nanmax(lat):.4g}, lon {np.nanmin(lon):.4g}.."
        f"{np.nanmax(lon):.4g} ({mosaic.crs.name}). Pass the catalog of this area (or the "
        "mosaic of the catalog's area); check that longitudes are east-positive and that "
        "--columns did not swap lat and lon."
    )


def crop_crater(
    mosaic: Mosaic,
    p: Placed,
    factor: float,
    out_px: int,
    offset: tuple[float, float] = (0.0, 0.0),
) -> Crop:
    """The crop of ``factor`` x the diameter around a placed crater, moved by ``offset``
    (east, north) in diameters: in km on the ground when lat/lon are known, else in pixels."""
    if p.has_lonlat and not math.isnan(p.diameter_km):
        d_m = p.diameter_km * 1000
        col, row = mosaic.grid(
            p.lon, p.lat, factor * d_m, out_px, (offset[0] * d_m, offset[1] * d_m)
        )
    else:
        d = p.diameter_px
        col, row = mosaic.grid_px(p.col, p.row, factor * d, out_px, (offset[0] * d, -offset[1] * d))
    return mosaic.crop(col, row)


def crater_on_nodata(crop: Crop, factor: float, offset: tuple[float, float] = (0.0, 0.0)) -> bool:
    """Whether any sample inside the crater's rim (its diameter around its centre) is no-data
    or outside the mosaic."""
    n = crop.image.shape[0]
    u = (np.arange(n) + 0.5) / n - 0.5  # in crop sides
    east, north = np.meshgrid(u * factor + offset[0], -u * factor + offset[1])
    rim = np.hypot(east, north) <= 0.5
    return bool((~crop.valid & rim).any())
