"""The images a workflow indexes or searches: a folder of crops, or a manifest CSV.

A manifest is read by :class:`craterlab.data.manifest.ManifestDataset` (the experiments'
reader, with its validation); every row is an item whatever its role. Besides the manifest's
columns, the optional ``x, y, diameter`` columns that ``craterlab ingest`` writes give each
item a position and size in pixels of its source image (for the geometry filter of dedup and
match); ``lat, lon, diameter_km, crs`` (ingest from a georeferenced mosaic) place its crater on
the map, for the layers of search, dedup and match. :class:`ItemSet` presents the items to the
feature extractor as a dataset whose ``gallery`` split holds them all.

Every crop reader here (the decode check, the manifest's screening, the encoding) applies the
one image-size limit of the project, ``max_image_pixels`` (default PIL's 89,478,485 pixels,
``--max-image-pixels N|none`` on the command line), and names that option when it refuses.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from craterlab.data.base import listing, open_rgb
from craterlab.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    allow_pixels,
    bomb_problem,
    pixel_limit_problem,
)
from craterlab.errors import DataError
from craterlab.hashing import fingerprint
from craterlab.types import ImageRecord

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
GEOMETRY_COLUMNS = ("x", "y", "diameter")
PLACE_COLUMNS = ("lat", "lon", "diameter_km", "crs")


class Place(NamedTuple):
    """A crater on the map: latitude, longitude (degrees east) and diameter in km; NaN where
    unknown. Results carry one per crater so their CSV joins in a GIS without the layer."""

    lat: float
    lon: float
    diameter_km: float

    def cells(self) -> list[str]:
        """The CSV cells: shortest exact decimal (it reads back as the same float), or empty."""
        return [place_cell(v) for v in self]

    def values(self) -> list[float | None]:
        """The JSON values (null where unknown)."""
        return [None if math.isnan(v) else v for v in self]


NO_PLACE = Place(math.nan, math.nan, math.nan)


def place_cell(v: float) -> str:
    """A coordinate as a CSV cell: ``repr`` (round-trips exactly), empty when NaN."""
    return "" if math.isnan(v) else repr(float(v))


def crater_places(items: Sequence[Item]) -> dict[str, Place]:
    """crater -> its map position, from the first of its crops that has one (crops of one
    crater share their catalog entry's position)."""
    out: dict[str, Place] = {}
    for it in items:
        if it.has_lonlat:
            out.setdefault(it.crater, it.place)
    return out


@dataclass(frozen=True)
class Item:
    """One crop: its id, file, crater (catalog entry) and optional position/size in pixels."""

    id: str
    path: str
    crater: str
    view_type: str = ""
    x: float = math.nan
    y: float = math.nan
    diameter: float = math.nan
    lat: float = math.nan
    lon: float = math.nan
    diameter_km: float = math.nan
    crs: str = ""

    @property
    def has_geometry(self) -> bool:
        return not any(math.isnan(v) for v in (self.x, self.y, self.diameter))

    @property
    def has_lonlat(self) -> bool:
        """Whether the crop's crater has a map position (lat, lon and their CRS)."""
        return bool(self.crs) and not (math.isnan(self.lat) or math.isnan(self.lon))

    @property
    def place(self) -> Place:
        """(lat, lon, diameter_km) of the crop's crater; NaNs when it has no map position."""
        if not self.has_lonlat:
            return NO_PLACE
        return Place(self.lat, self.lon, self.diameter_km)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"id": self.id, "path": self.path, "crater": self.crater}
        if self.view_type:
            out["view_type"] = self.view_type
        if self.has_geometry:
            out.update(x=self.x, y=self.y, diameter=self.diameter)
        if self.has_lonlat:
            out.update(lat=self.lat, lon=self.lon, diameter_km=self.diameter_km, crs=self.crs)
        return out

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Item:
        nan = math.nan
        return cls(
            str(d["id"]),
            str(d["path"]),
            str(d["crater"]),
            str(d.get("view_type", "")),
            float(d.get("x", nan)),  # type: ignore[arg-type]
            float(d.get("y", nan)),  # type: ignore[arg-type]
            float(d.get("diameter", nan)),  # type: ignore[arg-type]
            float(d.get("lat", nan)),  # type: ignore[arg-type]
            float(d.get("lon", nan)),  # type: ignore[arg-type]
            float(d.get("diameter_km", nan)),  # type: ignore[arg-type]
            str(d.get("crs", "")),
        )


