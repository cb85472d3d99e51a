"""Crater catalogs as scientists keep them: lat/lon in degrees and diameters in km, or pixels.

Columns are recognised by name (case-insensitive): Robbins' Mars database
(``CRATER_ID, LATITUDE_CIRCLE_IMAGE, LONGITUDE_CIRCLE_IMAGE, DIAM_CIRCLE_IMAGE``) and Moon
database (``LAT_CIRC_IMG, LON_CIRC_IMG, DIAM_CIRC_IMG``), and plain names (``lat``,
``latitude``, ``lon``, ``longitude``, ``diameter_km``, ``diam``, ``id``, ...). Other names are
mapped with ``--columns lat=...,lon=...,diameter_km=...,id=...``. Longitudes are east-positive,
either -180..180 or 0..360 (one convention per file). A catalog with ``x, y, diameter`` and no
latitude is a pixel catalog (pixels of the mosaic). An optional ``body`` column names the body.

Unusable rows (missing or non-numeric values, latitudes beyond +-90, longitudes outside
-180..360, diameters <= 0, duplicate ids) are one error naming every row and the fix, or a
counted, named skip with ``skip_invalid``. Comma, tab and semicolon separated files are read.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from craterlab.data.base import listing
from craterlab.errors import ConfigError, DataError

ROLES = ("id", "lat", "lon", "diameter_km", "x", "y", "diameter", "body", "region")
"""What a column can mean (the keys of ``--columns``)."""

KNOWN_NAMES: dict[str, tuple[str, ...]] = {
    "id": ("crater_id", "craterid", "id", "name", "crater"),
    "lat": (
        "latitude_circle_image",
        "lat_circ_img",
        "lat_circle_image",
        "latitude",
        "lat",
        "lat_deg",
        "latitude_deg",
    ),
    "lon": (
        "longitude_circle_image",
        "lon_circ_img",
        "lon_circle_image",
        "longitude",
        "lon",
        "long",
        "lon_deg",
        "longitude_deg",
        "lon_e",
        "longitude_east",
    ),
    "diameter_km": (
        "diam_circle_image",
        "diam_circ_img",
        "diameter_km",
        "diam_km",
        "d_km",
        "diameter",
        "diam",
    ),
    "x": ("x", "col", "column", "sample"),
    "y": ("y", "row", "line"),
    "diameter": ("diameter_px", "diameter", "diam_px", "d_px"),
    "body": ("body", "planet", "target"),
    "region": ("region", "quadrangle", "mc", "tile"),
}


@dataclass(frozen=True)
class Crater:
    """One catalogued crater: lat/lon (degrees east, as written) and km, or pixels."""

    line: int
    id: str
    lat: float = math.nan
    lon: float = math.nan
    diameter_km: float = math.nan
    x: float = math.nan
    y: float = math.nan
    diameter_px: float = math.nan
    region: str = ""


@dataclass
class Catalog:
    """The usable craters of a catalog file and the rows left out (with why)."""

    path: Path
    kind: Literal["latlon", "pixel"]
    craters: list[Crater]
    columns: dict[str, str]
    skipped: list[str] = field(default_factory=list)
    longitudes: str = "-180..180"
    body: str | None = None

    def describe(self) -> str:
        used = ", ".join(f"{k}={v}" for k, v in self.columns.items())
        lon = f", longitudes {self.longitudes}" if self.kind == "latlon" else ""
        return f"{self.path.name}: {len(self.craters)} craters ({self.kind}; {used}{lon})"


def parse_columns(spec: str | dict[str, str] | None) -> dict[str, str]:
    """``lat=LAT,lon=LON_E`` -> {"lat": "LAT", "lon": "LON_E"}; unknown roles are an error."""
    if not spec:
        return {}
    pairs = (
        dict(spec)
        if isinstance(spec, dict)
        else dict(p.split("=", 1) for p in spec.split(",") if "=" in p)
    )
    if isinstance(spec, str) and any("=" not in p for p in spec.split(",") if p.strip()):
        raise ConfigError(
            f"--columns {spec!r}: write ROLE=COLUMN pairs separated by commas, e.g. "
            "--columns lat=LAT_DEG,lon=LON_E,diameter_km=D_KM,id=NAME."
        )
    bad = [k for k in pairs if k.strip() not in ROLES]
    if bad:
        raise ConfigError(
            f"--columns names unknown role(s) {', '.join(bad)}; the roles are "
            f"{', '.join(ROLES)} (e.g. --columns lat=LAT_DEG,lon=LON_E,diameter_km=D_KM)."
        )
    return {k.strip(): v.strip() for k, v in pairs.items()}


def read_catalog(
    path: str | os.PathLike[str],
    *,
    columns: str | dict[str, str] | None = None,
    skip_invalid: bool = False,
) -> Catalog:
    """Read and check a catalog (see the module docstring)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(
            f"Catalog {p} does not exist. Pass a CSV of craters: lat, lon (degrees east), "
            "diameter_km[, id] (Robbins' column names are recognised), or x, y, diameter in "
            "pixels of the mosaic."
        )
    header, rows = _read_rows(p)
    mapping = _resolve_columns(p, header, parse_columns(columns))
    kind: Literal["latlon", "pixel"] = "latlon" if "lat" in mapping else "pixel"
    unused = ("x", "y", "diameter") if kind == "latlon" else ("lat", "lon", "diameter_km")
    mapping = {k: v for k, v in mapping.items() if k not in unused}
    craters, problems = _parse(rows, mapping, kind)
    longitudes = "-180..180"
    if kind == "latlon":
        lons = [c.lon for c in craters]
        if any(v > 180 for v in lons):
            longitudes = "0..360"
            west = [f"line {c.line} (id {c.id}): lon {c.lon:g}" for c in craters if c.lon < 0]
            if west:
                raise DataError(
                    f"Catalog {p} mixes longitude conventions: some longitudes are above 180 "
                    f"(0..360 east) and {len(west)} are negative (-180..180):{listing(west)}\n"
                    f"Write every longitude of column {mapping['lon']!r} in one convention."
                )
    body = _body(p, rows, mapping)
    if problems and not skip_invalid:
        raise DataError(
            f"Catalog {p} has {len(problems)} unusable row(s):{listing(problems)}\nFix these "
            "rows (latitude -90..90, longitude -180..360 east, diameter > 0, every id once), "
            "or pass --skip-invalid to leave them out (they are counted and named in the "
            "summary)."
        )
    return Catalog(p, kind, craters, mapping, problems, longitudes, body)


