"""Run a backbone over a dataset split, batched, with progress, through the feature cache.

Images are decoded and transformed in DataLoader workers (``num_workers``) and copied to the
accelerator from pinned memory, so on a GPU the decode/resize overlaps the forward passes. With
``num_workers=0`` a background thread decodes the next batches (:func:`prefetch`) while the
forward pass runs (torch releases the GIL in its kernels), so decoding overlaps it there too.
Results are returned on CPU: cls and attn float32, tokens float16 (memory-mapped when they come
from the cache; consumers cast chunks to float32). With and without the cache the values are
the same (tokens are rounded to fp16 either way).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from craterlab.cache import FeatureCache, dataset_label, entry_of, renders_dir
from craterlab.checks import check_batch_before_caching
from craterlab.data.base import listing
from craterlab.devices import resolve_device
from craterlab.errors import CraterlabError, DataError
from craterlab.types import Backbone, CraterDataset, Features, ImageRecord

log = logging.getLogger(__name__)

T = TypeVar("T")
_END = object()


@dataclass
class ExtractInfo:
    """How features were obtained: from the cache or computed, how long, how many images."""

    cache_hit: bool
    seconds: float
    images: int
    path: str | None = None
    computed: int = 0  # images actually run through the backbone (0 on a hit; < images on resume)

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 and self.computed else 0.0


@dataclass
class BadImage:
    """An image the dataset could not decode: which one and the dataset's message."""

    image_id: str
    message: str


class RecordImages(Dataset):
    """Records -> transformed image tensors (runs in DataLoader workers).

    An image the dataset cannot decode (its CraterlabError) comes back as a :class:`BadImage`
    instead of stopping the worker, so one pass can report every bad image of the split.
    """

    def __init__(self, dataset: CraterDataset, records: Sequence[ImageRecord], transform: Any):
        self.dataset = dataset
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> torch.Tensor | BadImage:
        record = self.records[i]
        try:
            image = self.dataset.load_image(record)
        except CraterlabError as exc:
            return BadImage(record.image_id, str(exc))
        return self.transform(image)


@dataclass
class BadBatch:
    """A batch holding undecodable images: its size and the bad ones."""

    size: int
    bad: list[BadImage]


def collate_images(items: list[torch.Tensor | BadImage]) -> torch.Tensor | BadBatch:
    """A batch tensor, or a BadBatch when any of its images could not be decoded."""
    bad = [x for x in items if isinstance(x, BadImage)]
    return BadBatch(len(items), bad) if bad else default_collate(items)


def bad_images_error(bad: Sequence[BadImage], where: str, total: int) -> DataError:
    """All images of a split that failed to decode, in one message."""
    lines = [b.message.replace("\n", " ") for b in bad]
    return DataError(
        f"{len(bad)} of {total} images of {where} could not be decoded (nothing was encoded "
        "after the first; features computed before it are kept for the next run):"
        f"{listing(lines)}\nReplace or remove these images. File datasets read every image "
        "header up front (dataset.check_files=true) and can leave bad ones out with "
        "dataset.skip_bad=true; an image damaged past its header is only found here."
    )


