"""Ingest: turn crater crops, or an image plus a crater catalog, into a manifest.

- A folder of crops: every image becomes one gallery row (id = relative path).
- An image (a mosaic tile: PNG, JPEG or TIFF/GeoTIFF) with a catalog CSV of ``x, y,
  diameter`` in pixels (optional ``id``): each crater is cut at 2x and 3x its diameter, as the
  study's gallery is, and written as PNG. A crater whose crop reaches past the image border is
  padded (with the image's median grey) or skipped, as chosen; both are counted.

Rows that cannot be used are an error naming each row (``skip_invalid``: a counted skip):
non-numeric or non-positive values, centres outside the image, duplicate ids. The manifest
has the experiments' columns (``image_id,path,crater_id,role,view_type``, read by
:class:`craterlab.data.manifest.ManifestDataset`) plus ``x, y, diameter`` (pixels of the
source image, for the geometry filter) and ``source``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from craterlab.data.base import listing, safe_file_stem
from craterlab.data.images import DEFAULT_MAX_IMAGE_PIXELS, allow_pixels, file_problem
from craterlab.errors import ConfigError, DataError
from craterlab.workflows.items import check_decodable, check_unique, folder_items
from craterlab.workflows.options import MIN_CROP_PIXELS, positive_int
from craterlab.workflows.options import factors as check_factors
from craterlab.workflows.outputs import check_outputs

MANIFEST_FIELDS = (
    "image_id",
    "path",
    "crater_id",
    "role",
    "view_type",
    "x",
    "y",
    "diameter",
    "source",
)
FACTORS = (2, 3)


@dataclass
class IngestSummary:
    manifest: Path
    craters: int = 0
    crops: int = 0
    padded: int = 0
    skipped_border: int = 0
    skipped_invalid: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"manifest: {self.manifest}", f"craters: {self.craters}, crops: {self.crops}"]
        if self.padded or self.skipped_border:
            lines.append(
                f"at the image border: {self.padded} crop(s) padded, "
                f"{self.skipped_border} crater(s) skipped"
            )
        if self.skipped_invalid:
            lines.append(
                f"skipped {len(self.skipped_invalid)} unusable row(s)/crop(s):"
                + listing(self.skipped_invalid)
            )
        return "\n".join(lines)


def ingest_folder(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> IngestSummary:
    """A manifest listing every crop of ``folder`` as a gallery item (paths stay in place).

    An existing manifest at ``out`` is replaced only with ``overwrite`` (never a crop); a crop
    over ``max_image_pixels`` (None: no limit) is refused like an undecodable one."""
    items = folder_items(Path(folder))
    out_path = _manifest_path(out, create=False)
    check_outputs([out_path], overwrite=overwrite, inputs=[it.path for it in items])
    check_unique(items, str(folder))
    items, bad = check_decodable(items, skip_bad, progress, max_image_pixels)
    out_path = _manifest_path(out)
    outside = [it.id for it in items if os.path.relpath(it.path, out_path.parent).startswith("..")]
    if outside:
        raise DataError(
            f"The manifest {out_path} would point outside its own folder (to {outside[0]!r} "
            "and others), and manifests only read files below their folder. Write it inside "
            f"the crops folder: --out {Path(folder) / 'manifest.csv'}."
        )
    rows = [
        {
            "image_id": it.id,
            "path": os.path.relpath(it.path, out_path.parent),
            "crater_id": it.id,
            "role": "gallery",
        }
        for it in items
    ]
    _write_manifest(out_path, rows)
    return IngestSummary(out_path, len(rows), len(rows), skipped_invalid=bad)


def read_image(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> np.ndarray:
    """A mosaic tile as an 8-bit grey (H, W) array; 16-bit and float data (GeoTIFF) are
    stretched linearly between their 0.5 and 99.5 percentiles. A tile over ``max_pixels``
    (the one image-size limit of every reader; None: no limit) is refused from its header,
    whichever library decodes it."""
    p = Path(path)
    problem = file_problem(p)
    if problem:
        raise DataError(f"Image {p} {problem}. Pass the mosaic tile the catalog refers to.")
    _check_tile_size(p, max_pixels)
    allow_pixels(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(p)
        with im:
            im.load()
            arr = np.asarray(im.convert("L") if im.mode in ("RGB", "RGBA", "P", "LA") else im)
    except Exception as exc:  # PIL raises many types for unsupported or corrupt files
        arr = _read_with_tifffile(p, exc)
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=-1)
    if arr.dtype == np.uint8:
        return arr
    a = arr.astype(np.float64)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        raise DataError(f"Image {p} has no finite pixel values.")
    lo, hi = np.percentile(finite, [0.5, 99.5])
    scaled = (np.nan_to_num(a, nan=lo) - lo) / max(hi - lo, 1e-12)
    return (np.clip(scaled, 0, 1) * 255 + 0.5).astype(np.uint8)


def _tile_size(p: Path) -> tuple[int, int] | None:
    """(width, height) from the header (PIL, else tifffile), or None when neither reads it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS, saved = None, Image.MAX_IMAGE_PIXELS
            try:
                with Image.open(p) as im:
                    return im.size
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except Exception:
        pass
    try:
        import tifffile

        with tifffile.TiffFile(p) as tif:
            shape = tif.series[0].shape
            axes = tif.series[0].axes
        return int(shape[axes.index("X")]), int(shape[axes.index("Y")])
    except Exception:
        return None


