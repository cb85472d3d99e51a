"""``python -m craterlab dataset ...``: export, inspect and fetch datasets.

    dataset export --out DIR [--dataset synthetic] [--size tiny|small|medium|full] [--seed N]
                   [--image-size N] [--workers N] [--format jpg|png] [--quality Q] [--zip]
                   [KEY=VALUE ...]          # any dataset config key, e.g. n_identities=500
    dataset info   [--dataset NAME] [KEY=VALUE ...]   # counts, identity, relevance stats
    dataset fetch  [--root DIR]             # download + unzip the CraterBench-R release
    dataset build  --image MOSAIC --catalog CSV --out DIR [--queries N] [--views 5] [--seed N]
                                            # a benchmark for any body (docs/planetary.md)

KEY=VALUE overrides may be written Hydra-style with a ``dataset.`` prefix.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from craterlab.errors import CraterlabError


def _overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise CraterlabError(
                f"Cannot read {item!r}: dataset options are KEY=VALUE (e.g. n_identities=500 or "
                "dataset.root=/data/CraterBench-R)."
            )
        key, value = item.split("=", 1)
        key = key.strip().removeprefix("+").removeprefix("dataset.")
        out[key] = yaml.safe_load(value) if value != "" else None
    return out


def build_dataset(name: str, options: dict[str, Any]) -> Any:
    """Build a registered dataset by name with config options (validated by the registry)."""
    from craterlab.plugins import get_registry

    return get_registry().build("dataset", {"name": name, **options})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="craterlab dataset", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write a dataset in the CraterBench-R layout")
    exp.add_argument("--out", required=True, help="output folder (created; resumable)")
    info = sub.add_parser("info", help="print a dataset's counts and identity")
    for sp in (exp, info):
        sp.add_argument("--dataset", default="synthetic", help="registered dataset name")
        sp.add_argument("--size", help="synthetic size: tiny, small, medium or full")
        sp.add_argument("--seed", type=int, help="synthetic seed")
        sp.add_argument("--image-size", type=int, help="synthetic image side in pixels")
        sp.add_argument("overrides", nargs="*", help="dataset config KEY=VALUE")
    exp.add_argument("--workers", type=int, default=1, help="render processes")
    exp.add_argument("--format", default="jpg", choices=["jpg", "png"])
    exp.add_argument("--quality", type=int, default=95, help="JPEG quality")
    exp.add_argument("--zip", action="store_true", help="also package images as images.zip")
    exp.add_argument("--no-progress", action="store_true")
    _build_parser(sub)
    fetch = sub.add_parser("fetch", help="download and unzip the CraterBench-R release")
    fetch.add_argument("--root", help="target folder (default: the craterlab data cache)")
    fetch.add_argument("--revision", help="hub revision (branch, tag or commit)")
    return p


def _build_parser(sub: Any) -> None:
    b = sub.add_parser(
        "build",
        help="a CraterBench-R-style benchmark from a mosaic and a crater catalog (any body)",
        description="Gallery crops at 2x and 3x each crater's diameter, query views with "
        "placement, context and photometric changes, cluster-tolerant relevance from the "
        "catalog, train/test split by crater id and region; the CraterBench-R layout "
        "(read with dataset=craterbench_r dataset.root=OUT). See docs/planetary.md.",
    )
    b.add_argument("--image", required=True, help="the mosaic (any raster GDAL reads)")
    b.add_argument("--catalog", required=True, help="crater catalog: lat/lon/km or pixels")
    b.add_argument("--out", required=True, help="output folder (the release layout)")
    b.add_argument("--queries", type=int, default=100, help="query craters (default 100)")
    b.add_argument("--views", type=int, default=5, help="views per query crater (default 5)")
    b.add_argument("--identities", type=int, help="at most this many crater identities")
    b.add_argument("--crop-size", type=int, default=224, help="crop side in pixels (224)")
    b.add_argument("--seed", type=int, default=0, help="seed of every random choice (0)")
    b.add_argument(
        "--context",
        type=float,
        nargs=2,
        default=(1.6, 4.0),
        metavar=("LOW", "HIGH"),
        help="query view sides, in diameters (default 1.6 4)",
    )
    b.add_argument(
        "--max-shift", type=float, default=0.15, help="query view centre shift, in sides (0.15)"
    )
    b.add_argument(
        "--central", type=float, default=0.5, help="central area of a view, share of its side"
    )
    b.add_argument(
        "--relevance-ratio",
        type=float,
        default=2.0,
        help="co-visible craters: diameter within this factor of the query's (default 2)",
    )
    b.add_argument(
        "--region-grid", type=int, default=2, help="regions: an N x N grid over the mosaic"
    )
    b.add_argument(
        "--test-regions", help="regions held out of training, comma-separated (e.g. r00,r11)"
    )
    b.add_argument("--quality", type=int, default=95, help="JPEG quality (95)")
    b.add_argument("--skip-invalid", action="store_true", help="skip unusable catalog rows")
    b.add_argument("--overwrite", action="store_true", help="rebuild into an existing --out")
    b.add_argument("--no-progress", action="store_true")
    from craterlab.geo.options import add_mosaic_options

    add_mosaic_options(b)


def _build(args: argparse.Namespace) -> int:
    from craterlab.data.build import BuildSettings, build_benchmark, summary_table
    from craterlab.geo.options import mosaic_kwargs

    settings = BuildSettings(
        queries=args.queries,
        views=args.views,
        identities=args.identities,
        crop_size=args.crop_size,
        context=tuple(args.context),
        max_shift=args.max_shift,
        central=args.central,
        relevance_ratio=args.relevance_ratio,
        region_grid=args.region_grid,
        test_regions=tuple(r.strip() for r in (args.test_regions or "").split(",") if r.strip()),
        seed=args.seed,
        quality=args.quality,
    )
    stats = build_benchmark(
        args.image,
        args.catalog,
        args.out,
        settings,
        skip_invalid=args.skip_invalid,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        **mosaic_kwargs(args),  # type: ignore[arg-type]
    )
    print(summary_table(stats))
    print(
        f"benchmark written to {args.out}; evaluate it with: python -m craterlab "
        f"dataset=craterbench_r dataset.root={args.out}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns a process exit code (user errors print one paragraph, exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "dataset":
        argv = argv[1:]
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except CraterlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "build":
        return _build(args)
    if args.command == "fetch":
        from pathlib import Path

        from craterlab.data.craterbench import default_cache, fetch_release

        root = Path(args.root).expanduser() if args.root else default_cache() / "CraterBench-R"
        fetch_release(root, revision=args.revision)
        print(
            f"CraterBench-R is ready at {root}; run with dataset=craterbench_r dataset.root={root}"
        )
        return 0
    options = _overrides(args.overrides)
    for flag, key in (("size", "size"), ("seed", "seed"), ("image_size", "image_size")):
        if getattr(args, flag) is not None:
            options[key] = getattr(args, flag)
    dataset = build_dataset(args.dataset, options)
    if args.command == "info":
        query = dataset.records("query")
        print(repr(dataset))
        print(f"identity: {dataset.identity()}")
        for split in ("gallery", "query", "train"):
            print(f"{split}: {len(dataset.records(split))} images")
        multi = sum(len(r.relevant_ids) > 1 for r in query)
        print(f"queries with several relevant crater ids: {multi} of {len(query)}")
        return 0
    from craterlab.data.export import export_dataset

    stats = export_dataset(
        dataset,
        args.out,
        image_format=args.format,
        quality=args.quality,
        workers=args.workers,
        make_zip=args.zip,
        progress=not args.no_progress,
    )
    e, o = stats["export"], stats["official"]
    print(
        f"wrote {e['images_written']} of {e['images_total']} images to {args.out} in "
        f"{e['seconds']:.1f} s ({o['gallery_images']} gallery, {o['query_images']} query, "
        f"{o['train_images']} train). Read it back with dataset=craterbench_r "
        f"dataset.root={args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
