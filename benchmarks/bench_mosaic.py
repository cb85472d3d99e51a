"""Crater crops from a mosaic larger than memory: time per crop and peak memory.

Writes a sparse, tiled 16-bit GeoTIFF in Mars equirectangular (IAU_2015:49910) whose logical
size is ``--side`` x ``--side`` pixels (default 120,000^2 = 28.8 GB of 16-bit data; only the
tiles around the craters are stored, so the file stays small), with ``--craters`` craters of
1-50 km at 6 m/px (CTX's resolution). Then cuts their 2x and 3x crops at 224 px through
:func:`craterlab.geo.placement.crop_crater`, as ``ingest`` does, and reports crops per second
and the process's peak resident memory before and after, which stays far below the mosaic.

    python benchmarks/bench_mosaic.py                      # about a minute on 2 cores
    python benchmarks/bench_mosaic.py --side 60000 --craters 100
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from craterlab.geo.catalogs import read_catalog
from craterlab.geo.placement import Limits, crop_crater, place
from craterlab.geo.rasters import Mosaic

RES = 6.0  # m/px
R = 3396190.0


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_mosaic(tif, side_px, transform, col, row, d_km, seed) -> None:  # noqa: ANN001
    """The sparse mosaic: texture only around each crater (run in a child process)."""
    rng = np.random.default_rng(seed + 1)
    with rasterio.open(
        tif, "w", driver="GTiff", width=side_px, height=side_px, count=1,
        dtype="uint16", crs="IAU_2015:49910", transform=transform, nodata=0,
        tiled=True, blockxsize=512, blockysize=512, sparse_ok=True, BIGTIFF="YES",
    ) as dst:  # fmt: skip
        for c, r, d in zip(col, row, d_km, strict=True):
            side = min(int(3.2 * d * 1000 / RES), 1024)  # texture near the centre only
            c0, r0 = int(c - side / 2), int(r - side / 2)
            yy, xx = np.mgrid[0:side, 0:side]
            rr = np.hypot(xx + c0 - c, yy + r0 - r) / (d * 500 / RES)
            img = 2000 + 800 * np.exp(-(rr**2)) * np.cos(3 * rr) + rng.normal(0, 30, rr.shape)
            dst.write(img.astype("uint16"), 1, window=Window(c0, r0, side, side))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", type=int, default=120_000, help="mosaic side, pixels")
    ap.add_argument("--craters", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tif = Path(tmp) / "big.tif"
        half = args.side * RES / 2
        transform = from_origin(-half, half, RES, RES)
        d_km = np.exp(rng.uniform(np.log(1.0), np.log(50.0), args.craters))
        margin = 1.6 * d_km * 1000 / RES + 64
        col = rng.uniform(margin, args.side - margin)
        row = rng.uniform(margin, args.side - margin)
        start = time.perf_counter()
        writer = multiprocessing.get_context("fork").Process(
            target=write_mosaic, args=(tif, args.side, transform, col, row, d_km, args.seed)
        )
        writer.start()
        writer.join()
        print(f"wrote {args.side}x{args.side} sparse GeoTIFF ({args.side**2 * 2 / 1e9:.1f} GB "
              f"of 16-bit data, {tif.stat().st_size / 1e6:.0f} MB on disk) in "
              f"{time.perf_counter() - start:.1f} s")  # fmt: skip
        x, y = transform @ (col, row)
        lon, lat = np.degrees(np.asarray(x) / R), np.degrees(np.asarray(y) / R)
        cat = Path(tmp) / "craters.csv"
        with open(cat, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["CRATER_ID", "LATITUDE_CIRCLE_IMAGE", "LONGITUDE_CIRCLE_IMAGE",
                        "DIAM_CIRCLE_IMAGE"])  # fmt: skip
            w.writerows(
                [f"b{i}", la, lo, d]
                for i, (la, lo, d) in enumerate(zip(lat, lon, d_km, strict=True))
            )
        before = peak_mb()
        with Mosaic(tif) as mosaic:
            placed = place(mosaic, read_catalog(cat), limits=Limits(max_upscale=None)).placed
            mosaic.stretch()
            start = time.perf_counter()
            n, widest, small, small_s = 0, 0.0, 0, 0.0
            for p in placed:
                t0 = time.perf_counter()
                for factor in (2.0, 3.0):
                    widest = max(widest, crop_crater(mosaic, p, factor, 224).native_px)
                    n += 1
                if p.diameter_km < 5:
                    small, small_s = small + 2, small_s + time.perf_counter() - t0
            seconds = time.perf_counter() - start
        print(
            f"{n} crops of {len(placed)} craters (1-50 km, 2x and 3x, 224 px) in {seconds:.1f} s "
            f"({n / seconds:.1f} crops/s; craters under 5 km: {small / max(small_s, 1e-9):.1f} "
            f"crops/s; the widest crop spans {widest:.0f} mosaic px); "
            f"peak RSS {before:.0f} MB before cropping, {peak_mb():.0f} MB after"
        )


if __name__ == "__main__":
    main()
