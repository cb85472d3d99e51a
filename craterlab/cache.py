"""On-disk feature cache: backbone outputs keyed by everything that determines them.

An entry is a directory ``<cache_dir>/<backbone>__<dataset>__<split>__<hash>/`` holding
``cls.npy`` (N, D) float32, ``tokens.npy`` (N, T, D) float16, ``attn.npy`` (N, T) float32 (when
the model has attention), ``meta.json`` (what the entry was computed from) and
``manifest.json`` (file sizes and sha256 checksums, written last). Tokens are read back by memory
map, so a 55,000-image ViT-S/16 entry (~4 GB) is paged in on demand, not loaded twice.

Writes are crash-safe: extraction fills ``<entry>.partial/`` chunk by chunk (``progress.json``
records how many images are flushed to disk), an interrupted run resumes there, and the finished
directory is renamed into place in one step. A lock file serializes runs racing on one entry;
an entry whose files don't match its manifest is removed and rebuilt with a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from craterlab.hashing import stable_hash
from craterlab.types import Features

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
ARRAYS = ("cls", "tokens", "attn")
# Entries below this size are checksummed on every load; larger ones by size and header
# (checksums still verified by `cache info --verify`).
VERIFY_BELOW_BYTES = 512 << 20


def entry_key(backbone_identity: dict[str, Any], dataset_identity: str, split: str) -> str:
    """A stable hash of everything that determines an entry's features."""
    payload = {
        "format": CACHE_FORMAT,
        "backbone": backbone_identity,
        "dataset": dataset_identity,
        "split": split,
    }
    return stable_hash(payload, 20)


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-")[:limit] or "x"


def entry_name(
    backbone_identity: dict[str, Any], dataset_name: str, dataset_identity: str, split: str
) -> str:
    """Directory name of an entry: readable prefix + content hash."""
    label = backbone_identity.get("label") or backbone_identity.get("model") or "backbone"
    key = entry_key(backbone_identity, dataset_identity, split)
    return f"{slug(label)}__{slug(dataset_name)}__{slug(split, 16)}__{key}"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every filesystem
        _fsync_file(path)


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class CorruptEntry(Exception):
    """An entry whose files don't match its manifest."""


# --------------------------------------------------------------------------- writing


class EntryWriter:
    """Fills a ``.partial`` directory chunk by chunk; resumes one a previous run left behind."""

    def __init__(self, final_dir: Path, images: int, meta: dict[str, Any]) -> None:
        self.final_dir = final_dir
        self.dir = final_dir.with_name(final_dir.name + ".partial")
        self.images = images
        self.meta = {**meta, "images": images, "format": CACHE_FORMAT}
        self.done = 0
        self.arrays: dict[str, np.memmap] = {}
        self._resume()

    def _resume(self) -> None:
        progress = self.dir / "progress.json"
        meta_path = self.dir / "meta.json"
        if self.dir.exists() and progress.exists() and meta_path.exists():
            try:
                old_meta = json.loads(meta_path.read_text())
                state = json.loads(progress.read_text())
                if old_meta.get("key") == self.meta.get("key") and old_meta.get("images") == (
                    self.images
                ):
                    arrays = {}
                    for name in state["arrays"]:
                        arrays[name] = np.lib.format.open_memmap(self.dir / f"{name}.npy", "r+")
                        if arrays[name].shape[0] != self.images:
                            raise ValueError(f"{name}.npy has {arrays[name].shape[0]} rows")
                    self.arrays = arrays
                    self.done = int(state["done"])
                    log.info(
                        "Resuming feature extraction at %d/%d images (%s)",
                        self.done,
                        self.images,
                        self.dir,
                    )
                    return
            except Exception as exc:
                log.warning("Discarding unreadable partial cache entry %s (%s)", self.dir, exc)
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        _write_json_atomic(self.dir / "meta.json", self.meta)

    def _allocate(self, features: Features) -> None:
        n = self.images
        specs = {
            "cls": (np.float32, (n, *features.cls.shape[1:])),
            "tokens": (np.float16, (n, *features.tokens.shape[1:])),
        }
        if features.attn is not None:
            specs["attn"] = (np.float32, (n, *features.attn.shape[1:]))
        for name, (dtype, shape) in specs.items():
            self.arrays[name] = np.lib.format.open_memmap(
                self.dir / f"{name}.npy", "w+", dtype=dtype, shape=shape
            )
        self.meta["grid"] = list(features.grid)
        _write_json_atomic(self.dir / "meta.json", self.meta)

    def write(self, features: Features) -> None:
        """Append a batch (CPU tensors) at the current position; call ``commit`` to persist."""
        if not self.arrays:
            self._allocate(features)
        b = len(features)
        lo, hi = self.done, self.done + b
        if hi > self.images:
            raise ValueError(f"writing rows {lo}:{hi} into an entry of {self.images} images")
        self.arrays["cls"][lo:hi] = features.cls.float().numpy()
        self.arrays["tokens"][lo:hi] = features.tokens.to(torch.float16).numpy()
        if "attn" in self.arrays:
            if features.attn is None:
                raise ValueError("a batch without attention in an entry with attention")
            self.arrays["attn"][lo:hi] = features.attn.float().numpy()
        self.done = hi

    def commit(self) -> None:
        """Flush written rows to disk, then record the progress (never ahead of the data)."""
        for name, arr in self.arrays.items():
            arr.flush()
            _fsync_file(self.dir / f"{name}.npy")
        _write_json_atomic(
            self.dir / "progress.json", {"done": self.done, "arrays": sorted(self.arrays)}
        )

    def finalize(self) -> Path:
        """Write the manifest last and move the entry into place (rename wins a race)."""
        if self.done != self.images:
            raise RuntimeError(f"finalize with {self.done}/{self.images} images written")
        self.commit()
        self.arrays.clear()  # close the memmaps
        files = {}
        for name in ARRAYS:
            path = self.dir / f"{name}.npy"
            if path.exists():
                files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        (self.dir / "progress.json").unlink()
        _write_json_atomic(
            self.dir / "manifest.json",
            {"files": files, "created": time.time(), "format": CACHE_FORMAT},
        )
        _fsync_dir(self.dir)
        try:
            os.rename(self.dir, self.final_dir)
        except OSError:
            if (self.final_dir / "manifest.json").exists():  # another run finished first
                shutil.rmtree(self.dir, ignore_errors=True)
            else:
                raise
        _fsync_dir(self.final_dir.parent)
        return self.final_dir


