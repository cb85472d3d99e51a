"""Command-line options of a georeferenced mosaic and its catalog, shared by ``ingest`` and
``dataset build`` (argparse only: nothing heavy is imported)."""

from __future__ import annotations

import argparse


def add_mosaic_options(p: argparse.ArgumentParser) -> None:
    """The options of a georeferenced mosaic and its catalog (ingest, dataset build)."""
    g = p.add_argument_group(
        "georeferenced mosaics and lat/lon catalogs (docs/planetary.md; pip install "
        "'craterlab[geo]')"
    )
    g.add_argument("--crs", help="CRS of a mosaic without one (IAU_2015:49910, WKT, .prj file)")
    g.add_argument("--body", help="the body (Mars, Moon, Mercury, ...): checks the CRS")
    g.add_argument("--columns", help="catalog column names: lat=...,lon=...,diameter_km=...,id=...")
    g.add_argument("--min-diameter-px", type=float, help="skip craters smaller (mosaic px)")
    g.add_argument("--min-diameter-km", type=float, help="skip craters smaller (km)")
    g.add_argument(
        "--max-upscale",
        type=float,
        default=4.0,
        help="skip craters whose smallest crop would be upscaled more (default 4; 0: no limit)",
    )


def mosaic_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """Those options as keyword arguments (``--max-upscale 0``: no limit)."""
    return {
        "crs": args.crs,
        "body": args.body,
        "columns": args.columns,
        "min_diameter_px": args.min_diameter_px,
        "min_diameter_km": args.min_diameter_km,
        "max_upscale": args.max_upscale or None,
    }
