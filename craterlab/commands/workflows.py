"""The workflow commands of ``python -m craterlab``: ingest, index, search, dedup, match.

Registered in :mod:`craterlab.commands`. Arguments of the form ``key=value`` are
experiment overrides (``backbone=dino_s16 k=32 quantizer=int8``); everything else is an
option of the command. Heavy modules are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from craterlab.data.images import DEFAULT_MAX_IMAGE_PIXELS
from craterlab.errors import ConfigError
from craterlab.geo.options import add_mosaic_options, mosaic_kwargs
from craterlab.workflows.options import finite, fraction, positive_int
from craterlab.workflows.options import geometry as check_geometry

if TYPE_CHECKING:
    from craterlab.workflows.api import CraterIndex
    from craterlab.workflows.results import SearchHits


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (printed as one paragraph) instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}. See `{self.prog} --help`.")


def _split(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(command arguments, experiment overrides)."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    return [a for a in argv if a not in overrides], overrides


def _geometry_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("geometry pre-filter (needs x, y, diameter in the manifests)")
    g.add_argument("--max-distance", type=float, help="centre distance, pixels")
    g.add_argument("--max-offset", type=float, help="centre distance, in larger diameters")
    g.add_argument("--max-ratio", type=float, help="larger / smaller diameter")
    p.add_argument(
        "--neighbors",
        type=int,
        default=10,
        help="stage-1 candidates per crop without the geometry filter (default 10)",
    )


def _geometry(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from craterlab.workflows.geometry import GeometryFilter

    check_geometry(args.max_distance, args.max_offset, args.max_ratio)

    return GeometryFilter(args.max_distance, args.max_offset, args.max_ratio)


def _pixels(text: str) -> int | None:
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive pixel count or 'none'")
    return value


def _pixels_option(p: argparse.ArgumentParser, what: str) -> None:
    """--max-image-pixels: the one image-size limit of every reader, and how to raise it."""
    p.add_argument(
        "--max-image-pixels",
        type=_pixels,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help=f"largest {what} accepted, in pixels (default {DEFAULT_MAX_IMAGE_PIXELS:,}, PIL's "
        "decompression-bomb guard; 'none' for no limit)",
    )


def _overwrite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing output files (inputs are never replaced)",
    )


def _quiet_logs() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("faiss", "faiss.loader", "timm", "httpx", "huggingface_hub", "pyogrio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --------------------------------------------------------------------------- ingest


def ingest_command(argv: list[str]) -> int:
    """Crops or a tile + crater catalog -> a manifest (crops at 2x and 3x the diameter)."""
    p = _Parser(prog="python -m craterlab ingest", description=ingest_command.__doc__)
    p.add_argument("folder", nargs="?", help="a folder of crater crops")
    p.add_argument("--image", help="a mosaic tile (PNG, JPEG, TIFF/GeoTIFF)")
    p.add_argument("--catalog", help="CSV with x, y, diameter (pixels) and optional id")
    p.add_argument("--out", required=True, help="output folder (or manifest .csv for a folder)")
    p.add_argument(
        "--border",
        choices=("pad", "skip"),
        default="pad",
        help="craters whose crop leaves the image: pad (default) or skip",
    )
    p.add_argument(
        "--factors",
        type=int,
        nargs="+",
        default=[2, 3],
        help="crop sides in diameters (default 2 3)",
    )
    p.add_argument(
        "--crop-size",
        type=int,
        help="resize crops to N pixels (default: native; 224 from a georeferenced mosaic)",
    )
    p.add_argument(
        "--origin",
        type=float,
        nargs=2,
        default=(0.0, 0.0),
        metavar=("X", "Y"),
        help="the tile's top-left corner in a shared (mosaic) pixel frame",
    )
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip unusable catalog rows (counted) instead of stopping",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip undecodable crops (counted) instead of stopping",
    )
    _pixels_option(p, "tile")
    _overwrite_option(p)
    add_mosaic_options(p)
    args = p.parse_args(argv)
    _quiet_logs()
    from craterlab.workflows.ingest import ingest_catalog, ingest_folder

    if args.image or args.catalog:
        if not (args.image and args.catalog) or args.folder:
            raise ConfigError("ingest takes either a folder of crops, or --image with --catalog.")
        from craterlab.workflows.mosaic import wants_mosaic

        if wants_mosaic(args.image, args.catalog, mosaic_kwargs(args)):
            print(_ingest_mosaic(args))
            return 0
        summary = ingest_catalog(
            args.image,
            args.catalog,
            args.out,
            factors=args.factors,
            border=args.border,
            crop_size=args.crop_size,
            origin=tuple(args.origin),
            skip_invalid=args.skip_invalid,
            overwrite=args.overwrite,
            max_image_pixels=args.max_image_pixels,
        )
    elif args.folder:
        summary = ingest_folder(
            args.folder,
            args.out,
            skip_bad=args.skip_bad,
            overwrite=args.overwrite,
            max_image_pixels=args.max_image_pixels,
        )
    else:
        raise ConfigError("ingest needs a folder of crops, or --image TILE --catalog CSV.")
    print(summary)
    return 0


def _ingest_mosaic(args: argparse.Namespace) -> object:
    from craterlab.workflows.mosaic import ingest_mosaic

    if tuple(args.origin) != (0.0, 0.0):
        raise ConfigError(
            "--origin places a plain tile in a shared pixel frame; crops from a georeferenced "
            "mosaic are placed by lat/lon (and x, y are pixels of the mosaic). Drop --origin."
        )
    return ingest_mosaic(
        args.image,
        args.catalog,
        args.out,
        factors=args.factors,
        crop_size=args.crop_size or 224,
        border=args.border,
        skip_invalid=args.skip_invalid,
        overwrite=args.overwrite,
        **mosaic_kwargs(args),  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------- index


def index_command(argv: list[str]) -> int:
    """Build an index (index SOURCE --out DIR [overrides]), or add/remove/info on one."""
    if argv[:1] == ["add"]:
        return _index_add(argv[1:])
    if argv[:1] == ["remove"]:
        return _index_remove(argv[1:])
    if argv[:1] == ["info"]:
        return _index_info(argv[1:])
    if argv[:1] == ["log"]:
        return _index_log(argv[1:])
    args_, overrides = _split(argv)
    p = _Parser(
        prog="python -m craterlab index",
        description="Encode crops (a folder or manifest) and save a searchable index. "
        "Also: index add DIR SOURCE, index remove DIR ID..., index info DIR, "
        "index log DIR (as an MLflow model).",
    )
    p.add_argument("source", help="a folder of crops or a manifest CSV")
    p.add_argument("--out", required=True, help="index directory to write")
    p.add_argument(
        "--stage1",
        help="stage 1: auto (picked by gallery size: Flat, HNSW32 from 50K, PQ96x4fs from 1M), "
        "a FAISS factory string (Flat, HNSW32, IVF1024,Flat, PQ96x4fs) or torch; default: the "
        "retrieval config's",
    )
    p.add_argument("--nprobe", type=int, help="IVF lists probed per query")
    p.add_argument("--ef-search", type=int, help="HNSW search breadth")
    p.add_argument("--skip-bad", action="store_true", help="skip undecodable crops (counted)")
    _pixels_option(p, "crop")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing index at --out (never a folder that is not an index)",
    )
    args = p.parse_args(args_)
    positive_int("--nprobe", args.nprobe)
    positive_int("--ef-search", args.ef_search)
    _quiet_logs()
    from craterlab.workflows.api import CraterIndex
    from craterlab.workflows.storage import check_index_target, index_lock, index_path

    out = index_path(args.out)
    check_index_target(out, overwrite=args.overwrite)  # before the encoding, not after
    index = CraterIndex.build(
        args.source,
        overrides,
        stage1=args.stage1,
        nprobe=args.nprobe,
        ef_search=args.ef_search,
        skip_bad=args.skip_bad,
        max_image_pixels=args.max_image_pixels,
    )
    with index_lock(out):
        path = index.save(out, overwrite=args.overwrite)
    print(index.describe())
    if index.skipped:
        print(f"skipped {len(index.skipped)} undecodable crop(s): {', '.join(index.skipped[:5])}")
    print(f"index saved to {path}")
    return 0


def _index_add(argv: list[str]) -> int:
    p = _Parser(
        prog="python -m craterlab index add",
        description="Encode crops and append them to an index (ids stay stable).",
    )
    p.add_argument("index", help="index directory")
    p.add_argument("source", help="a folder of crops or a manifest CSV")
    p.add_argument("--skip-bad", action="store_true", help="skip undecodable crops (counted)")
    _pixels_option(p, "crop")
    args = p.parse_args(argv)
    _quiet_logs()
    from craterlab.workflows.api import CraterIndex

    with CraterIndex.updating(args.index) as index:
        added = index.add(
            args.source, skip_bad=args.skip_bad, max_image_pixels=args.max_image_pixels
        )
    print(f"added {added} item(s); the index holds {len(index)}")
    if index.skipped:
        print(f"skipped {len(index.skipped)} undecodable crop(s)")
    return 0


def _index_remove(argv: list[str]) -> int:
    p = _Parser(
        prog="python -m craterlab index remove",
        description="Delete items by id from an index (the other ids stay stable).",
    )
    p.add_argument("index", help="index directory")
    p.add_argument("ids", nargs="*", help="item ids to remove")
    p.add_argument("--ids-file", help="a text file with one id per line")
    args = p.parse_args(argv)
    ids = list(args.ids)
    if args.ids_file:
        ids += _read_ids_file(Path(args.ids_file))
    if not ids:
        raise ConfigError("index remove needs ids: index remove DIR ID [ID ...] or --ids-file.")
    _quiet_logs()
    from craterlab.workflows.api import CraterIndex

    with CraterIndex.updating(args.index) as index:
        how = index.remove(ids)
    print(f"removed {len(set(ids))} item(s) (stage 1: {how}); the index holds {len(index)}")
    return 0


def _read_ids_file(path: Path) -> list[str]:
    """The ids of an ``--ids-file``: one per line, UTF-8 text."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"--ids-file {path} does not exist.") from None
    except IsADirectoryError:
        raise ConfigError(f"--ids-file {path} is a folder; pass a text file.") from None
    except OSError as exc:
        raise ConfigError(f"--ids-file {path} cannot be read ({exc.strerror}).") from None
    try:
        if b"\0" in text:
            raise UnicodeDecodeError("utf-8", text, text.index(b"\0"), text.index(b"\0") + 1, "NUL")
        lines = text.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(
            f"--ids-file {path} is not a UTF-8 text file (binary data); pass a text file with "
            "one item id per line (python -m craterlab index info DIR --ids lists them)."
        ) from None
    return [ln.strip() for ln in lines if ln.strip()]