# --------------------------------------------------------------------------- reading


def load_entry(path: str | Path, *, verify: bool | None = None) -> Features:
    """An entry as CPU Features; tokens (fp16) memory-mapped, cls and attn in RAM as float32.

    Raises CorruptEntry when a file is missing, has the wrong size or shape, or (with
    ``verify``; default: entries under 512 MB) the wrong checksum.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise CorruptEntry(f"unreadable manifest or meta ({exc})") from exc
    files = manifest.get("files", {})
    if "cls.npy" not in files or "tokens.npy" not in files:
        raise CorruptEntry("manifest lists no cls/tokens arrays")
    total = sum(f["bytes"] for f in files.values())
    for name, info in files.items():
        p = path / name
        if not p.exists():
            raise CorruptEntry(f"{name} is missing")
        if p.stat().st_size != info["bytes"]:
            raise CorruptEntry(
                f"{name} has {p.stat().st_size} bytes, manifest says {info['bytes']}"
            )
    if verify is None:
        verify = total < VERIFY_BELOW_BYTES
    if verify:
        for name, info in files.items():
            if _sha256(path / name) != info["sha256"]:
                raise CorruptEntry(f"{name} does not match its checksum")
    arrays: dict[str, np.ndarray] = {}
    try:
        for name in files:
            arrays[name[:-4]] = np.load(path / name, mmap_mode="c")
    except ValueError as exc:
        raise CorruptEntry(f"unreadable array ({exc})") from exc
    n = meta.get("images")
    if any(a.shape[0] != n for a in arrays.values()):
        raise CorruptEntry(f"array rows differ from the {n} images in meta.json")
    attn = arrays.get("attn")
    return Features(
        cls=torch.from_numpy(np.ascontiguousarray(arrays["cls"], dtype=np.float32)),
        tokens=torch.from_numpy(arrays["tokens"]),
        attn=None if attn is None else torch.from_numpy(np.array(attn, dtype=np.float32)),
        grid=tuple(meta["grid"]),
    )


class FeatureCache:
    """The cache directory: locate, lock, load, write and list entries."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    @contextlib.contextmanager
    def lock(self, name: str, poll_s: float = 0.5) -> Iterator[None]:
        """Exclusive lock on one entry, so two runs never extract into it at once."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{name}.lock", "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("Waiting for another run that is extracting %s ...", name)
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def load(self, name: str, *, verify: bool | None = None) -> Features | None:
        """The entry's features, None when absent; a corrupt entry is removed (with a warning)."""
        path = self.path(name)
        if not path.exists():
            return None
        try:
            return load_entry(path, verify=verify)
        except CorruptEntry as exc:
            log.warning("Feature cache entry %s is corrupt (%s); rebuilding it.", path, exc)
            trash = path.with_name(f"{path.name}.corrupt-{uuid.uuid4().hex[:8]}")
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            return None

    def writer(self, name: str, images: int, meta: dict[str, Any]) -> EntryWriter:
        self.root.mkdir(parents=True, exist_ok=True)
        return EntryWriter(self.path(name), images, meta)


