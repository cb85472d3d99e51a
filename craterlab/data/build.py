"""``dataset build``: a CraterBench-R-style benchmark from any mosaic and crater catalog.

The study's protocol, for any body:

- **Gallery**: every usable crater identity gets two crops, 2x and 3x its diameter, centred on
  it (km on the ground; :mod:`craterlab.geo.rasters`), resampled to ``crop_size``.
- **Queries**: ``queries`` crater identities, drawn balanced across regions, each seen in
  ``views`` views. A view changes placement and context (its side is ``context`` x the diameter,
  drawn per view, and its centre is moved by up to ``max_shift`` of the side, so the crater
  stays in the central area) and photometry (gamma, contrast, brightness, sensor noise, blur).
- **Relevance** is cluster-tolerant: every catalogued crater of comparable size (diameter
  within ``relevance_ratio`` of the query crater's) whose centre lies in the view's central
  area (the central ``central`` fraction of its side) is co-visible; the gallery-filtered
  relevant ids are those that are gallery identities.
- **Splits** by crater id and region: the test split holds the whole gallery and the queries;
  the train split holds the gallery images of identities that are neither a query crater nor
  relevant to any query (the test relevance closure removed), and, with ``test_regions``, none
  of the held-out regions' craters. Regions come from the catalog's ``region`` column, or a
  ``region_grid`` x ``region_grid`` grid over the mosaic.

The output is the CraterBench-R release layout that ``dataset=craterbench_r`` reads unchanged
(``images/gallery``, ``images/query``, ``splits/test.json``, ``splits/train.json``,
``metadata/query_relevance.json``, ``metadata/stats.json``), plus ``metadata/craters.csv`` (and
``craters.gpkg`` when the mosaic has a CRS): every identity's lat/lon, km, region and split.
Everything random is drawn from ``seed`` and the crater id, so a build is reproducible
(byte-identical split files and images) and independent of the catalog's row order.
``metadata/stats.json`` carries a summary like the study's Table 1.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from craterlab.data.base import listing, safe_file_stem
from craterlab.errors import ConfigError, DataError

LAYOUT_VERSION = "craterlab_build_v1"


@dataclass(frozen=True)
class Photometric:
    """Ranges of the query views' photometric changes (each drawn uniformly per view)."""

    gamma: tuple[float, float] = (0.7, 1.4)
    contrast: tuple[float, float] = (0.7, 1.3)
    brightness: tuple[float, float] = (-0.1, 0.1)
    noise: tuple[float, float] = (0.0, 0.04)  # std of Gaussian noise, in [0, 1] units
    blur: tuple[float, float] = (0.0, 1.5)  # Gaussian blur sigma, output pixels


@dataclass(frozen=True)
class BuildSettings:
    """How a benchmark is built (see the module docstring)."""

    queries: int = 100
    views: int = 5
    identities: int | None = None
    crop_size: int = 224
    factors: tuple[float, float] = (2.0, 3.0)
    context: tuple[float, float] = (1.6, 4.0)
    max_shift: float = 0.15
    central: float = 0.5
    relevance_ratio: float = 2.0
    region_grid: int = 2
    test_regions: tuple[str, ...] = ()
    seed: int = 0
    quality: int = 95
    photometric: Photometric = field(default_factory=Photometric)

    def check(self) -> None:
        problems = []
        if self.queries < 1:
            problems.append(f"--queries must be >= 1, got {self.queries}")
        if self.views < 1:
            problems.append(f"--views must be >= 1, got {self.views}")
        if self.identities is not None and self.identities < 2:
            problems.append(f"--identities must be >= 2, got {self.identities}")
        if self.crop_size < 16:
            problems.append(f"--crop-size must be >= 16, got {self.crop_size}")
        if not 1 <= self.context[0] <= self.context[1]:
            problems.append(f"--context {self.context} must be 1 <= low <= high (diameters)")
        if not 0 <= self.max_shift < self.central / 2:
            problems.append(
                f"--max-shift {self.max_shift} must be in [0, central/2 = {self.central / 2}) "
                "so the query crater stays in the view's central area"
            )
        if not 0 < self.central <= 1:
            problems.append(f"--central {self.central} must be in (0, 1]")
        if self.relevance_ratio < 1:
            problems.append(f"--relevance-ratio {self.relevance_ratio} must be >= 1")
        if self.region_grid < 1:
            problems.append(f"--region-grid must be >= 1, got {self.region_grid}")
        if not 1 <= self.quality <= 100:
            problems.append(f"--quality must be in 1..100, got {self.quality}")
        if problems:
            raise ConfigError("dataset build: " + "; ".join(problems) + ".")