def _index_info(argv: list[str]) -> int:
    p = _Parser(prog="python -m craterlab index info", description="What an index holds.")
    p.add_argument("index")
    p.add_argument("--ids", action="store_true", help="also list every item id")
    args = p.parse_args(argv)
    from craterlab.workflows.api import CraterIndex

    index = CraterIndex.load(args.index)
    print(index.describe())
    if args.ids:
        print("\n".join(it.id for it in index.items))
    return 0


def _index_log(argv: list[str]) -> int:
    p = _Parser(
        prog="python -m craterlab index log",
        description="Log a saved index as an MLflow pyfunc model (serve it with "
        "`mlflow models serve -m runs:/RUN_ID/index --env-manager local`).",
    )
    p.add_argument("index", help="index directory")
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else outputs/mlflow.db)",
    )
    p.add_argument(
        "--experiment", default="craterlab-indexes", help="experiment (default craterlab-indexes)"
    )
    p.add_argument("--run-name", help="name of the run (default: index DIRNAME)")
    p.add_argument("--register", metavar="NAME", help="also register it in the model registry")
    args = p.parse_args(argv)
    _quiet_logs()
    from craterlab.workflows.mlflow_model import log_index

    run_id, model_uri = log_index(
        args.index,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        run_name=args.run_name,
        registered_name=args.register,
    )
    print(f"logged {args.index} as MLflow model {model_uri} (run {run_id})")
    if args.register:
        print(f"registered as models:/{args.register}/latest")
    print(f"serve it: mlflow models serve -m {model_uri} --env-manager local -p 5001")
    return 0


