"""On-disk feature cache: backbone outputs keyed by everything that determines them.

An entry is a directory ``<cache_dir>/<backbone>__<dataset>__<split>__<hash>/`` holding
``cls.npy`` (N, D) float32, ``tokens.npy`` (N, T, D) float16, ``attn.npy`` (N, T) float32 (when
the model has attention), ``meta.json`` (what the entry was computed from) and
``manifest.json`` (file sizes and sha256 checksums, written last) and the marker file
``craterlab-cache-entry.json``, which proves the directory is a cache entry. Tokens are read back
by memory map, so a 55,000-image ViT-S/16 entry (~4 GB) is paged in on demand, not loaded twice.

Writes are crash-safe: extraction fills ``<entry>.partial/`` chunk by chunk (``progress.json``
records how many images are flushed to disk), an interrupted run resumes there, and the finished
directory is renamed into place in one step. A lock file serializes runs racing on one entry;
an entry whose files don't match its manifest is removed and rebuilt with a warning.

Only provable entries are ever listed or removed: a directory with the marker file, or (for
entries written before the marker existed) one whose name has the entry-name shape and whose
``meta.json`` records the same key as the name's hash suffix. Anything else in the cache
directory (``runs/``, ``.git/``, a user's folder) is left alone. A cache directory this process
cannot write to is used read-only: its entries are read without a lock, and a run that needs to
write an entry stops with a message saying so.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from craterlab.errors import CraterlabError
from craterlab.hashing import sha256_of, stable_hash
from craterlab.locks import exclusive
from craterlab.types import Features

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
ARRAYS = ("cls", "tokens", "attn")
# Entries below this size are checksummed on every load; larger ones by size and header
# (checksums still verified by `cache info --verify`).
VERIFY_BELOW_BYTES = 512 << 20
# Written into every entry (partial or complete): what proves a directory is a cache entry.
ENTRY_MARKER = "craterlab-cache-entry.json"
# <label>__<dataset>__<split>__<20 hex key>, optionally .partial, .stale or .corrupt-xxxxxxxx
ENTRY_NAME = re.compile(
    r"^(?P<base>[A-Za-z0-9_.-]+__[A-Za-z0-9_.-]+__[A-Za-z0-9_.-]+__(?P<key>[0-9a-f]{20}))"
    r"(?P<suffix>\.partial|\.stale|\.corrupt-[0-9a-f]{8})?$"
)


def entry_key(backbone_identity: dict[str, Any], dataset_identity: str, split: str) -> str:
    """A stable hash of everything that determines an entry's features."""
    payload = {
        "format": CACHE_FORMAT,
        "backbone": backbone_identity,
        "dataset": dataset_identity,
        "split": split,
    }
    return stable_hash(payload, 20)


def renders_dir(cache_dir: str | Path, dataset_identity: str) -> Path:
    """Where a procedural dataset keeps its rendered images next to the feature cache (see
    :mod:`craterlab.data.render_cache`); never listed or removed as a feature entry."""
    return Path(cache_dir) / "renders" / slug(dataset_identity, 80)


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-")[:limit] or "x"


def entry_name(
    backbone_identity: dict[str, Any], dataset_name: str, dataset_identity: str, split: str
) -> str:
    """Directory name of an entry: readable prefix + content hash."""
    label = backbone_identity.get("label") or backbone_identity.get("model") or "backbone"
    key = entry_key(backbone_identity, dataset_identity, split)
    return f"{slug(label)}__{slug(dataset_name)}__{slug(split, 16)}__{key}"


def dataset_label(dataset: Any) -> str:
    """The readable dataset part of an entry's name: the dataset's ``name``, else its class."""
    return str(getattr(dataset, "name", type(dataset).__name__))


def entry_of(backbone: Any, dataset: Any, split: str) -> str:
    """The entry that holds ``backbone``'s features of ``dataset``'s ``split`` (or of a shard
    view of it): the one rule that names entries."""
    return entry_name(backbone.identity(), dataset_label(dataset), dataset.identity(), split)


def entry_meta(backbone: Any, dataset: Any, split: str, records: Sequence[Any]) -> dict[str, Any]:
    """What an entry records it was computed from (its meta.json)."""
    identity = backbone.identity()
    dataset_identity = dataset.identity()
    return {
        "key": entry_key(identity, dataset_identity, split),
        "backbone": identity,
        "weights_status": getattr(backbone, "weights_status", ""),
        "dataset_name": dataset_label(dataset),
        "dataset": dataset_identity,
        "split": split,
        "image_ids": [r.image_id for r in records],
    }


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


def reserve(path: Path) -> None:
    """Allocate every block of ``path`` now (raises OSError ENOSPC when the disk is full), so
    that writes through a memory map can never hit a full disk (a SIGBUS, not an error)."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    return  # a filesystem without fallocate: the free-space check must do
                raise
    finally:
        os.close(fd)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class CorruptEntry(Exception):
    """An entry whose files don't match its manifest."""