# --------------------------------------------------------------------------- listing


@dataclass
class CacheEntryInfo:
    """One entry as `cache info` shows it."""

    name: str
    path: str
    status: str  # 'complete', 'partial', 'corrupt'
    bytes: int
    images: int | None
    done: int | None
    backbone: str = ""
    weights: str = ""
    dataset: str = ""
    split: str = ""
    created: float | None = None
    problem: str = ""
    meta: dict[str, Any] = field(default_factory=dict, repr=False)


def cache_info(cache_dir: str | Path, *, verify: bool = False) -> list[CacheEntryInfo]:
    """Every entry (complete, partial or corrupt) under ``cache_dir``, with its size on disk."""
    root = Path(cache_dir)
    if not root.is_dir():
        return []
    out = []
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
        ident = meta.get("backbone", {}) if isinstance(meta.get("backbone"), dict) else {}
        weights = ident.get("weights", {})
        info = CacheEntryInfo(
            name=path.name,
            path=str(path),
            status="complete",
            bytes=_dir_bytes(path),
            images=meta.get("images"),
            done=meta.get("images"),
            backbone=str(ident.get("label", "")),
            weights=str(weights.get("weights", "")) if isinstance(weights, dict) else "",
            dataset=str(meta.get("dataset_name", "")),
            split=str(meta.get("split", "")),
            meta=meta,
        )
        if path.name.endswith(".partial"):
            info.status = "partial"
            try:
                info.done = json.loads((path / "progress.json").read_text())["done"]
            except (OSError, ValueError, KeyError):
                info.done = 0
        else:
            try:
                load_entry(path, verify=verify)
                info.created = json.loads((path / "manifest.json").read_text()).get("created")
            except CorruptEntry as exc:
                info.status, info.problem = "corrupt", str(exc)
        out.append(info)
    return out


def clear_cache(
    cache_dir: str | Path,
    *,
    pattern: str = "*",
    status: str | None = None,
) -> list[CacheEntryInfo]:
    """Remove entries whose name matches ``pattern`` (and ``status`` if given); returns them."""
    removed = []
    for info in cache_info(cache_dir):
        if not fnmatch.fnmatch(info.name, pattern) or (status and info.status != status):
            continue
        shutil.rmtree(info.path, ignore_errors=True)
        removed.append(info)
    root = Path(cache_dir)
    if root.is_dir():
        for lock in root.glob("*.lock"):
            if not (root / lock.name[:-5]).exists():
                with contextlib.suppress(OSError):
                    lock.unlink()
    return removed


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def cli(argv: list[str], cache_dir: str) -> int:
    """`python -m craterlab cache [info|clear]`: show or remove feature-cache entries."""
    parser = argparse.ArgumentParser(
        prog="python -m craterlab cache", description="Inspect or clear the feature cache."
    )
    parser.add_argument("--dir", default=cache_dir, help=f"cache directory (default {cache_dir})")
    sub = parser.add_subparsers(dest="command")
    p_info = sub.add_parser("info", help="list entries with their size and status")
    p_info.add_argument("--verify", action="store_true", help="check every file's checksum")
    p_clear = sub.add_parser("clear", help="remove entries")
    p_clear.add_argument("pattern", nargs="?", default="*", help="entry name glob (default: all)")
    p_clear.add_argument(
        "--status", choices=["complete", "partial", "corrupt"], help="only entries in this state"
    )
    args = parser.parse_args(argv or ["info"])
    root = Path(args.dir)
    if args.command in (None, "info"):
        entries = cache_info(root, verify=getattr(args, "verify", False))
        print(f"Feature cache: {root.resolve()}")
        if not entries:
            print("  (empty)")
            return 0
        for e in entries:
            progress = f"{e.done}/{e.images}" if e.status == "partial" else f"{e.images}"
            print(
                f"  {e.status:8s} {human_bytes(e.bytes):>9s}  {progress:>11s} images  {e.name}"
                + (f"  [{e.problem}]" if e.problem else "")
            )
        total = sum(e.bytes for e in entries)
        print(f"  {len(entries)} entries, {human_bytes(total)} in total")
        return 0
    removed = clear_cache(root, pattern=args.pattern, status=args.status)
    freed = sum(e.bytes for e in removed)
    print(f"Removed {len(removed)} entries ({human_bytes(freed)}) from {root.resolve()}")
    return 0
