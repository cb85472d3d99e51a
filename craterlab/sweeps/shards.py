"""Sharded feature extraction: one dataset split encoded as N jobs, merged into one entry.

``python -m craterlab -m extract.num_shards=N 'extract.shard=range(N)' [launcher]`` runs N
jobs; job i encodes rows ``shard_range(i)`` of each split in ``extract.splits`` and stores them
as an ordinary content-keyed cache entry of a :class:`ShardView` (the dataset restricted to
those rows, with its own identity). The job that finds all N parts complete merges them, under
the entry's lock, into the entry a normal run reads, then removes the parts. Later runs are
cache hits and never see the shards.

Shard boundaries fall on multiples of ``batch_size``, so every backbone batch of a shard job
is a batch of the single-job extraction: the merged entry has the same name (key) and the same
bytes as one job's extraction with the same settings (a test compares them).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from craterlab.backbones.extract import extract_features
from craterlab.cache import FeatureCache, dataset_label, entry_of, load_entry
from craterlab.errors import ConfigError
from craterlab.plugins import get_registry
from craterlab.types import CraterDataset, Features, ImageRecord

log = logging.getLogger("craterlab")

MERGE_ROWS = 1024  # rows copied per step when merging (bounded memory for large entries)


def shard_range(images: int, batch_size: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Rows [lo, hi) of shard ``shard`` of ``num_shards``: whole batches, spread evenly."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ConfigError(
            f"extract.shard={shard} is not a shard of extract.num_shards={num_shards}: use "
            f"extract.shard=0..{max(num_shards - 1, 0)} (e.g. 'extract.shard=range({num_shards})' "
            "in a sweep)."
        )
    batches = -(-images // batch_size)
    first = shard * batches // num_shards
    last = (shard + 1) * batches // num_shards
    return min(first * batch_size, images), min(last * batch_size, images)


class ShardView:
    """``dataset`` with one split restricted to rows [lo, hi): what a shard job encodes."""

    def __init__(self, dataset: CraterDataset, split: str, lo: int, hi: int, of: str) -> None:
        self.dataset = dataset
        self.split = split
        self.lo, self.hi = lo, hi
        self.name = dataset_label(dataset)
        self.label = of  # "shard i/N"

    def records(self, split: str) -> Sequence[ImageRecord]:
        if split != self.split:
            raise ValueError(f"a shard of split {self.split!r} has no split {split!r}")
        return list(self.dataset.records(split))[self.lo : self.hi]

    def load_image(self, record: ImageRecord) -> Any:
        return self.dataset.load_image(record)

    def identity(self) -> str:
        return f"{self.dataset.identity()}|{self.label} rows {self.lo}:{self.hi}"


def shard_views(
    dataset: CraterDataset, split: str, batch_size: int, num_shards: int
) -> list[ShardView]:
    """The N views of ``split`` that N shard jobs encode."""
    n = len(dataset.records(split))
    views = []
    for i in range(num_shards):
        lo, hi = shard_range(n, batch_size, i, num_shards)
        views.append(ShardView(dataset, split, lo, hi, f"shard {i}/{num_shards}"))
    return views


def part_path(cache: FeatureCache, backbone: Any, view: ShardView) -> Path:
    """Where shard ``view``'s part lives in the cache (a content-keyed entry)."""
    return cache.path(entry_of(backbone, view, view.split))