def make_loader(
    dataset: CraterDataset,
    records: Sequence[ImageRecord],
    transform: Any,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> DataLoader:
    """Batches of transformed images; workers decode ahead, pinned memory on CUDA."""
    return DataLoader(
        RecordImages(dataset, records, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """``items`` produced by a background thread up to ``depth`` ahead of the consumer.

    The producer's exception is raised in the consumer at the point it happened; when the
    consumer stops early the producer stops after its current item.
    """
    ready: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any, exc: BaseException | None = None) -> bool:
        while not stop.is_set():
            try:
                ready.put((item, exc), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put(_END, exc)
            return
        put(_END)

    worker = threading.Thread(target=produce, name="craterlab-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, exc = ready.get()
            if item is _END:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        worker.join()


def _empty(backbone: Backbone) -> Features:
    d = backbone.dim
    attn = torch.zeros(0, 0) if backbone.has_attention else None
    return Features(torch.zeros(0, d), torch.zeros(0, 0, d, dtype=torch.float16), attn, (0, 0))


def _batches(
    backbone: Backbone,
    loader: DataLoader,
    device: torch.device,
    *,
    total: int,
    initial: int,
    progress: bool,
    desc: str,
) -> Any:
    """Yield CPU Features batch by batch with a tqdm bar.

    After an image fails to decode nothing more is encoded, but the remaining images are still
    decoded so that the DataError raised at the end names every bad image of the split.
    """
    from tqdm.auto import tqdm

    bad: list[BadImage] = []
    with tqdm(total=total, initial=initial, disable=not progress, desc=desc, unit="img") as bar:
        batches = prefetch(loader) if loader.num_workers == 0 else loader
        for images in batches:
            if isinstance(images, BadBatch) or bad:
                bad += images.bad if isinstance(images, BadBatch) else []
                bar.update(len(images) if isinstance(images, torch.Tensor) else images.size)
                continue
            feats = backbone.encode(images.to(device, non_blocking=True))
            out = Features(
                cls=feats.cls.float().cpu(),
                tokens=feats.tokens.to(torch.float16).cpu(),
                attn=None if feats.attn is None else feats.attn.float().cpu(),
                grid=feats.grid,
            )
            bar.update(len(out))
            yield out
    if bad:
        raise bad_images_error(bad, desc.removeprefix("encode "), total)


def extract_features(
    backbone: Backbone,
    dataset: CraterDataset,
    split: str,
    *,
    device: torch.device | str,
    batch_size: int = 32,
    num_workers: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    commit_every: int | None = None,
    verify: bool | None = None,
) -> tuple[Features, ExtractInfo]:
    """Features of every image of ``dataset.records(split)``, in record order, on CPU.

    With ``cache_dir`` a cached entry is returned without any forward pass (a cache hit), a
    partial one is resumed, and a computed one is stored. ``commit_every`` (images, default
    max(batch_size, 1024)) sets how often progress is made durable; ``verify`` forces (or
    skips) checksum verification of a cached entry.
    """
    t0 = time.perf_counter()
    device = resolve_device(device)
    records = list(dataset.records(split))
    n = len(records)
    backbone.to(device)
    name = dataset_label(dataset)
    desc = f"encode {name}/{split}"
    if n == 0:
        return _empty(backbone), ExtractInfo(False, time.perf_counter() - t0, 0, None)

    def loader_from(start: int) -> DataLoader:
        return make_loader(
            dataset,
            records[start:],
            backbone.transform,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
        )

    if cache_dir is None:
        parts = list(
            _batches(
                backbone, loader_from(0), device, total=n, initial=0, progress=progress, desc=desc
            )
        )
        feats = Features(
            cls=torch.cat([p.cls for p in parts]),
            tokens=torch.cat([p.tokens for p in parts]),
            attn=None if parts[0].attn is None else torch.cat([p.attn for p in parts]),
            grid=parts[0].grid,
        )
        return feats, ExtractInfo(False, time.perf_counter() - t0, n, None, computed=n)

    if callable(cache_renders := getattr(dataset, "cache_renders", None)):
        cache_renders(renders_dir(cache_dir, dataset.identity()))  # render each image once
    entry = entry_of(backbone, dataset, split)
    cache = FeatureCache(cache_dir)
    with cache.lock(entry):
        cached = cache.load(entry, verify=verify)
        if cached is not None:
            if len(cached) != n:
                log.warning(
                    "Cache entry %s has %d images, expected %d; rebuilding", entry, len(cached), n
                )
                cache.path(entry).rename(cache.path(entry).with_name(entry + ".stale"))
                import shutil

                shutil.rmtree(cache.path(entry).with_name(entry + ".stale"), ignore_errors=True)
            else:
                secs = time.perf_counter() - t0
                log.info("Feature cache hit: %s (%d images, %.2f s)", cache.path(entry), n, secs)
                return cached, ExtractInfo(True, secs, n, str(cache.path(entry)), computed=0)
        writer = cache.writer(backbone, dataset, split, records)
        start = writer.done
        every = commit_every or max(batch_size, 1024)
        since = 0
        last_commit = time.monotonic()
        for batch in _batches(
            backbone,
            loader_from(start),
            device,
            total=n,
            initial=start,
            progress=progress,
            desc=desc,
        ):
            check_batch_before_caching(batch, split, writer.done, n)
            writer.write(batch)
            since += len(batch)
            if since >= every or time.monotonic() - last_commit > 60:
                writer.commit()
                since, last_commit = 0, time.monotonic()
        path = writer.finalize()
        feats = cache.load(entry, verify=False)
        if feats is None:
            raise RuntimeError(f"cache entry {path} vanished after writing")
    secs = time.perf_counter() - t0
    log.info("Encoded %d images of %s/%s in %.1f s -> %s", n - start, name, split, secs, path)
    return feats, ExtractInfo(False, secs, n, str(path), computed=n - start)