# --------------------------------------------------------------------------- search


def search_command(argv: list[str]) -> int:
    """Two-stage search of query crops against an index; writes CSV and JSON."""
    args_, overrides = _split(argv)
    p = _Parser(prog="python -m craterlab search", description=search_command.__doc__)
    p.add_argument("index", help="index directory")
    p.add_argument("queries", help="a folder of query crops or a manifest CSV")
    p.add_argument("--top", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--shortlist", type=int, help="stage-1 shortlist S (default: the index's)")
    p.add_argument(
        "--out",
        default="search_results",
        help="output prefix: PREFIX.csv and PREFIX.json (default search_results)",
    )
    p.add_argument("--skip-bad", action="store_true", help="skip undecodable crops (counted)")
    _pixels_option(p, "query crop")
    p.add_argument(
        "--html",
        action="store_true",
        help="also write PREFIX.html: each query beside its hits (first 50 queries)",
    )
    _overwrite_option(p)
    _layer_option(p)
    args = p.parse_args(args_)
    positive_int("--top", args.top)
    positive_int("--shortlist", args.shortlist)
    from craterlab.workflows.outputs import check_outputs

    check_outputs(
        [f"{args.out}.csv", f"{args.out}.json"]
        + ([f"{args.out}.html"] if args.html else [])
        + _layer_files(args.out, args.geojson),
        overwrite=args.overwrite,
        inputs=[args.queries],
        input_dirs=[args.index],
    )
    _quiet_logs()
    from craterlab.workflows.api import CraterIndex

    index = CraterIndex.load(args.index)
    hits = index.search(
        args.queries,
        top=args.top,
        shortlist=args.shortlist,
        overrides=overrides,
        skip_bad=args.skip_bad,
        max_image_pixels=args.max_image_pixels,
    )
    csv_path = hits.to_csv(f"{args.out}.csv")
    json_path = hits.to_json(f"{args.out}.json")
    by_query = hits.by_query()
    for q, rows in list(by_query.items())[:5]:
        best = ", ".join(f"{h.gallery_id} ({h.score:.3f})" for h in rows[:3])
        print(f"{q}: {best}")
    if len(by_query) > 5:
        print(f"... {len(by_query) - 5} more queries")
    if hits.skipped:
        print(f"skipped {len(hits.skipped)} undecodable query crop(s)")
    if index.encoder_identity.get("untrained"):
        print("NOTE: the index's backbone has untrained (random) weights.")
    written = [csv_path, json_path]
    if args.html:
        written.append(_write_search_page(args, index, hits))
    from craterlab.workflows.items import load_items
    from craterlab.workflows.maps import search_layer

    queries = load_items(args.queries, args.skip_bad, args.max_image_pixels)
    _layers(search_layer(hits, queries, index.items, args.out, args.geojson), written)
    print(f"results: {', '.join(str(w) for w in written)}")
    return 0


def _write_search_page(args: argparse.Namespace, index: CraterIndex, hits: SearchHits) -> Path:
    """PREFIX.html: each query crop beside its hits (:mod:`craterlab.workflows.search_page`)."""
    from craterlab.workflows.items import load_items
    from craterlab.workflows.search_page import search_page

    page = search_page(
        hits,
        load_items(args.queries, args.skip_bad, args.max_image_pixels),
        index.items,
        title=f"craterlab search: {Path(args.queries).name} in {Path(args.index).name}",
        weights=str(index.encoder_identity.get("weights_status", "unknown")),
    )
    path = Path(f"{args.out}.html")
    path.write_text(page, encoding="utf-8")
    return path


def _layer_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--geojson",
        action="store_true",
        help="also write the map layer as GeoJSON (a GeoPackage is written whenever the crops "
        "carry lat/lon)",
    )


def _layer_files(stem: str | Path, geojson: bool) -> list[str]:
    """The map layer files a command may write beside its CSV (checked like its outputs)."""
    return [f"{stem}.gpkg"] + ([f"{stem}.geojson"] if geojson else [])


def _layers(result: list[Path] | str, written: list[Path]) -> None:
    """Add written layer files to ``written``, or print why there is no layer."""
    if isinstance(result, str):
        print(result)
    else:
        written.extend(result)


# --------------------------------------------------------------------------- dedup / match


def dedup_command(argv: list[str]) -> int:
    """Likely duplicate craters in one index: pairs above a threshold, and their groups."""
    p = _Parser(prog="python -m craterlab dedup", description=dedup_command.__doc__)
    p.add_argument("index", help="index directory")
    p.add_argument("--threshold", type=float, help="pair score threshold")
    p.add_argument("--labels", help="manifest whose crater_id is the true crater (calibration)")
    p.add_argument(
        "--min-precision",
        type=float,
        help="calibrate for the best recall at this precision (default: best F1)",
    )
    p.add_argument("--out", default="dedup", help="output folder (default dedup/)")
    _geometry_options(p)
    _overwrite_option(p)
    _layer_option(p)
    args = p.parse_args(argv)
    finite("--threshold", args.threshold)
    fraction("--min-precision", args.min_precision)
    positive_int("--neighbors", args.neighbors)
    from craterlab.workflows.outputs import check_outputs

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"dedup --out {out} is a file; --out names a folder for its outputs.")
    names = ["pairs.csv", "groups.csv"] + (["calibration.png"] if args.labels else [])
    check_outputs(
        [out / n for n in names] + _layer_files(out / "groups", args.geojson),
        overwrite=args.overwrite,
        inputs=[args.labels] if args.labels else [],
        input_dirs=[args.index],
    )
    _quiet_logs()
    from craterlab.workflows.api import CraterIndex
    from craterlab.workflows.dedup import dedup

    index = CraterIndex.load(args.index)
    result = dedup(
        index,
        threshold=args.threshold,
        labels=args.labels,
        min_precision=args.min_precision,
        neighbors=args.neighbors,
        geometry=_geometry(args),
    )
    out.mkdir(parents=True, exist_ok=True)
    if result.calibration is not None:
        c = result.calibration.chosen
        png = result.calibration.plot(out / "calibration.png")
        print(
            f"calibrated operating point: threshold {c.threshold:.4f}, precision "
            f"{c.precision:.3f}, recall {c.recall:.3f}, F1 {c.f1:.3f} "
            f"({c.positives} labelled duplicate pairs); curve: {png}"
        )
    pairs = result.to_csv(out / "pairs.csv")
    groups = result.groups_csv(out / "groups.csv")
    print(
        f"{len(result.pairs)} pair(s) at score >= {result.threshold:.4f} among "
        f"{result.candidates} candidate pairs; {len(result.groups)} group(s)"
    )
    from craterlab.workflows.maps import dedup_layer

    written = [pairs, groups]
    _layers(dedup_layer(result, index.items, out / "groups", args.geojson), written)
    print(f"outputs: {', '.join(str(w) for w in written)}")
    return 0