@dataclass
class Identity:
    """A gallery crater: where it is, its size, region and split role."""

    id: str
    col: float
    row: float
    diameter_px: float
    lon: float
    lat: float
    diameter_km: float
    region: str
    role: str = "gallery"  # gallery (test only), train, query


def _rng(seed: int, *keys: object) -> np.random.Generator:
    """A generator keyed by the seed and names (independent of order and selection)."""
    digest = hashlib.sha256("\x1f".join(map(str, (seed, *keys))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def photometric(image: np.ndarray, rng: np.random.Generator, p: Photometric) -> np.ndarray:
    """Gamma, contrast, brightness, blur and noise on an 8-bit image (the study's changes)."""
    x = image.astype(np.float64) / 255.0
    x = x ** rng.uniform(*p.gamma)
    mean = x.mean()
    x = (x - mean) * rng.uniform(*p.contrast) + mean + rng.uniform(*p.brightness)
    sigma = rng.uniform(*p.blur)
    img = Image.fromarray((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8))
    if sigma > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(sigma))
    x = np.asarray(img, dtype=np.float64) / 255.0
    x = x + rng.normal(0.0, rng.uniform(*p.noise), x.shape)
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def build_benchmark(
    image: str | os.PathLike[str],
    catalog: str | os.PathLike[str],
    out: str | os.PathLike[str],
    settings: BuildSettings | None = None,
    *,
    crs: Any = None,
    body: str | None = None,
    columns: str | dict[str, str] | None = None,
    min_diameter_px: float | None = None,
    min_diameter_km: float | None = None,
    max_upscale: float | None = 4.0,
    skip_invalid: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the benchmark into ``out`` (see the module docstring); returns the stats."""
    from tqdm.auto import tqdm

    from craterlab.geo.catalogs import read_catalog
    from craterlab.geo.placement import Limits, crater_on_nodata, crop_crater, place
    from craterlab.geo.rasters import Mosaic

    s = settings or BuildSettings()
    s.check()
    root = Path(out)
    if (root / "splits" / "test.json").exists() and not overwrite:
        raise ConfigError(
            f"{root} already holds a benchmark (splits/test.json). Nothing was written. Pass "
            "--overwrite to rebuild it there, or choose another --out."
        )
    cat = read_catalog(catalog, columns=columns, skip_invalid=skip_invalid)
    with Mosaic(image, crs=crs, body=body or cat.body) as mosaic:
        limits = Limits(min_diameter_px, min_diameter_km, max_upscale)
        placement = place(mosaic, cat, factors=s.factors, out_px=s.crop_size, limits=limits)
        georef = mosaic.crs is not None and mosaic.georeferenced
        rng = _rng(s.seed, "identities")
        order = sorted(placement.placed, key=lambda p: p.id)
        if s.identities is not None and len(order) > s.identities * 1.5:
            # draw a margin beyond the target: craters on no-data are only found when cut
            keep = rng.permutation(len(order))[: math.ceil(s.identities * 1.5)]
            order = [order[i] for i in sorted(keep)]
        for sub in ("images/gallery", "images/query", "splits", "metadata"):
            (root / sub).mkdir(parents=True, exist_ok=True)

        identities: dict[str, Identity] = {}
        gallery: list[dict[str, Any]] = []
        on_nodata: list[str] = []
        bar = tqdm(order, desc="gallery", unit="crater", disable=not progress)
        for p in bar:
            if s.identities is not None and len(identities) >= s.identities:
                break
            crops = [crop_crater(mosaic, p, f, s.crop_size) for f in s.factors]
            if crater_on_nodata(crops[0], s.factors[0]):
                on_nodata.append(f"{p.id} (line {p.crater.line})")
                continue
            region = p.crater.region or _grid_region(mosaic, p.col, p.row, s.region_grid)
            identities[p.id] = Identity(
                p.id, p.col, p.row, p.diameter_px, p.lon, p.lat, p.diameter_km, region
            )
            for f, crop in zip(s.factors, crops, strict=True):
                view = f"{f:g}x"
                entry = _entry("gallery", p.id, f"{safe_file_stem(p.id)}_{view}", view)
                _save(crop.image, root / entry["path"], s.quality)
                gallery.append(entry)
        if len(identities) < 2:
            raise DataError(
                f"Only {len(identities)} usable crater(s) of {cat.path} on {mosaic.path} "
                f"({len(on_nodata)} on no-data); a benchmark needs at least 2.\n"
                + "\n".join(placement.report())
            )
        query_ids = _pick_queries(identities, s)
        queries, relevance = [], {}
        everyone = _all_craters(mosaic, cat, georef)
        placed = {q.id: q for q in placement.placed}
        for cid in tqdm(query_ids, desc="queries", unit="crater", disable=not progress):
            ident, p = identities[cid], placed[cid]
            for v in range(s.views):
                r = _rng(s.seed, "view", cid, v)
                factor = float(r.uniform(*s.context))
                angle = r.uniform(0, 2 * math.pi)
                shift = s.max_shift * factor * math.sqrt(r.uniform(0, 1))  # in diameters
                offset = (shift * math.cos(angle), shift * math.sin(angle))
                crop = crop_crater(mosaic, p, factor, s.crop_size, offset)
                image_id = f"{safe_file_stem(cid)}_v{v}"
                entry = _entry("query", cid, image_id, f"view{v}")
                _save(photometric(crop.image, r, s.photometric), root / entry["path"], s.quality)
                raw = _covisible(mosaic, everyone, ident, factor, offset, s, georef)
                filtered = [c for c in raw if c in identities]
                relevance[image_id] = {
                    "query_crater_id": cid,
                    "raw_covisible_crater_ids": raw,
                    "gallery_filtered_relevant_ids": filtered,
                    "context": round(factor, 4),
                    "shift_diameters": [round(offset[0], 4), round(offset[1], 4)],
                }
                queries.append(entry)
        closure = set(query_ids)
        for rel in relevance.values():
            closure.update(rel["gallery_filtered_relevant_ids"])
        held_out = set(s.test_regions)
        for ident in identities.values():
            if ident.id in query_ids:
                ident.role = "query"
            elif ident.id not in closure and ident.region not in held_out:
                ident.role = "train"
        train = [e for e in gallery if identities[e["crater_id"]].role == "train"]

        _dump(root / "splits/test.json", _split("test", gallery, queries))
        _dump(root / "splits/train.json", _split("train", train, []))
        _dump(
            root / "metadata/query_relevance.json",
            {"version": LAYOUT_VERSION, "queries": relevance},
        )
        _write_craters(root, identities, mosaic if georef else None)
        stats = _stats(identities, gallery, queries, relevance, placement, on_nodata, cat, s)
        stats["source"] = {
            "mosaic": mosaic.describe(),
            "catalog": cat.describe(),
            "settings": _plain(asdict(s)),
        }
        _dump(root / "metadata/stats.json", stats)
    return stats


# ---------------------------------------------------------------------- selection and relevance


def _grid_region(mosaic: Any, col: float, row: float, k: int) -> str:
    i = min(k - 1, int(col / mosaic.width * k))
    j = min(k - 1, int(row / mosaic.height * k))
    return f"r{j}{i}"


def _pick_queries(identities: dict[str, Identity], s: BuildSettings) -> list[str]:
    """Query craters balanced across regions (round robin over shuffled regions), from the
    held-out regions when ``test_regions`` is given."""
    regions: dict[str, list[str]] = {}
    for ident in sorted(identities.values(), key=lambda i: i.id):
        if not s.test_regions or ident.region in s.test_regions:
            regions.setdefault(ident.region, []).append(ident.id)
    if s.test_regions and not regions:
        have = sorted({i.region for i in identities.values()})
        raise ConfigError(
            f"--test-regions {','.join(s.test_regions)} names no region with usable craters; "
            f"the regions are {', '.join(have)}."
        )
    rng = _rng(s.seed, "queries")
    for members in regions.values():
        rng.shuffle(members)
    pools = [regions[k] for k in sorted(regions)]
    want = min(s.queries, sum(map(len, pools)), max(1, len(identities) - 1))
    out: list[str] = []
    while len(out) < want:
        for pool in pools:
            if pool and len(out) < want:
                out.append(pool.pop())
    return sorted(out)


@dataclass(frozen=True)
class _Everyone:
    ids: list[str]
    lon: np.ndarray
    lat: np.ndarray
    col: np.ndarray
    row: np.ndarray
    diameter: np.ndarray  # km with lat/lon, else pixels


def _all_craters(mosaic: Any, cat: Any, georef: bool) -> _Everyone:
    """Every catalogued crater (placed or not): the candidates of co-visibility."""
    cs = cat.craters
    if cat.kind == "latlon":
        lon = np.array([c.lon for c in cs])
        lat = np.array([c.lat for c in cs])
        col, row = mosaic.to_pixel(lon, lat)
        d = np.array([c.diameter_km for c in cs])
    else:
        col = np.array([c.x for c in cs])
        row = np.array([c.y for c in cs])
        lon = lat = np.full(len(cs), math.nan)
        if georef:
            lon, lat = mosaic.to_lonlat(col, row)
            px = np.array([mosaic.pixel_size_m(c, r) for c, r in zip(col, row, strict=True)])
            d = np.array([c.diameter_px for c in cs]) * px / 1000
        else:
            d = np.array([c.diameter_px for c in cs])
    return _Everyone([c.id for c in cs], lon, lat, col, row, d)


def _covisible(
    mosaic: Any,
    everyone: _Everyone,
    q: Identity,
    factor: float,
    offset: tuple[float, float],
    s: BuildSettings,
    georef: bool,
) -> list[str]:
    """Ids of catalogued craters of comparable size centred in the view's central area."""
    d_q = q.diameter_km if georef else q.diameter_px
    half = s.central * factor / 2  # in query diameters
    # coarse pixel pre-filter (generous), then the exact test on the ground
    reach = (half + math.hypot(*offset)) * q.diameter_px * 1.5 + 2
    near = np.flatnonzero(np.hypot(everyone.col - q.col, everyone.row - q.row) <= reach)
    size_ok = np.maximum(everyone.diameter[near], d_q) <= s.relevance_ratio * np.minimum(
        everyone.diameter[near], d_q
    )
    near = near[size_ok]
    if georef:
        az, _, dist = mosaic.geod.inv(
            np.full(len(near), q.lon),
            np.full(len(near), q.lat),
            everyone.lon[near],
            everyone.lat[near],
        )
        az = np.radians(np.asarray(az))
        east = np.asarray(dist) * np.sin(az) / (q.diameter_km * 1000)
        north = np.asarray(dist) * np.cos(az) / (q.diameter_km * 1000)
    else:
        east = (everyone.col[near] - q.col) / q.diameter_px
        north = -(everyone.row[near] - q.row) / q.diameter_px
    inside = (np.abs(east - offset[0]) <= half) & (np.abs(north - offset[1]) <= half)
    ids = {everyone.ids[i] for i in near[inside]} | {q.id}
    return sorted(ids)


# ---------------------------------------------------------------------- files


def _entry(folder: str, crater: str, image_id: str, view: str) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "path": f"images/{folder}/{image_id}.jpg",
        "crater_id": crater,
        "view_type": view,
    }


def _save(array: np.ndarray, path: Path, quality: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array, mode="L").convert("RGB").save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, path)