def _check_tile_size(p: Path, max_pixels: int | None) -> None:
    size = _tile_size(p) if max_pixels is not None else None
    if size is not None and size[0] * size[1] > max_pixels:  # type: ignore[operator]
        w, h = size
        raise DataError(
            f"Image {p} has {w} x {h} = {w * h:,} pixels, more than the image-size limit "
            f"{max_pixels:,} (a guard against decompression bombs and runaway memory; the tile "
            f"needs about {w * h / 2**20:,.0f} MiB as 8-bit grey). If it is a genuine mosaic, "
            f"allow it with --max-image-pixels {w * h} (or --max-image-pixels none)."
        )


def _read_with_tifffile(p: Path, exc: Exception) -> np.ndarray:
    if p.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile
        except ImportError:
            raise DataError(
                f"Pillow cannot read {p} ({exc}); this TIFF needs tifffile: "
                "pip install tifffile (or convert the tile to an 8/16-bit PNG or plain TIFF)."
            ) from None
        try:
            return np.asarray(tifffile.imread(p)).squeeze()
        except Exception as exc2:
            exc = exc2
    raise DataError(
        f"Cannot decode image {p}: {exc}. Pass a PNG, JPEG or TIFF/GeoTIFF tile."
    ) from None


@dataclass
class CatalogRow:
    line: int
    id: str
    x: float
    y: float
    diameter: float