def entry_proof(path: Path) -> str | None:
    """Why ``path`` is provably a cache entry ('marker' or 'legacy meta'), None if it isn't.

    Legacy entries (written before the marker) count only when the name has the entry shape
    and ``meta.json`` records the key that the name ends with: no other folder matches that.
    """
    if path.is_symlink() or not path.is_dir():
        return None
    match = ENTRY_NAME.match(path.name)
    if (path / ENTRY_MARKER).is_file():
        try:
            marker = json.loads((path / ENTRY_MARKER).read_text())
        except (OSError, ValueError):
            marker = None
        if isinstance(marker, dict) and marker.get("craterlab_cache_entry") is True:
            return "marker"
    if match is None:
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(meta, dict) and str(meta.get("key", ""))[:20] == match["key"]:
        return "legacy meta"
    return None


def writable_dir(path: Path) -> bool:
    """Whether this process can create files in ``path`` (created if missing); tries it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".craterlab-write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return False
    return True


def read_only_error(root: Path, name: str, action: str) -> CraterlabError:
    return CraterlabError(
        f"The feature cache directory {root} is not writable (read-only or permission denied), "
        f"and this run must {action} entry {name}. Make the directory writable, point the cache "
        "at a writable folder (cache.dir=/path or CRATERLAB_CACHE=/path), or run without the "
        "cache (cache.enabled=false). Entries it already holds are read from it read-only."
    )


def check_progress(state: Any, images: int, arrays: Any) -> int:
    """The ``done`` count of a partial entry's progress.json; ValueError when it can't be true.

    A hand-edited or damaged progress file must not resume past the data really written: the
    count must be an integer in [0, images], the arrays the ones an entry has, and every row
    claimed done must hold data (a never-written row is all zeros).
    """
    if not isinstance(state, dict) or not isinstance(state.get("done"), int):
        raise ValueError("progress.json has no integer 'done'")
    done = state["done"]
    if isinstance(done, bool) or not 0 <= done <= images:
        raise ValueError(f"progress.json says {done!r} of {images} images are done")
    names = state.get("arrays")
    if not isinstance(names, list) or not {"cls", "tokens"} <= set(names) <= set(ARRAYS):
        raise ValueError(f"progress.json lists arrays {names!r}")
    cls = arrays.get("cls")
    if cls is not None and done and not np.abs(np.asarray(cls[:done])).sum(axis=1).all():
        raise ValueError("progress.json counts rows that were never written")
    return done


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
                    for name in state["arrays"] if isinstance(state, dict) else ():
                        if name not in ARRAYS:
                            raise ValueError(f"progress.json lists an unknown array {name!r}")
                        arrays[name] = np.lib.format.open_memmap(self.dir / f"{name}.npy", "r+")
                        if arrays[name].shape[0] != self.images:
                            raise ValueError(f"{name}.npy has {arrays[name].shape[0]} rows")
                    self.done = check_progress(state, self.images, arrays)
                    self.arrays = arrays
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
        _write_json_atomic(
            self.dir / ENTRY_MARKER,
            {"craterlab_cache_entry": True, "format": CACHE_FORMAT, "key": self.meta.get("key")},
        )
        _write_json_atomic(self.dir / "meta.json", self.meta)

    def _allocate(self, features: Features) -> None:
        n = self.images
        specs = {
            "cls": (np.float32, (n, *features.cls.shape[1:])),
            "tokens": (np.float16, (n, *features.tokens.shape[1:])),
        }
        if features.attn is not None:
            specs["attn"] = (np.float32, (n, *features.attn.shape[1:]))
        needed = sum(
            int(np.prod(shape)) * np.dtype(dtype).itemsize for dtype, shape in specs.values()
        )
        free = shutil.disk_usage(self.dir).free
        if free < needed:
            self._out_of_space(needed, free)
        try:
            for name, (dtype, shape) in specs.items():
                self.arrays[name] = np.lib.format.open_memmap(
                    self.dir / f"{name}.npy", "w+", dtype=dtype, shape=shape
                )
                reserve(self.dir / f"{name}.npy")
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self._out_of_space(needed, shutil.disk_usage(self.dir).free)
        self.meta["grid"] = list(features.grid)
        _write_json_atomic(self.dir / "meta.json", self.meta)

    def _out_of_space(self, needed: int, free: int) -> None:
        """Remove this partial entry (nothing else changes) and say what space is missing.

        The arrays are memory-mapped: writing into a sparse file on a full disk would kill the
        process with a bus error, so the space is reserved (fallocate) before any row is
        written."""
        self.arrays.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        raise CraterlabError(
            f"Not enough disk space for the feature cache entry {self.final_dir.name}: it "
            f"needs {human_bytes(needed)} in {self.dir.parent}, {human_bytes(free)} are "
            "free. Nothing was written (the cache is as it was). Free some space, point the "
            "cache at another disk (cache.dir=/path or CRATERLAB_CACHE=/path), or run without "
            "it (cache.enabled=false)."
        )

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
                files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
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
    files = manifest.get("files", {}) if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not set(files) <= {f"{a}.npy" for a in ARRAYS}:
        names = sorted(files or ())
        raise CorruptEntry(f"manifest names files other than the entry's arrays: {names}")
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
            if sha256_of(path / name) != info["sha256"]:
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
        self.read_only = False

    def path(self, name: str) -> Path:
        return self.root / name

    @contextlib.contextmanager
    def lock(self, name: str, poll_s: float = 0.5) -> Iterator[None]:
        """Exclusive lock on one entry, so two runs never extract into it at once.

        In a directory this process cannot write, no lock is taken: entries are only read.
        """
        handle = None
        if writable_dir(self.root):
            with contextlib.suppress(OSError):
                handle = open(self.root / f"{name}.lock", "a+")  # noqa: SIM115 (closed below)
        if handle is None:
            if not self.root.is_dir():
                raise read_only_error(self.root, name, "create")
            self.read_only = True
            log.warning("Feature cache %s is not writable: using it read-only.", self.root)
            yield
            return
        waiting = f"Waiting for another run that is extracting {name} ..."
        with handle as f, exclusive(f, waiting):
            yield

    def load(self, name: str, *, verify: bool | None = None) -> Features | None:
        """The entry's features, None when absent; a corrupt entry is removed (with a warning)."""
        path = self.path(name)
        if not path.exists():
            return None
        try:
            return load_entry(path, verify=verify)
        except CorruptEntry as exc:
            if self.read_only or not writable_dir(self.root):
                raise CraterlabError(
                    f"Feature cache entry {path} is corrupt ({exc}), and the cache directory "
                    "is not writable, so it can't be rebuilt. Make the directory writable, "
                    "point the cache elsewhere (cache.dir=/path), or set cache.enabled=false."
                ) from None
            log.warning("Feature cache entry %s is corrupt (%s); rebuilding it.", path, exc)
            trash = path.with_name(f"{path.name}.corrupt-{uuid.uuid4().hex[:8]}")
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            return None

    def writer(
        self, backbone: Any, dataset: Any, split: str, records: Sequence[Any]
    ) -> EntryWriter:
        """A writer of the entry of ``backbone`` x ``dataset``'s ``split`` (:func:`entry_of`),
        its meta recording what it is computed from (:func:`entry_meta`); resumes a partial
        entry."""
        name = entry_of(backbone, dataset, split)
        if self.read_only or not writable_dir(self.root):
            raise read_only_error(self.root, name, "write")
        return EntryWriter(
            self.path(name), len(records), entry_meta(backbone, dataset, split, records)
        )


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
    """Every provable entry (complete, partial or corrupt) under ``cache_dir``, with its size.

    Folders that are not provably entries (see :func:`entry_proof`) are not listed:
    :func:`other_items` names them.
    """
    root = Path(cache_dir)
    if not root.is_dir():
        return []
    out = []
    for path in sorted(p for p in root.iterdir() if entry_proof(p)):
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
        suffix = (m := ENTRY_NAME.match(path.name)) and m["suffix"]
        if suffix and suffix != ".partial":  # trash a crashed rebuild left behind
            info.status, info.problem = "corrupt", "left over from a rebuild"
        elif path.name.endswith(".partial"):
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


