"""Ingest from a georeferenced mosaic and a crater catalog in lat/lon and km (or pixels).

Each crater is projected into the mosaic (:mod:`craterlab.geo.placement`), cut at 2x and 3x
its diameter in km on the ground, centred on it, and resampled to ``crop_size`` (the backbone's
input, 224 by default), window by window (:mod:`craterlab.geo.rasters`). The manifest has the
experiments' columns, ``x, y, diameter`` in pixels of the mosaic (for the geometry filter), and
``lat, lon, diameter_km, crs`` (the body's lat/lon CRS) that search, dedup and match carry into
their map layers. Craters outside the mosaic, on no-data, below the minimum diameter or upscaled
beyond the limit are counted and named in the summary.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from craterlab.data.base import listing, safe_file_stem
from craterlab.errors import ConfigError, DataError
from craterlab.workflows.ingest import MANIFEST_FIELDS
from craterlab.workflows.outputs import check_outputs

GEO_FIELDS = ("lat", "lon", "diameter_km", "crs")
FIELDS = (*MANIFEST_FIELDS, *GEO_FIELDS)


@dataclass
class MosaicIngestSummary:
    """What ingest cut and what it left out (each left-out crater named)."""

    manifest: Path
    mosaic: str
    catalog: str
    craters: int = 0
    crops: int = 0
    padded: int = 0
    skipped_invalid: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # report lines of the placement
    on_nodata: list[str] = field(default_factory=list)
    at_border: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"mosaic: {self.mosaic}",
            f"catalog: {self.catalog}",
            f"manifest: {self.manifest}",
            f"craters: {self.craters}, crops: {self.crops}",
        ]
        if self.padded:
            lines.append(f"{self.padded} crop(s) reach past the mosaic or into no-data (padded)")
        if self.skipped_invalid:
            lines.append(
                f"skipped {len(self.skipped_invalid)} unusable catalog row(s):"
                + listing(self.skipped_invalid)
            )
        lines += self.skipped
        if self.on_nodata:
            lines.append(
                f"skipped {len(self.on_nodata)} crater(s) on no-data:" + listing(self.on_nodata)
            )
        if self.at_border:
            lines.append(
                f"skipped {len(self.at_border)} crater(s) whose crop leaves the mosaic "
                "(--border skip):" + listing(self.at_border)
            )
        return "\n".join(lines)


def ingest_mosaic(
    image: str | os.PathLike[str],
    catalog: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    factors: Sequence[float] = (2, 3),
    crop_size: int = 224,
    crs: Any = None,
    body: str | None = None,
    columns: str | dict[str, str] | None = None,
    min_diameter_px: float | None = None,
    min_diameter_km: float | None = None,
    max_upscale: float | None = 4.0,
    border: Literal["pad", "skip"] = "pad",
    skip_invalid: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> MosaicIngestSummary:
    """Cut every usable crater of ``catalog`` from ``image`` (see the module docstring).
    Existing outputs (the manifest, crops of the same names) are replaced only with
    ``overwrite``; the mosaic and the catalog never are."""
    from tqdm.auto import tqdm

    from craterlab.geo.bodies import crs_label
    from craterlab.geo.catalogs import read_catalog
    from craterlab.geo.placement import Limits, crater_on_nodata, crop_crater, place
    from craterlab.geo.rasters import Mosaic

    if border not in ("pad", "skip"):
        raise ConfigError(f"border must be 'pad' or 'skip', got {border!r}.")
    if crop_size < 16:
        raise ConfigError(f"--crop-size must be at least 16 pixels, got {crop_size}.")
    out = Path(out_dir)
    check_outputs([out / "manifest.csv"], overwrite=overwrite, inputs=[image, catalog])
    cat = read_catalog(catalog, columns=columns, skip_invalid=skip_invalid)
    with Mosaic(image, crs=crs, body=body or cat.body) as mosaic:
        placement = place(
            mosaic,
            cat,
            factors=tuple(float(f) for f in factors),
            out_px=crop_size,
            limits=Limits(min_diameter_px, min_diameter_km, max_upscale),
        )
        crops_dir = out / "crops"
        planned = [
            crops_dir / f"{safe_file_stem(f'{p.id}_{f:g}x')}.png"
            for p in placement.placed
            for f in factors
        ]
        check_outputs(planned, overwrite=overwrite, inputs=[image, catalog])
        crops_dir.mkdir(parents=True, exist_ok=True)
        summary = MosaicIngestSummary(
            out / "manifest.csv",
            mosaic.describe(),
            cat.describe(),
            skipped_invalid=cat.skipped,
            skipped=placement.report(),
        )
        label = crs_label(mosaic.geodetic) if mosaic.crs is not None else ""
        rows: list[dict[str, str]] = []
        written: dict[str, str] = {}
        for p in tqdm(placement.placed, desc="cut crops", unit="crater", disable=not progress):
            crops = [crop_crater(mosaic, p, f, crop_size) for f in factors]
            if crater_on_nodata(crops[0], float(factors[0])):
                summary.on_nodata.append(f"{p.id} (line {p.crater.line})")
                continue
            partial = [not c.valid.all() for c in crops]
            if any(partial) and border == "skip":
                summary.at_border.append(p.id)
                continue
            summary.craters += 1
            for f, crop, pad in zip(factors, crops, partial, strict=True):
                name = f"{p.id}_{f:g}x"
                path = crops_dir / f"{safe_file_stem(name)}.png"
                if path.name in written:
                    raise DataError(
                        f"Catalog ids {p.id!r} and {written[path.name]!r} give the same crop "
                        f"file name {path.name}; make the ids differ in letters, digits, '-', "
                        "'_' or '.'."
                    )
                written[path.name] = p.id
                Image.fromarray(crop.image, mode="L").save(path)
                summary.padded += int(pad)
                summary.crops += 1
                rows.append(_row(name, path, out, p, f, str(mosaic.path.resolve()), label))
    if not rows:
        raise DataError(
            f"No crater of {cat.path} could be cut from {mosaic.path}:\n"
            + str(summary)
            + "\nLower --min-diameter-px/--min-diameter-km, raise --max-upscale, or use "
            "--border pad."
        )
    with open(summary.manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return summary


def _row(name: str, path: Path, out: Path, p: Any, factor: float, source: str, crs: str) -> dict:
    def num(v: float, fmt: str) -> str:
        return "" if math.isnan(v) else format(v, fmt)

    return {
        "image_id": name,
        "path": os.path.relpath(path, out),
        "crater_id": p.id,
        "role": "gallery",
        "view_type": f"{factor:g}x",
        "x": f"{p.col:.3f}",
        "y": f"{p.row:.3f}",
        "diameter": f"{p.diameter_px:.3f}",
        "source": source,
        "lat": num(p.lat, ".7f"),
        "lon": num(p.lon, ".7f"),
        "diameter_km": num(p.diameter_km, ".6g"),
        "crs": crs if p.has_lonlat else "",
    }


def wants_mosaic(
    image: str | os.PathLike[str], catalog: str | os.PathLike[str], options: dict[str, Any]
) -> bool:
    """Whether ``ingest --image --catalog`` takes the georeferenced path: a geo option is
    given, the catalog has lat/lon columns, or the image has a CRS (read by rasterio)."""
    defaults = {"max_upscale": 4.0}
    if any(v is not None and v != defaults.get(k) for k, v in options.items()):
        return True
    from craterlab.geo.catalogs import KNOWN_NAMES

    try:
        with open(catalog, encoding="utf-8-sig", errors="replace") as f:
            first = f.readline().lower()
    except OSError:
        return False  # the pixel path names the missing file
    header = {h.strip() for h in first.replace("\t", ",").replace(";", ",").split(",")}
    if header & set(KNOWN_NAMES["lat"]):
        return True
    try:
        import rasterio
    except ImportError:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(image) as src:
                return src.crs is not None
    except Exception:  # not a raster GDAL reads: the pixel path reads it with Pillow
        return False