def merge_shards(
    backbone: Any,
    dataset: CraterDataset,
    split: str,
    *,
    batch_size: int,
    num_shards: int,
    cache_dir: str | Path,
) -> Path | None:
    """Merge the N complete parts of ``split`` into its entry; None while a part is missing.

    Runs under the entry's lock, so of several jobs finishing at once one merges and the
    others find the entry done. The parts are removed once the entry is in place.
    """
    cache = FeatureCache(cache_dir)
    records = list(dataset.records(split))
    name = dataset_label(dataset)
    entry = entry_of(backbone, dataset, split)
    views = shard_views(dataset, split, batch_size, num_shards)
    parts = [part_path(cache, backbone, v) for v in views]
    with cache.lock(entry):
        if cache.load(entry, verify=False) is not None:
            return cache.path(entry)
        missing = [
            i
            for i, (v, p) in enumerate(zip(views, parts, strict=True))
            if v.hi > v.lo and not (p / "manifest.json").is_file()
        ]
        if missing:
            log.info("Shards %s of %s/%s are not done yet: no merge", missing, name, split)
            return None
        writer = cache.writer(backbone, dataset, split, records)
        for view, part in zip(views, parts, strict=True):
            if view.hi == view.lo:
                continue
            feats = load_entry(part, verify=True)
            if len(feats) != view.hi - view.lo:
                expected = view.hi - view.lo
                raise RuntimeError(f"shard part {part} has {len(feats)} rows, not {expected}")
            for lo in range(max(writer.done, view.lo), view.hi, MERGE_ROWS):
                hi = min(lo + MERGE_ROWS, view.hi)
                writer.write(rows(feats, lo - view.lo, hi - view.lo))
            writer.commit()
        path = writer.finalize()
        for part in parts:
            shutil.rmtree(part, ignore_errors=True)
    log.info("Merged %d shards of %s/%s into %s", num_shards, name, split, path)
    return path


def rows(feats: Features, lo: int, hi: int) -> Features:
    """Rows [lo, hi) of ``feats`` as CPU tensors in the dtypes an entry stores."""
    return Features(
        cls=feats.cls[lo:hi],
        tokens=torch.as_tensor(feats.tokens[lo:hi]),
        attn=None if feats.attn is None else feats.attn[lo:hi],
        grid=feats.grid,
    )


def shard_of(cfg: Any) -> tuple[int, int] | None:
    """(shard, num_shards) when the config asks this job to extract one shard, else None."""
    extract = cfg.get("extract") or {}
    if extract.get("shard") is None:
        return None
    return int(extract["shard"]), int(extract.get("num_shards") or 1)


def run_extract_shard(cfg: Any, device: torch.device) -> dict[str, float]:
    """The job ``extract.shard=i extract.num_shards=N``: encode shard i of every split in
    ``extract.splits`` into the cache, merge when all shards are there; timings returned."""
    shard, num_shards = shard_of(cfg)  # type: ignore[misc]
    if not cfg.cache.enabled:
        raise ConfigError(
            "extract.shard needs the feature cache: shard jobs meet in it. Remove "
            "cache.enabled=false and point cache.dir (or CRATERLAB_CACHE) at a folder every "
            "job can reach."
        )
    if cfg.train.name != "none":
        raise ConfigError(
            f"extract.shard encodes with a frozen backbone, but train={cfg.train.name} "
            "fine-tunes it first. Extract shards with train=none, or run without extract.shard."
        )
    registry = get_registry()
    seed = int(cfg.seed)
    dataset = registry.build("dataset", cfg.dataset, seed=seed)
    backbone = registry.build("backbone", cfg.backbone, seed=seed).to(device)
    batch_size = int(cfg.batch_size)
    timings: dict[str, float] = {}
    for split in cfg.extract.get("splits") or ("gallery", "query"):
        n = len(dataset.records(split))
        lo, hi = shard_range(n, batch_size, shard, num_shards)
        view = ShardView(dataset, split, lo, hi, f"shard {shard}/{num_shards}")
        t0 = time.perf_counter()
        if hi > lo:
            _, info = extract_features(
                backbone,
                view,
                split,
                device=device,
                batch_size=batch_size,
                num_workers=int(cfg.num_workers),
                cache_dir=str(cfg.cache.dir),
            )
            timings[f"encode_{split}_cache_hit"] = float(info.cache_hit)
        merged = merge_shards(
            backbone,
            dataset,
            split,
            batch_size=batch_size,
            num_shards=num_shards,
            cache_dir=str(cfg.cache.dir),
        )
        timings[f"encode_{split}_seconds"] = time.perf_counter() - t0
        print(
            f"extract {split}: shard {shard}/{num_shards}, rows {lo}:{hi} of {n}"
            + (f"; all shards merged into {merged}" if merged else "; waiting for other shards")
        )
    return timings