def read_catalog(
    path: str | os.PathLike[str],
    width: int,
    height: int,
    *,
    skip_invalid: bool = False,
    sides: tuple[float, float] = (min(FACTORS), max(FACTORS)),
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[list[CatalogRow], list[str]]:
    """Catalog rows inside a ``width`` x ``height`` image; problems are errors, or counted
    skips with ``skip_invalid``. ``sides``: the smallest and largest crop factor, so that a
    diameter whose crop would be under :data:`MIN_CROP_PIXELS` or over the image-size limit
    is a problem row (not a 1-pixel crop or an exabyte allocation)."""
    limit = max_pixels
    p = Path(path)
    if not p.is_file():
        raise DataError(f"Catalog {p} does not exist. Pass a CSV with columns x,y,diameter[,id].")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(
            f"Catalog {p} is not UTF-8 text (byte {exc.object[exc.start]:#04x} on line {line}; "
            "a Latin-1 or Windows export?). Save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 "
            "catalog.csv > catalog-utf8.csv`) and pass that file."
        ) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [(h or "").strip().lower() for h in reader.fieldnames or []]
    missing = [c for c in ("x", "y", "diameter") if c not in header]
    if missing:
        raise DataError(
            f"Catalog {p} lacks column(s) {', '.join(missing)}; found "
            f"{', '.join(header) or '(none)'}. It needs x, y, diameter (pixels of the "
            "image) and optionally id."
        )
    rows = []
    problems: list[str] = []
    for line, r in enumerate(reader, start=2):
        extra = r.pop(None, None)  # type: ignore[call-overload]
        if extra:
            problems.append(
                f"line {line}: {len(extra)} more field(s) than the header ({', '.join(extra)[:60]}"
                "); quote values that contain commas"
            )
            continue
        rows.append((line, {(k or "").strip().lower(): (v or "").strip() for k, v in r.items()}))
    good: list[CatalogRow] = []
    seen: dict[str, int] = {}
    for line, r in rows:
        cid = r.get("id") or f"c{line - 1:05d}"
        try:
            x, y, d = float(r["x"]), float(r["y"]), float(r["diameter"])
        except ValueError:
            problems.append(
                f"line {line} (id {cid}): x,y,diameter = "
                f"{r['x']!r},{r['y']!r},{r['diameter']!r} are not numbers"
            )
            continue
        if not (math.isfinite(d) and d > 0):
            problems.append(f"line {line} (id {cid}): diameter {d} must be > 0")
        elif round(sides[0] * d) < MIN_CROP_PIXELS:
            problems.append(
                f"line {line} (id {cid}): diameter {d:g} px gives a {round(sides[0] * d)}-pixel "
                f"crop; craters under {MIN_CROP_PIXELS / sides[0]:g} px are too small to cut"
            )
        elif limit is not None and round(sides[1] * d) ** 2 > limit:
            problems.append(
                f"line {line} (id {cid}): diameter {d:g} px gives a crop of "
                f"{round(sides[1] * d) ** 2:,} pixels, over the image-size limit {limit:,} "
                "(--max-image-pixels raises it); is the diameter in pixels?"
            )
        elif not (0 <= x < width and 0 <= y < height):
            problems.append(
                f"line {line} (id {cid}): centre ({x:g}, {y:g}) is outside the "
                f"{width}x{height} image"
            )
        elif cid in seen:
            problems.append(f"line {line}: duplicate id {cid!r} (first on line {seen[cid]})")
        else:
            seen[cid] = line
            good.append(CatalogRow(line, cid, x, y, d))
    if problems and not skip_invalid:
        raise DataError(
            f"Catalog {p} has {len(problems)} unusable row(s):"
            + listing(problems)
            + "\nFix them (x, y and diameter are pixels of the image), or pass --skip-invalid "
            "to leave them out (they are counted in the summary)."
        )
    return good, problems


def ingest_catalog(
    image: str | os.PathLike[str],
    catalog: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    factors: Sequence[int] = FACTORS,
    border: Literal["pad", "skip"] = "pad",
    crop_size: int | None = None,
    origin: tuple[float, float] = (0.0, 0.0),
    skip_invalid: bool = False,
    overwrite: bool = False,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    progress: bool = True,
) -> IngestSummary:
    """Cut every catalogued crater at ``factors`` x its diameter into ``out_dir/crops`` and
    write ``out_dir/manifest.csv`` (see the module docstring). ``crop_size``: resize crops
    to this many pixels (default: keep the native resolution). ``origin``: the tile's
    top-left corner in a shared pixel frame (a mosaic's), added to the manifest's x and y so
    the geometry filter can compare craters of overlapping tiles. Existing outputs (the
    manifest, crops of the same names) are replaced only with ``overwrite``; the tile and the
    catalog never are."""
    from tqdm.auto import tqdm

    if border not in ("pad", "skip"):
        raise DataError(f"border must be 'pad' or 'skip', got {border!r}.")
    check_factors(factors)
    positive_int("--crop-size", crop_size, f" (pixels; at least {MIN_CROP_PIXELS} are useful)")
    if crop_size is not None and crop_size < MIN_CROP_PIXELS:
        raise ConfigError(
            f"--crop-size {crop_size} is not valid: crops of fewer than {MIN_CROP_PIXELS} "
            "pixels hold nothing a backbone can use; pass a size >= "
            f"{MIN_CROP_PIXELS} (backbones resize to 224), or leave it out."
        )
    if len(origin) != 2 or not all(isinstance(v, int | float) and math.isfinite(v) for v in origin):
        raise ConfigError(
            f"--origin {tuple(origin)} is not valid: it must be two finite numbers, the tile's "
            "top-left corner (x y) in the shared pixel frame."
        )
    out = Path(out_dir)
    check_outputs([out / "manifest.csv"], overwrite=overwrite, inputs=[image, catalog])
    tile = read_image(image, max_image_pixels)
    h, w = tile.shape
    rows, problems = read_catalog(
        catalog,
        w,
        h,
        skip_invalid=skip_invalid,
        sides=(min(factors), max(factors)),
        max_pixels=max_image_pixels,
    )
    crops_dir = out / "crops"
    planned = [crops_dir / f"{safe_file_stem(f'{r.id}_{f}x')}.png" for r in rows for f in factors]
    check_outputs(planned, overwrite=overwrite, inputs=[image, catalog], option="--out")
    crops_dir.mkdir(parents=True, exist_ok=True)
    fill = int(np.median(tile))
    summary = IngestSummary(out / "manifest.csv", skipped_invalid=problems)
    manifest_rows = []
    written: dict[str, str] = {}
    source = str(Path(image).resolve())
    for row in tqdm(rows, desc="cut crops", unit="crater", disable=not progress):
        windows = [_window(row.x, row.y, f * row.diameter) for f in factors]
        outside = [not _inside(win, w, h) for win in windows]
        if any(outside) and border == "skip":
            summary.skipped_border += 1
            continue
        summary.craters += 1
        for f, win, pad in zip(factors, windows, outside, strict=True):
            crop = _cut(tile, win, fill)
            summary.padded += int(pad)
            img = Image.fromarray(crop, mode="L")
            if crop_size:
                img = img.resize((crop_size, crop_size), Image.Resampling.BICUBIC)
            name = f"{row.id}_{f}x"
            path = crops_dir / f"{safe_file_stem(name)}.png"
            if path.name in written:
                raise DataError(
                    f"Catalog ids {row.id!r} and {written[path.name]!r} give the same crop file "
                    f"name {path.name}; make the ids differ in letters, digits, '-', '_' or '.'."
                )
            written[path.name] = row.id
            img.save(path)
            manifest_rows.append(
                {
                    "image_id": name,
                    "path": os.path.relpath(path, out),
                    "crater_id": row.id,
                    "role": "gallery",
                    "view_type": f"{f}x",
                    "x": f"{row.x + origin[0]:g}",
                    "y": f"{row.y + origin[1]:g}",
                    "diameter": f"{row.diameter:g}",
                    "source": source,
                }
            )
            summary.crops += 1
    if not manifest_rows:
        raise DataError(
            f"No crater of {catalog} could be cut from {image} ({summary.skipped_border} at the "
            f"border skipped, {len(problems)} unusable rows). Check that the catalog is in "
            "pixels of this image, or use border='pad'."
        )
    _write_manifest(summary.manifest, manifest_rows)
    return summary


def _window(x: float, y: float, side: float) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixel bounds of a square of ``side`` centred on (x, y)."""
    half = side / 2
    left, top = int(round(x - half)), int(round(y - half))
    size = max(1, int(round(side)))
    return left, top, left + size, top + size


def _inside(win: tuple[int, int, int, int], w: int, h: int) -> bool:
    left, top, right, bottom = win
    return left >= 0 and top >= 0 and right <= w and bottom <= h


def _cut(tile: np.ndarray, win: tuple[int, int, int, int], fill: int) -> np.ndarray:
    left, top, right, bottom = win
    h, w = tile.shape
    out = np.full((bottom - top, right - left), fill, dtype=np.uint8)
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(right, w), min(bottom, h)
    if x1 > x0 and y1 > y0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = tile[y0:y1, x0:x1]
    return out


def _manifest_path(out: str | os.PathLike[str], create: bool = True) -> Path:
    p = Path(out)
    if p.suffix.lower() != ".csv":
        p = p / "manifest.csv"
    if create:
        p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _write_manifest(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
