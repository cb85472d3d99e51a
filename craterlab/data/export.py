"""Write any CraterDataset to disk in the CraterBench-R layout (read back by ``craterbench_r``).

    OUT/images/gallery/<image_id>.jpg   OUT/images/query/<image_id>.jpg
    OUT/images/train/<image_id>.jpg     (train-only images, e.g. synthetic extra views)
    OUT/splits/test.json                {"gallery_images": [...], "query_images": [...]}
    OUT/splits/train.json               {"gallery_images": [...]}
    OUT/metadata/query_relevance.json   {"queries": {query image id: {raw + filtered ids}}}
    OUT/metadata/stats.json

Images are rendered one at a time (in worker processes with ``workers > 1``) and written
atomically (temp file + rename), so an interrupted export resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from craterlab.types import CraterDataset, ImageRecord

LAYOUT_VERSION = "craterlab_export_v1"

_worker_dataset: CraterDataset | None = None


def _init_worker(dataset: CraterDataset) -> None:
    global _worker_dataset
    _worker_dataset = dataset
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _write_one(job: tuple[ImageRecord, str, int]) -> int:
    record, target, quality = job
    assert _worker_dataset is not None
    return _write(_worker_dataset, record, Path(target), quality)


def _write(dataset: CraterDataset, record: ImageRecord, target: Path, quality: int) -> int:
    if target.is_file() and target.stat().st_size > 0:
        return 0
    image = dataset.load_image(record)
    tmp = target.with_name(f".{target.name}.tmp")
    fmt = "JPEG" if target.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    image.save(tmp, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    os.replace(tmp, target)
    return 1


def _name(crater_id: int, names: dict[int, str] | None) -> str:
    return names.get(crater_id, str(crater_id)) if names else f"{crater_id:05d}"


def export_dataset(
    dataset: CraterDataset,
    out: str | os.PathLike[str],
    *,
    image_format: str = "jpg",
    quality: int = 95,
    workers: int = 1,
    make_zip: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Render/copy every image of ``dataset`` under ``out`` and write the split files.

    Returns the stats written to metadata/stats.json (counts, seconds, images per second).
    """
    out = Path(out)
    ext = image_format.lower().lstrip(".")
    if ext not in ("jpg", "jpeg", "png"):
        raise ValueError(f"image_format must be jpg or png, got {image_format!r}")
    names = getattr(getattr(dataset, "crater_ids", None), "to_name", None)
    gallery, query, train = (list(dataset.records(s)) for s in ("gallery", "query", "train"))

    folder: dict[str, str] = {}
    for r in gallery:
        folder[r.image_id] = "gallery"
    for r in query:
        folder.setdefault(r.image_id, "query")
    for r in train:
        folder.setdefault(r.image_id, "train")

    def entry(r: ImageRecord) -> dict[str, Any]:
        return {
            "image_id": r.image_id,
            "path": f"images/{folder[r.image_id]}/{r.image_id}.{ext}",
            "crater_id": _name(r.crater_id, names),
            "view_type": r.view_type,
        }

    for sub in ("images/gallery", "images/query", "splits", "metadata"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if any(folder[r.image_id] == "train" for r in train):
        (out / "images/train").mkdir(exist_ok=True)

    unique: dict[str, ImageRecord] = {}
    for r in (*gallery, *query, *train):
        unique.setdefault(r.image_id, r)
    jobs = [(r, str(out / entry(r)["path"]), quality) for r in unique.values()]
    start = time.perf_counter()
    written = _run_jobs(dataset, jobs, workers, progress)
    seconds = time.perf_counter() - start

    raw = getattr(dataset, "raw_covisible", {}) or {}
    relevance = {
        r.image_id: {
            "query_crater_id": _name(r.crater_id, names),
            "raw_covisible_crater_ids": [
                _name(c, names) for c in raw.get(r.image_id, sorted(r.relevant_ids))
            ],
            "gallery_filtered_relevant_ids": [_name(c, names) for c in sorted(r.relevant_ids)],
        }
        for r in query
    }
    test_doc = {
        "split_name": "test",
        "version": LAYOUT_VERSION,
        "gallery_images": [entry(r) for r in gallery],
        "query_images": [entry(r) for r in query],
    }
    train_doc = {
        "split_name": "train",
        "version": LAYOUT_VERSION,
        "gallery_images": [entry(r) for r in train],
    }
    stats = {
        "release_version": LAYOUT_VERSION,
        "source": getattr(dataset, "name", type(dataset).__name__),
        "identity": dataset.identity(),
        "official": {
            "gallery_images": len(gallery),
            "gallery_crater_ids": len({r.crater_id for r in gallery}),
            "query_images": len(query),
            "query_crater_ids": len({r.crater_id for r in query}),
            "train_images": len(train),
            "train_crater_ids": len({r.crater_id for r in train}),
            "filtered_multilabel_queries": sum(len(r.relevant_ids) > 1 for r in query),
            "max_filtered_relevant_ids": max((len(r.relevant_ids) for r in query), default=0),
        },
        "export": {
            "images_written": written,
            "images_total": len(unique),
            "seconds": round(seconds, 3),
            "images_per_second": round(written / seconds, 2) if written and seconds else None,
            "workers": workers,
        },
    }
    _dump(out / "splits/test.json", test_doc)
    _dump(out / "splits/train.json", train_doc)
    _dump(out / "metadata/query_relevance.json", {"version": LAYOUT_VERSION, "queries": relevance})
    _dump(out / "metadata/stats.json", stats)
    if make_zip:
        _zip_images(out, (entry(r)["path"] for r in unique.values()))
    return stats


def _run_jobs(
    dataset: CraterDataset,
    jobs: Sequence[tuple[ImageRecord, str, int]],
    workers: int,
    progress: bool,
) -> int:
    bar = tqdm(total=len(jobs), desc="export", unit="img", disable=not progress)
    written = 0
    if workers <= 1:
        for record, target, quality in jobs:
            written += _write(dataset, record, Path(target), quality)
            bar.update()
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(dataset,)) as pool:
            for n in pool.map(_write_one, jobs, chunksize=16):
                written += n
                bar.update()
    bar.close()
    return written


def _dump(path: Path, doc: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def _zip_images(out: Path, paths: Iterable[str]) -> None:
    """Package the images as images.zip (stored: JPEGs do not compress), like the release."""
    tmp = out / ".images.zip.tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for p in paths:
            zf.write(out / p, arcname=p)
    os.replace(tmp, out / "images.zip")