def match_command(argv: list[str]) -> int:
    """Mutual best crater matches between two indexes (two observations)."""
    p = _Parser(prog="python -m craterlab match", description=match_command.__doc__)
    p.add_argument("index_a")
    p.add_argument("index_b")
    p.add_argument("--min-score", type=float, help="drop matches below this score")
    p.add_argument("--out", default="matches.csv", help="output CSV (default matches.csv)")
    _geometry_options(p)
    _overwrite_option(p)
    _layer_option(p)
    args = p.parse_args(argv)
    finite("--min-score", args.min_score)
    positive_int("--neighbors", args.neighbors)
    from craterlab.workflows.outputs import check_outputs

    stem = Path(args.out).with_suffix("") if args.out.lower().endswith(".csv") else args.out
    check_outputs(
        [args.out, *_layer_files(stem, args.geojson)],
        overwrite=args.overwrite,
        input_dirs=[args.index_a, args.index_b],
    )
    _quiet_logs()
    from craterlab.workflows.api import CraterIndex
    from craterlab.workflows.match import match

    a, b = CraterIndex.load(args.index_a), CraterIndex.load(args.index_b)
    result = match(
        a, b, neighbors=args.neighbors, geometry=_geometry(args), min_score=args.min_score
    )
    path = result.to_csv(args.out)
    from craterlab.workflows.maps import match_layer

    written = [path]
    stem = path.with_suffix("") if path.suffix.lower() == ".csv" else path
    _layers(match_layer(result, a.items, b.items, stem, args.geojson), written)
    print(
        f"{len(result.matches)} mutual match(es) between {result.craters_a} craters of A and "
        f"{result.craters_b} of B -> {', '.join(str(w) for w in written)}"
    )
    return 0
