"""CRSs and the bodies they belong to.

Bodies and their radii come from the CRS itself (pyproj reads the IAU planetary CRSs, e.g.
``IAU_2015:49910`` for Mars equirectangular, and the ESRI/ISIS WKT of planetary mosaics). The
body's name is read from the datum or ellipsoid name (``D_Mars_2000_Sphere``, ``Moon (2015) -
Sphere``); ``--body`` names one for a raster without a CRS, ``--crs`` gives any CRS pyproj reads
(an authority code, WKT, PROJ string or a .prj/.wkt file).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from craterlab.errors import ConfigError, DataError, closest
from craterlab.geo import require

IAU_AUTHORITY = "IAU_2015"


@dataclass(frozen=True)
class Body:
    """A celestial body: its name and the (semi-major) radius of the CRS's ellipsoid."""

    name: str
    radius_m: float

    def same_as(self, other: Body) -> bool:
        return self.name.lower() == other.name.lower()


@cache
def iau_bodies() -> dict[str, str]:
    """Body name (lower case) -> the IAU_2015 code of its spherical, planetocentric lat/lon CRS."""
    require("pyproj")
    from pyproj.database import query_crs_info
    from pyproj.enums import PJType

    out: dict[str, str] = {}
    for info in query_crs_info(auth_name=IAU_AUTHORITY, pj_types=[PJType.GEOGRAPHIC_2D_CRS]):
        m = re.match(r"^(.+?) \(2015\) - Sphere / Ocentric$", info.name)
        if m:
            out.setdefault(m.group(1).lower(), f"{IAU_AUTHORITY}:{info.code}")
    return out


def parse_crs(value: Any, what: str = "--crs") -> Any:
    """A pyproj CRS from a code, WKT, PROJ string or a file holding one; errors name the fix."""
    pyproj = require("pyproj")
    text = value
    if isinstance(value, str) and Path(value).expanduser().is_file():
        text = Path(value).expanduser().read_text(encoding="utf-8", errors="replace").strip()
    try:
        return pyproj.CRS.from_user_input(text)
    except pyproj.exceptions.CRSError as exc:
        raise ConfigError(
            f"{what} {str(value)[:80]!r} is not a CRS pyproj can read ({exc}). Give an "
            "authority code (IAU_2015:49910 for Mars equirectangular, IAU_2015:30130 for the "
            "Moon's north polar stereographic), a WKT or PROJ string, or a .prj/.wkt file."
        ) from None


def body_crs(name: str) -> Any:
    """The spherical planetocentric lat/lon CRS of a body named as IAU names it."""
    bodies = iau_bodies()
    code = bodies.get(name.strip().lower())
    if code is None:
        raise ConfigError(
            f"--body {name!r} is not a body of the IAU 2015 CRSs.{closest(name.lower(), bodies)} "
            f"Known bodies include {', '.join(sorted(b.title() for b in bodies)[:25])}, ...; "
            "or pass the raster's CRS with --crs."
        )
    return parse_crs(code, "--body")


def body_of(crs: Any) -> Body:
    """The body a CRS belongs to (from its datum/ellipsoid names), with its radius."""
    radius = float(crs.ellipsoid.semi_major_metre)
    names = " ".join(
        n for n in (crs.datum.name if crs.datum else "", crs.ellipsoid.name, crs.name) if n
    )
    words = re.sub(r"[^a-z0-9]+", " ", names.lower()).split()
    bodies = iau_bodies()
    for size in (2, 1):  # two-word bodies first
        for i in range(len(words) - size + 1):
            cand = " ".join(words[i : i + size])
            if cand in bodies and not (size == 1 and cand == "d"):
                return Body(cand.title(), radius)
    if crs.datum and ("wgs" in words or "world" in words or crs.to_epsg() is not None):
        return Body("Earth", radius)
    return Body(f"unnamed body (R={radius / 1000:g} km)", radius)


def geographic(crs: Any) -> Any:
    """The lat/lon CRS of a CRS's body (its geodetic CRS), with longitude first in layers."""
    geo = crs.geodetic_crs if crs.is_projected else crs
    if geo is None:
        raise DataError(f"The CRS {crs.name!r} has no geodetic CRS, so lat/lon cannot be used.")
    return geo


def crs_label(crs: Any) -> str:
    """A short text for a CRS: its authority code when it has one (or equals its body's IAU
    lat/lon CRS), else its WKT."""
    auth = crs.to_authority(min_confidence=90)
    if auth:
        return f"{auth[0]}:{auth[1]}"
    code = iau_bodies().get(body_of(crs).name.lower())
    if code and crs.is_geographic and parse_crs(code).equals(crs, ignore_axis_order=True):
        return code
    return crs.to_wkt()