def _read_rows(p: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            first = f.readline()
            f.seek(0)
            delimiter = max(",\t;", key=first.count) if first.strip() else ","
            reader = csv.DictReader(f, delimiter=delimiter)
            header = [(h or "").strip() for h in reader.fieldnames or []]
            rows = [
                (line, {(k or "").strip(): (v or "").strip() for k, v in r.items() if k})
                for line, r in enumerate(reader, start=2)
            ]
    except UnicodeDecodeError as exc:
        raise DataError(
            f"Catalog {p} is not a UTF-8 text table ({exc}); export it as CSV (comma, tab or "
            "semicolon separated) with a header row."
        ) from None
    if not header:
        raise DataError(f"Catalog {p} is empty; it needs a header row and one row per crater.")
    if not rows:
        raise DataError(f"Catalog {p} has a header but no rows; list one crater per row.")
    return header, rows


def _resolve_columns(p: Path, header: list[str], given: dict[str, str]) -> dict[str, str]:
    """role -> column name, from ``--columns`` first and then the known names."""
    lower = {h.lower(): h for h in header}
    missing = [f"{role}={col}" for role, col in given.items() if col.lower() not in lower]
    if missing:
        raise DataError(
            f"Catalog {p}: --columns names column(s) it does not have ({', '.join(missing)}); "
            f"its columns are {', '.join(header)}."
        )
    out = {role: lower[col.lower()] for role, col in given.items()}
    taken = set(out.values())
    geographic = any(r in out for r in ("lat", "lon", "diameter_km")) or any(
        n in lower for r in ("lat", "lon") for n in KNOWN_NAMES[r]
    )
    for role, names in KNOWN_NAMES.items():
        if role in out or (role == "diameter_km" and not geographic):
            continue
        found = next((lower[n] for n in names if n in lower and lower[n] not in taken), None)
        if found is not None:
            out[role] = found
            taken.add(found)
    if "lat" in out or "lon" in out:
        need = [r for r in ("lat", "lon", "diameter_km") if r not in out]
    else:
        need = [r for r in ("x", "y", "diameter") if r not in out]
        if "x" not in out and "y" not in out:
            need = ["lat", "lon", "diameter_km"]
    if need:
        raise DataError(
            f"Catalog {p} has no column for {', '.join(need)}; its columns are "
            f"{', '.join(header)}. Name them with --columns (e.g. --columns "
            "lat=LAT_DEG,lon=LON_E,diameter_km=D_KM,id=NAME); Robbins' names "
            "(LATITUDE_CIRCLE_IMAGE, LON_CIRC_IMG, DIAM_CIRC_IMG, CRATER_ID, ...) and lat, lon, "
            "diameter_km, id are recognised, and a pixel catalog has x, y, diameter."
        )
    return out


def _number(row: dict[str, str], column: str | None) -> float | str:
    """The float in ``column``, or a reason why not."""
    if column is None:
        return math.nan
    text = row.get(column, "")
    if text == "":
        return "is missing"
    try:
        value = float(text)
    except ValueError:
        return f"{text!r} is not a number"
    return value if math.isfinite(value) else f"{text!r} is not finite"


def _parse(
    rows: list[tuple[int, dict[str, str]]], m: dict[str, str], kind: str
) -> tuple[list[Crater], list[str]]:
    fields = ("lat", "lon", "diameter_km") if kind == "latlon" else ("x", "y", "diameter")
    craters: list[Crater] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        cid = row.get(m.get("id", ""), "") or f"c{line - 1:06d}"
        values: dict[str, float] = {}
        why = []
        for f in fields:
            v = _number(row, m[f])
            if isinstance(v, str):
                why.append(f"{m[f]} {v}")
            else:
                values[f] = v
        if not why:
            if kind == "latlon":
                if abs(values["lat"]) > 90:
                    why.append(f"{m['lat']} {values['lat']:g} is beyond +-90")
                if not -180 <= values["lon"] <= 360:
                    why.append(f"{m['lon']} {values['lon']:g} is outside -180..360")
                if values["diameter_km"] <= 0:
                    why.append(f"{m['diameter_km']} {values['diameter_km']:g} must be > 0")
            elif values["diameter"] <= 0:
                why.append(f"{m['diameter']} {values['diameter']:g} must be > 0")
        if not why and cid in seen:
            why.append(f"duplicate id (first on line {seen[cid]})")
        if why:
            problems.append(f"line {line} (id {cid}): {'; '.join(why)}")
            continue
        seen[cid] = line
        region = row.get(m.get("region", ""), "")
        if kind == "latlon":
            craters.append(
                Crater(
                    line, cid, values["lat"], values["lon"], values["diameter_km"], region=region
                )
            )
        else:
            craters.append(
                Crater(
                    line,
                    cid,
                    x=values["x"],
                    y=values["y"],
                    diameter_px=values["diameter"],
                    region=region,
                )
            )
    return craters, problems


def _body(p: Path, rows: list[tuple[int, dict[str, str]]], m: dict[str, str]) -> str | None:
    """The one body a ``body`` column names (several is an error), or None."""
    if "body" not in m:
        return None
    names: dict[str, int] = {}
    for line, row in rows:
        name = row.get(m["body"], "").strip()
        if name:
            names.setdefault(name.title(), line)
    if len(names) > 1:
        raise DataError(
            f"Catalog {p} names several bodies in column {m['body']!r} "
            f"({', '.join(f'{n} (first on line {ln})' for n, ln in names.items())}); a catalog "
            "goes with one mosaic of one body. Split it by body."
        )
    return next(iter(names), None)