def other_items(cache_dir: str | Path) -> list[Path]:
    """What sits in ``cache_dir`` besides entries and their lock files (never touched)."""
    root = Path(cache_dir)
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if not entry_proof(p)
        and not (p.suffix == ".lock" and p.is_file() and ENTRY_NAME.match(p.name[:-5]))
    )


def select_entries(
    cache_dir: str | Path, *, pattern: str = "*", status: str | None = None
) -> list[CacheEntryInfo]:
    """The entries ``clear_cache`` would remove: provable entries matching pattern and status."""
    return [
        info
        for info in cache_info(cache_dir)
        if fnmatch.fnmatch(info.name, pattern) and (not status or info.status == status)
    ]


def clear_cache(
    cache_dir: str | Path,
    *,
    pattern: str = "*",
    status: str | None = None,
) -> list[CacheEntryInfo]:
    """Remove entries whose name matches ``pattern`` (and ``status`` if given); returns them.

    Only provable entries are removed (see :func:`entry_proof`), plus the lock files of entries
    that no longer exist; nothing else in the directory is touched.
    """
    removed = []
    for info in select_entries(cache_dir, pattern=pattern, status=status):
        path = Path(info.path)
        if entry_proof(path):  # re-checked right before deleting
            shutil.rmtree(path, ignore_errors=True)
            removed.append(info)
    root = Path(cache_dir)
    if root.is_dir():
        for lock in root.glob("*.lock"):
            base = lock.name[:-5]
            if lock.is_file() and ENTRY_NAME.match(base) and not (root / base).exists():
                with contextlib.suppress(OSError):
                    lock.unlink()
    return removed


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