def _split(name: str, gallery: list[dict], queries: list[dict]) -> dict[str, Any]:
    doc: dict[str, Any] = {"split_name": name, "version": LAYOUT_VERSION, "gallery_images": gallery}
    if name == "test":
        doc["query_images"] = queries
    return doc


def _dump(path: Path, doc: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def _write_craters(root: Path, identities: dict[str, Identity], mosaic: Any) -> None:
    """metadata/craters.csv (and craters.gpkg with a CRS): each identity, where and what."""
    rows = [
        {
            "crater_id": i.id,
            "role": i.role,
            "region": i.region,
            "lat": "" if math.isnan(i.lat) else f"{i.lat:.7f}",
            "lon": "" if math.isnan(i.lon) else f"{i.lon:.7f}",
            "diameter_km": "" if math.isnan(i.diameter_km) else f"{i.diameter_km:.6g}",
            "x": f"{i.col:.3f}",
            "y": f"{i.row:.3f}",
            "diameter_px": f"{i.diameter_px:.3f}",
        }
        for i in sorted(identities.values(), key=lambda i: i.id)
    ]
    with open(root / "metadata/craters.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if mosaic is not None:
        from craterlab.geo.layers import point, write_layer

        records = [
            {
                "crater_id": i.id,
                "role": i.role,
                "region": i.region,
                "diameter_km": i.diameter_km,
            }
            for i in sorted(identities.values(), key=lambda i: i.id)
        ]
        geoms = [point(i.lon, i.lat) for i in sorted(identities.values(), key=lambda i: i.id)]
        write_layer(root / "metadata/craters", records, geoms, mosaic.geodetic, "craters")


def _stats(
    identities: dict[str, Identity],
    gallery: list[dict],
    queries: list[dict],
    relevance: dict[str, dict],
    placement: Any,
    on_nodata: list[str],
    cat: Any,
    s: BuildSettings,
) -> dict[str, Any]:
    """The Table-1-like summary and the counts of what was left out."""
    diam = [i.diameter_km for i in identities.values() if not math.isnan(i.diameter_km)]
    multi = sum(len(r["gallery_filtered_relevant_ids"]) > 1 for r in relevance.values())
    query_craters = {q["crater_id"] for q in queries}
    return {
        "release_version": LAYOUT_VERSION,
        "summary": {
            "crater_identities": len(identities),
            "gallery_images": len(gallery),
            "gallery_views": [f"{f:g}x" for f in s.factors],
            "query_identities": len(query_craters),
            "query_images": len(queries),
            "views_per_query": s.views,
            "regions": len({i.region for i in identities.values()}),
            "diameter_median_km": round(statistics.median(diam), 4) if diam else None,
            "diameter_range_km": [round(min(diam), 4), round(max(diam), 4)] if diam else None,
            "multi_id_relevance_share": round(multi / len(relevance), 4) if relevance else 0.0,
            "train_identities": sum(i.role == "train" for i in identities.values()),
        },
        "official": {  # the counts `dataset export` writes, under the same keys
            "gallery_images": len(gallery),
            "gallery_crater_ids": len(identities),
            "query_images": len(queries),
            "query_crater_ids": len(query_craters),
            "train_images": 2 * sum(i.role == "train" for i in identities.values()),
            "train_crater_ids": sum(i.role == "train" for i in identities.values()),
            "filtered_multilabel_queries": multi,
        },
        "left_out": {
            "invalid_rows": len(cat.skipped),
            "outside_mosaic": len(placement.outside),
            "below_min_diameter": len(placement.too_small),
            "upscaled_beyond_limit": len(placement.upscaled),
            "on_nodata": len(on_nodata),
            "named": {
                "invalid_rows": cat.skipped[:100],
                "outside_mosaic": placement.outside[:100],
                "below_min_diameter": placement.too_small[:100],
                "upscaled_beyond_limit": placement.upscaled[:100],
                "on_nodata": on_nodata[:100],
            },
        },
    }


def _plain(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, list | tuple):
        return [_plain(v) for v in d]
    return d


def summary_table(stats: dict[str, Any]) -> str:
    """The Table-1-like summary as text (printed by ``dataset build``)."""
    s = stats["summary"]
    rows: Sequence[tuple[str, object]] = [
        ("Crater identities", s["crater_identities"]),
        ("Gallery images", f"{s['gallery_images']} ({' and '.join(s['gallery_views'])} context)"),
        ("Query identities", s["query_identities"]),
        ("Query images", f"{s['query_images']} ({s['views_per_query']} views each)"),
        ("Regions", s["regions"]),
        ("Diameter median", f"{s['diameter_median_km']} km" if s["diameter_median_km"] else "-"),
        ("Multi-ID relevance", f"{100 * s['multi_id_relevance_share']:.1f}%"),
        ("Train identities", s["train_identities"]),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    left = stats["left_out"]
    named = left["named"]
    for key, label in (
        ("invalid_rows", "unusable catalog rows"),
        ("outside_mosaic", "craters outside the mosaic"),
        ("below_min_diameter", "craters below the minimum diameter"),
        ("upscaled_beyond_limit", "craters upscaled beyond --max-upscale"),
        ("on_nodata", "craters on no-data"),
    ):
        if left[key]:
            lines.append(f"left out {left[key]} {label}:" + listing(named[key]))
    return "\n".join(lines)
