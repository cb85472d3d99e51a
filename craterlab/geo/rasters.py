"""A georeferenced mosaic, read window by window, and crater crops sized in km.

Any raster GDAL reads is opened through rasterio with its CRS and transform. A crop is never
read from the whole image: each crater's crop is a square of ``side`` metres on the ground,
centred on the crater in a local azimuthal equidistant frame (north up), sampled at
``out_px`` x ``out_px``. The sample points are placed with pyproj (``Geod.fwd`` from the crater,
then the mosaic's CRS and its transform), only the window of the mosaic that holds them is
read (decimated by GDAL with ``average`` resampling when the crop is much coarser than the
mosaic, so a 400 km crater on a 6 m/px mosaic reads a few hundred thousand pixels, not 10^10),
and the samples are interpolated bilinearly. So a crop is centred on the crater to a fraction
of a pixel whatever the projection (equirectangular, sinusoidal, polar stereographic),
longitudes wrap (0..360 or -180..180, tiles across the antimeridian), and a mosaic larger than
memory works.

16-bit and float data are stretched to 8 bits linearly between the mosaic's 0.5 and 99.5
percentiles (computed once from a decimated read, ignoring no-data), as the experiments
stretch them; 8-bit data are kept. No-data (the band's nodata value, its mask, NaN) and the
area outside the mosaic are reported per sample, so callers can count and name craters on
no-data.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from craterlab.errors import DataError
from craterlab.geo import require
from craterlab.geo.bodies import Body, body_crs, body_of, geographic, parse_crs

STATS_PX = 1024  # longest side of the decimated read that fixes the 8-bit stretch
GRID_NODES = 17  # exact projection at 17 x 17 nodes of a crop, bilinear between them


@dataclass
class Crop:
    """An 8-bit crop, which samples hit data (not no-data, not outside), and its scale."""

    image: np.ndarray
    valid: np.ndarray
    native_px: float  # mosaic pixels across the crop's side (out_px / native_px = upscaling)

    @property
    def upscale(self) -> float:
        return self.image.shape[0] / max(self.native_px, 1e-9)


class Mosaic:
    """A raster opened with rasterio; see the module docstring.

    ``crs``: a CRS for a raster without one (or to override a wrong one), anything pyproj
    reads; ``body``: the body's name (IAU), for a raster whose transform is in degrees and has
    no CRS, or to check that the raster's CRS is of that body.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        crs: Any = None,
        body: str | None = None,
        band: int = 1,
    ) -> None:
        rasterio = require("rasterio")
        pyproj = require("pyproj")
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise DataError(
                f"Mosaic {self.path} does not exist. Pass a raster GDAL reads (GeoTIFF, JP2, "
                "ISIS .cub, PDS .img, a .vrt of tiles, ...)."
            )
        try:
            with warnings.catch_warnings():  # no CRS is handled here, with its own message
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self._src = rasterio.open(self.path)
        except rasterio.errors.RasterioIOError as exc:
            raise DataError(
                f"Mosaic {self.path} cannot be read by GDAL ({exc}). Check that the file is "
                "complete and a raster format GDAL reads (gdalinfo shows it); convert it with "
                "gdal_translate if not."
            ) from None
        src = self._src
        if not 1 <= band <= src.count:
            raise DataError(f"Mosaic {self.path} has {src.count} band(s); band {band} is not one.")
        self.band = band
        self.width, self.height = src.width, src.height
        self.transform = src.transform
        self.georeferenced = not src.transform.is_identity
        self.dtype = np.dtype(src.dtypes[band - 1])
        self.nodata = src.nodatavals[band - 1]
        self.crs = self._resolve_crs(src, crs, body, pyproj)
        self.body: Body | None = body_of(self.crs) if self.crs is not None else None
        self._to_raster = self._from_raster = None
        if self.crs is not None:
            self.geodetic = geographic(self.crs)
            self.geod = self.geodetic.get_geod()
            self._to_raster = pyproj.Transformer.from_crs(self.geodetic, self.crs, always_xy=True)
            self._from_raster = pyproj.Transformer.from_crs(self.crs, self.geodetic, always_xy=True)
        self.is_geographic = self.crs is not None and self.crs.is_geographic
        self._stretch: tuple[float, float] | None = None

    def _resolve_crs(self, src: Any, crs: Any, body: str | None, pyproj: Any) -> Any:
        raster_crs = pyproj.CRS.from_wkt(src.crs.to_wkt()) if src.crs else None
        if crs is not None:
            raster_crs = crs if isinstance(crs, pyproj.CRS) else parse_crs(crs)
        elif raster_crs is None and body:
            raster_crs = body_crs(body)
            left, bottom, right, top = src.bounds
            if not (-180 <= left <= 360 and -180 <= right <= 360 and -90 <= bottom <= top <= 90):
                raise DataError(
                    f"Mosaic {self.path} has no CRS, and --body {body} assumes its transform "
                    f"is in degrees of longitude and latitude, but its bounds are ({left:g}, "
                    f"{bottom:g}, {right:g}, {top:g}). Pass its projected CRS with --crs "
                    "(e.g. IAU_2015:49910 for Mars equirectangular in metres)."
                )
        if raster_crs is not None and body:
            have = body_of(raster_crs)
            if have.name.lower() != body.strip().lower():
                raise DataError(
                    f"Mosaic {self.path} is in a CRS of {have.name} ({raster_crs.name}), but "
                    f"--body says {body}. Pass the mosaic of {body}, or drop --body (the CRS "
                    "names the body)."
                )
        return raster_crs

    def close(self) -> None:
        self._src.close()

    def __enter__(self) -> Mosaic:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # worker processes reopen the file
        raise TypeError("Mosaic holds an open raster; pass its path and options instead.")

    def describe(self) -> str:
        crs = self.crs.name if self.crs is not None else "no CRS"
        body = f", {self.body.name} R={self.body.radius_m / 1000:g} km" if self.body else ""
        return f"{self.path.name}: {self.width}x{self.height} {self.dtype.name}, {crs}{body}" + (
            f", nodata={self.nodata:g}" if self.nodata is not None else ""
        )

    # ------------------------------------------------------------------ positions

    def require_crs(self, what: str) -> None:
        """A lat/lon operation needs a CRS: an error naming the file and the fix."""
        if self.crs is None:
            raise DataError(
                f"Mosaic {self.path} has no CRS, so {what} cannot be placed on it. Pass its "
                "CRS with --crs (e.g. IAU_2015:49910 for Mars equirectangular, IAU_2015:30130 "
                "for the Moon's north polar stereographic), or --body NAME when its transform "
                "is in degrees; or use a catalog in pixels of this mosaic (x, y, diameter)."
            )
        if not self.georeferenced:
            raise DataError(
                f"Mosaic {self.path} has a CRS but no geotransform (pixel = map unit), so "
                f"{what} cannot be placed on it. Georeference it (gdal_translate -a_ullr or a "
                "world file), or use a catalog in pixels of this mosaic."
            )

    def to_pixel(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Continuous (col, row) of lon/lat (pixel i spans [i, i+1)); longitudes wrap."""
        assert self._to_raster is not None
        lon = np.asarray(lon, dtype=np.float64)
        lat = np.asarray(lat, dtype=np.float64)
        x, y = self._to_raster.transform(lon, lat)
        col, row = ~self.transform @ (np.asarray(x), np.asarray(y))
        col, row = np.asarray(col, dtype=np.float64), np.asarray(row, dtype=np.float64)
        if self.is_geographic:  # a lon/lat raster may be laid out 0..360 or -180..180:
            # take the turn of the globe that lands on (or nearest to) the raster
            def away(c: np.ndarray) -> np.ndarray:
                return np.maximum(0.0, np.maximum(-c, c - self.width))

            for shift in (360.0, -360.0):
                c2, _ = ~self.transform @ (np.asarray(x) + shift, np.asarray(y))
                c2 = np.asarray(c2, dtype=np.float64)
                col = np.where(away(c2) < away(col), c2, col)
        return col, row

    def to_lonlat(self, col: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """lon/lat (degrees, -180..180) of continuous pixel positions."""
        assert self._from_raster is not None
        x, y = self.transform @ (np.asarray(col, float), np.asarray(row, float))
        lon, lat = self._from_raster.transform(np.asarray(x), np.asarray(y))
        return np.asarray(lon), np.asarray(lat)

    def pixel_size_m(self, col: float, row: float) -> float:
        """Ground size of one pixel (m) at a pixel position: the geometric mean of its sides."""
        lon, lat = self.to_lonlat(np.array([col, col + 1, col]), np.array([row, row, row + 1]))
        _, _, dx = self.geod.inv(lon[0], lat[0], lon[1], lat[1])
        _, _, dy = self.geod.inv(lon[0], lat[0], lon[2], lat[2])
        return float(math.sqrt(abs(dx * dy)))

    def inside(self, col: np.ndarray, row: np.ndarray) -> np.ndarray:
        return (col >= 0) & (col < self.width) & (row >= 0) & (row < self.height)

    # ------------------------------------------------------------------ crops

    def grid(
        self,
        lon: float,
        lat: float,
        side_m: float,
        out_px: int,
        offset_m: tuple[float, float] = (0.0, 0.0),
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pixel positions (col, row), each (out_px, out_px), of a north-up square of
        ``side_m`` metres centred ``offset_m`` (east, north) from lon/lat."""
        nodes = min(out_px, GRID_NODES)
        t = np.linspace(0.5, out_px - 0.5, nodes)  # output pixel centres carrying a node
        u = (t / out_px - 0.5) * side_m
        east, north = np.meshgrid(u + offset_m[0], -u + offset_m[1])
        dist = np.hypot(east, north)
        az = np.degrees(np.arctan2(east, north))
        lons, lats, _ = self.geod.fwd(np.full(dist.shape, lon), np.full(dist.shape, lat), az, dist)
        col, row = self.to_pixel(np.asarray(lons), np.asarray(lats))
        if nodes == out_px:
            return col, row
        # the mapping is smooth over a crop: nodes placed exactly, bilinear between them
        from scipy.ndimage import map_coordinates

        idx = np.arange(out_px) * (nodes - 1) / (out_px - 1)
        ii, jj = np.meshgrid(idx, idx, indexing="ij")
        return (
            map_coordinates(col, [ii, jj], order=1, mode="nearest"),
            map_coordinates(row, [ii, jj], order=1, mode="nearest"),
        )

    def grid_px(
        self,
        x: float,
        y: float,
        side_px: float,
        out_px: int,
        offset_px: tuple[float, float] = (0, 0),
    ) -> tuple[np.ndarray, np.ndarray]:
        """The same grid in pixels of the mosaic (for pixel catalogs and rasters without CRS)."""
        u = ((np.arange(out_px) + 0.5) / out_px - 0.5) * side_px
        col, row = np.meshgrid(x + u + offset_px[0], y + u + offset_px[1])
        return col, row

    def crop(self, col: np.ndarray, row: np.ndarray) -> Crop:
        """Sample the mosaic at pixel positions (from :meth:`grid`): an 8-bit crop."""
        from scipy.ndimage import map_coordinates

        out_px = col.shape[0]
        mid = out_px // 2
        step = float(np.hypot(col[mid, mid] - col[mid, mid - 1], row[mid, mid] - row[mid, mid - 1]))
        native = step * out_px
        dec = max(1, int(step / 2))  # keep >= 2 read pixels per sample
        c0 = math.floor(float(col.min())) - 2 * dec
        r0 = math.floor(float(row.min())) - 2 * dec
        nc = math.ceil((float(col.max()) + 2 * dec - c0) / dec)
        nr = math.ceil((float(row.max()) + 2 * dec - r0) / dec)
        data, bad = self._read_cells(c0, r0, nc, nr, dec)
        coords = [(row - r0) / dec - 0.5, (col - c0) / dec - 0.5]
        fill = float(np.median(data[~bad])) if (~bad).any() else 0.0
        values = map_coordinates(np.where(bad, fill, data), coords, order=1, mode="nearest")
        invalid = map_coordinates(bad.astype(np.float32), coords, order=1, cval=1.0) > 0.01
        image = self.to_uint8(values)
        if invalid.any() and (~invalid).any():
            image[invalid] = int(np.median(image[~invalid]))
        return Crop(image, ~invalid, native)

    def _read_cells(
        self, c0: int, r0: int, nc: int, nr: int, dec: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Cells of ``dec`` x ``dec`` mosaic pixels from (c0, r0): values and a no-data mask.
        Cells outside the mosaic (or only partly inside) are no-data."""
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        data = np.zeros((nr, nc), dtype=np.float64)
        bad = np.ones((nr, nc), dtype=bool)
        i0 = max(0, math.ceil(-c0 / dec))
        j0 = max(0, math.ceil(-r0 / dec))
        i1 = min(nc, (self.width - c0) // dec)
        j1 = min(nr, (self.height - r0) // dec)
        if i1 <= i0 or j1 <= j0:
            return data, bad
        window = Window(c0 + i0 * dec, r0 + j0 * dec, (i1 - i0) * dec, (j1 - j0) * dec)
        shape = (j1 - j0, i1 - i0)
        arr = self._src.read(
            self.band,
            window=window,
            out_shape=shape,
            resampling=Resampling.average if dec > 1 else Resampling.nearest,
            masked=True,
        )
        values = np.ma.getdata(arr).astype(np.float64)
        mask = np.ma.getmaskarray(arr) | ~np.isfinite(values)
        data[j0:j1, i0:i1] = np.where(mask, 0.0, values)
        bad[j0:j1, i0:i1] = mask
        return data, bad

    # ------------------------------------------------------------------ radiometry

    def stretch(self) -> tuple[float, float]:
        """(low, high) of the 8-bit stretch: the 0.5 / 99.5 percentiles of valid pixels."""
        if self._stretch is None:
            from rasterio.enums import Resampling

            scale = max(self.width, self.height) / STATS_PX
            shape = (
                max(1, round(self.height / max(scale, 1))),
                max(1, round(self.width / max(scale, 1))),
            )
            arr = self._src.read(
                self.band, out_shape=shape, resampling=Resampling.nearest, masked=True
            )
            values = np.ma.getdata(arr).astype(np.float64)[~np.ma.getmaskarray(arr)]
            values = values[np.isfinite(values)]
            if values.size == 0:
                raise DataError(
                    f"Mosaic {self.path} has no valid pixel (every pixel is no-data "
                    f"{self.nodata!r} or not finite). Check the band and its nodata value."
                )
            lo, hi = np.percentile(values, [0.5, 99.5])
            self._stretch = (float(lo), float(hi))
        return self._stretch

    def to_uint8(self, values: np.ndarray) -> np.ndarray:
        if self.dtype == np.uint8:
            return np.clip(np.rint(values), 0, 255).astype(np.uint8)
        lo, hi = self.stretch()
        scaled = (values - lo) / max(hi - lo, 1e-12)
        return (np.clip(scaled, 0, 1) * 255 + 0.5).astype(np.uint8)