def pixel_option_wording(text: str) -> str:
    """A pixel-limit message worded for the workflows: their option, not the experiments'."""
    return text.replace("dataset.max_image_pixels=", "--max-image-pixels ").replace(
        "(or null for no limit)", "(or --max-image-pixels none; Python: max_image_pixels=None)"
    )


def load_items(
    source: str | os.PathLike[str],
    skip_bad: bool = False,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[Item]:
    """Items of a folder of crops (recursively, sorted) or of a manifest CSV (whose missing,
    unreadable or too large files are an error, or left out and counted with ``skip_bad``)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return folder_items(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        try:
            return manifest_items(path, skip_bad, max_image_pixels)
        except DataError as err:
            raise DataError(pixel_option_wording(str(err))) from None
    if path.is_file():
        raise DataError(
            f"{path} is a single file, not a folder of crops or a manifest CSV. Pass the folder "
            "that holds the crops, or a manifest (python -m craterlab ingest writes one)."
        )
    raise DataError(
        f"{path} does not exist (resolved from {os.getcwd()}). Pass a folder of crater crops "
        "or a manifest CSV."
    )


def folder_items(folder: Path) -> list[Item]:
    """Every image below ``folder``; the id is its relative path without the suffix."""
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise DataError(
            f"No images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}, recursively). "
            "Point to the folder that holds the crops."
        )
    items = []
    seen: dict[str, Path] = {}
    dupes = []
    for p in files:
        rid = p.relative_to(folder).with_suffix("").as_posix()
        if rid in seen:
            dupes.append(f"{rid}: {seen[rid].name} and {p.name}")
        seen[rid] = p
        items.append(Item(rid, str(p.resolve()), rid))
    if dupes:
        raise DataError(
            f"Folder {folder} has files whose names differ only in suffix, so their ids "
            "collide:" + listing(dupes) + "\nRename or remove one of each pair."
        )
    return items


def manifest_items(
    path: Path, skip_bad: bool = False, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> list[Item]:
    """Items of a manifest (all roles), with positions from its optional geometry columns."""
    from craterlab.data.manifest import ManifestDataset

    dataset = ManifestDataset(str(path), skip_bad=skip_bad, max_image_pixels=max_image_pixels)
    geometry = manifest_geometry(path)
    places = manifest_places(path)
    items = []
    for role in ("gallery", "query", "train"):
        for r in dataset.records(role):
            name = dataset.crater_ids.to_name.get(r.crater_id, str(r.crater_id))
            item = Item(r.image_id, str(r.path), name, r.view_type)
            if r.image_id in geometry:
                x, y, d = geometry[r.image_id]
                item = replace(item, x=x, y=y, diameter=d)
            if r.image_id in places:
                lat, lon, dkm, crs = places[r.image_id]
                item = replace(item, lat=lat, lon=lon, diameter_km=dkm, crs=crs)
            items.append(item)
    return items


def manifest_rows(path: Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row with stripped keys and cells) of a manifest that has every one of
    ``columns`` (optional ones: [] when any is missing)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        if not all(c in header for c in columns):
            return []
        return [
            (line, {(k or "").strip(): (v or "").strip() for k, v in row.items()})
            for line, row in enumerate(reader, start=2)
        ]


def manifest_geometry(path: Path) -> dict[str, tuple[float, float, float]]:
    """image_id -> (x, y, diameter) from a manifest's optional geometry columns (else {})."""
    out: dict[str, tuple[float, float, float]] = {}
    bad = []
    for line, row in manifest_rows(path, GEOMETRY_COLUMNS):
        values = [row.get(c, "") for c in GEOMETRY_COLUMNS]
        if not any(values):
            continue
        try:
            x, y, d = (float(v) for v in values)
        except ValueError:
            bad.append(f"line {line}: x,y,diameter = {','.join(values)}")
            continue
        out[row["image_id"]] = (x, y, d)
    if bad:
        raise DataError(
            f"Manifest {path} has non-numeric geometry values:" + listing(bad) + "\nFix them "
            "(pixels, numbers) or leave all three cells of a row empty."
        )
    return out


def manifest_places(path: Path) -> dict[str, tuple[float, float, float, str]]:
    """image_id -> (lat, lon, diameter_km, crs) from the map columns that ingest writes from a
    georeferenced mosaic (else {}); rows with empty cells have no map position."""
    out: dict[str, tuple[float, float, float, str]] = {}
    bad = []
    for line, row in manifest_rows(path, PLACE_COLUMNS):
        values = [row.get(c, "") for c in PLACE_COLUMNS]
        if not all(values[:2]) or not values[3]:
            continue
        try:
            lat, lon = float(values[0]), float(values[1])
            dkm = float(values[2]) if values[2] else math.nan
        except ValueError:
            bad.append(f"line {line}: lat,lon,diameter_km = {','.join(values[:3])}")
            continue
        if abs(lat) > 90 or not -180 <= lon <= 360:
            bad.append(f"line {line}: lat {lat:g}, lon {lon:g} out of range")
            continue
        out[row["image_id"]] = (lat, lon, dkm, values[3])
    if bad:
        raise DataError(
            f"Manifest {path} has unusable map positions:" + listing(bad) + "\nFix them (lat "
            "-90..90, lon -180..360 east, degrees) or empty the row's lat, lon and crs cells."
        )
    return out


def check_unique(items: Sequence[Item], where: str) -> None:
    """Duplicate ids make results ambiguous: refuse them, naming each."""
    seen: set[str] = set()
    dupes = []
    for it in items:
        if it.id in seen:
            dupes.append(it.id)
        seen.add(it.id)
    if dupes:
        raise DataError(
            f"{where} lists {len(dupes)} duplicate id(s):" + listing(dupes) + "\nEvery crop "
            "needs its own id; rename them (for a folder, the file path is the id)."
        )


def check_decodable(
    items: Sequence[Item],
    skip_bad: bool,
    progress: bool = True,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[list[Item], list[str]]:
    """Decode every image once; a bad one, or one over ``max_image_pixels`` (checked from its
    header, before decoding), is an error (or, with ``skip_bad``, a counted skip).

    Returns the decodable items and '<id>: <reason>' for each skipped one.
    """
    from tqdm.auto import tqdm

    good, bad = [], []
    allow_pixels(max_image_pixels)  # PIL's own guard never undercuts ours
    for it in tqdm(items, desc="check images", unit="img", disable=not progress):
        too_big = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(it.path) as im:
                    too_big = pixel_limit_problem(im.size, max_image_pixels)
                    if too_big is None:
                        im.load()
        except FileNotFoundError:
            bad.append(f"{it.id}: {it.path} does not exist")
        except Image.DecompressionBombError as exc:
            too_big = bomb_problem(exc, max_image_pixels)
        except Exception as exc:  # PIL raises many types for corrupt files
            bad.append(f"{it.id}: {it.path} cannot be decoded ({type(exc).__name__}: {exc})")
        else:
            if too_big is None:
                good.append(it)
        if too_big is not None:
            bad.append(f"{it.id}: {it.path} {pixel_option_wording(too_big)}")
    if bad and not skip_bad:
        raise DataError(
            f"{len(bad)} of {len(items)} crop(s) cannot be read:" + listing(bad) + "\nReplace "
            "or remove them, or pass --skip-bad (Python: skip_bad=True) to leave them out; "
            "skipped crops are counted in the summary."
        )
    return good, bad


class ItemSet:
    """Items as a :class:`craterlab.types.CraterDataset` (all in the ``gallery`` split), so the
    experiments' feature extractor and its cache encode them."""

    def __init__(
        self,
        items: Sequence[Item],
        name: str = "items",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.items = list(items)
        self.name = name
        self.max_image_pixels = max_image_pixels
        self._records = [
            ImageRecord(it.id, i, it.view_type, it.path) for i, it in enumerate(self.items)
        ]
        self._paths = {it.id: it.path for it in self.items}
        stats = []
        for it in self.items:
            try:
                st = os.stat(it.path)
                stats.append((it.id, it.path, st.st_size, st.st_mtime_ns))
            except OSError:
                stats.append((it.id, it.path, -1, -1))
        self._identity = fingerprint("workflow-items", stats)

    def records(self, split: str) -> Sequence[ImageRecord]:
        return self._records if split == "gallery" else []

    def load_image(self, record: ImageRecord) -> Image.Image:
        return open_rgb(self._paths[record.image_id], self.max_image_pixels)

    def identity(self) -> str:
        return f"items-{self._identity}"
