"""Helpers shared by the file-based datasets: id mapping, path and file checks, fingerprints."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from craterlab.data.images import DEFAULT_MAX_IMAGE_PIXELS, image_problem, open_rgb
from craterlab.errors import ConfigError, DataError
from craterlab.types import ImageRecord

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "CraterIdMap",
    "FileDataset",
    "FileScreen",
    "listing",
    "open_rgb",
    "outside_root",
    "screen_files",
]

log = logging.getLogger(__name__)

SPLITS = ("gallery", "query", "train")

MAX_LISTED = 10  # offending rows/files named in one error message


def listing(items: Iterable[str], total: int | None = None) -> str:
    """Up to MAX_LISTED items, one per line, with '... and N more'."""
    items = list(items)
    n = len(items) if total is None else total
    shown = "\n  ".join(items[:MAX_LISTED])
    more = f"\n  ... and {n - MAX_LISTED} more" if n > MAX_LISTED else ""
    return f"\n  {shown}{more}"


class CraterIdMap:
    """Crater ids as they appear in files (strings or ints) <-> the integer ids of ImageRecord.

    Integer-like names keep their value (``"00017"`` -> 17), so exported synthetic sets read
    back with the same ids; any other name (``"02-1-002611"``) gets a stable index in sorted
    name order, offset past the largest integer-like id.
    """

    def __init__(self, names: Iterable[object]) -> None:
        uniq = sorted({str(n).strip() for n in names})
        numeric = {n: int(n) for n in uniq if _is_int(n)}
        other = [n for n in uniq if n not in numeric]
        start = max(numeric.values(), default=-1) + 1
        self.to_int: dict[str, int] = dict(numeric)
        self.to_int.update({n: start + i for i, n in enumerate(other)})
        self.to_name: dict[int, str] = {}
        for name, value in self.to_int.items():
            self.to_name.setdefault(value, name)

    def __call__(self, name: object) -> int:
        return self.to_int[str(name).strip()]

    def get(self, name: object) -> int | None:
        return self.to_int.get(str(name).strip())


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def outside_root(path: Path, root: Path) -> bool:
    """Whether ``path`` (absolute) leaves ``root`` lexically (``../``, another absolute path).

    Symbolic links inside the root are followed deliberately (a linked image folder is a
    normal setup); only what the listing itself spells is checked.
    """
    full = Path(os.path.normpath(path))
    base = Path(os.path.normpath(root))
    return full != base and base not in full.parents


def check_max_pixels(max_image_pixels: int | None) -> int | None:
    if max_image_pixels is not None and (
        isinstance(max_image_pixels, bool)
        or not isinstance(max_image_pixels, int)
        or max_image_pixels <= 0
    ):
        raise ConfigError(
            f"dataset.max_image_pixels must be a positive integer or null (no limit); got "
            f"{max_image_pixels!r}."
        )
    return max_image_pixels


# Files whose header passed, by (path, size, mtime_ns, max_pixels): a sweep that rebuilds the
# dataset in one process reads each header once.
_HEADERS_OK: set[tuple[str, int, int, int | None]] = set()


@dataclass
class FileScreen:
    """What a pass over a dataset's image files found.

    ``stats``: (image_id, size, mtime_ns) of every file, in listing order (-1, -1 when it
    cannot be stat'ed), for the dataset identity; ``bad``: image_id -> what is wrong.
    """

    stats: list[tuple[str, int, int]] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)


def screen_files(
    paths: Mapping[str, Path], *, check_images: bool, max_pixels: int | None
) -> FileScreen:
    """Stat every file (size, mtime) and, with ``check_images``, read its header.

    The header read (about 30 us per JPEG) finds missing files, FIFOs and devices, files that
    are no image, and decompression bombs before anything is encoded. Without it only the
    stat is done and problems surface when an image is decoded.
    """
    out = FileScreen()
    for image_id, path in paths.items():
        try:
            st = os.stat(path)
            out.stats.append((image_id, st.st_size, st.st_mtime_ns))
        except OSError:
            out.stats.append((image_id, -1, -1))
        if not check_images:
            continue
        key = (str(path), *out.stats[-1][1:], max_pixels)
        if key in _HEADERS_OK:
            continue
        problem = image_problem(path, max_pixels)
        if problem == "does not exist":
            problem += f" (looked for {path})"
        if problem:
            out.bad[image_id] = problem
        else:
            _HEADERS_OK.add(key)
    return out


def bad_files_message(where: str, bad: Mapping[str, str], labels: Mapping[str, str]) -> str:
    """All bad files, one per line with their rows, and the ways out."""
    rows = [f"{labels.get(i, i)}: {problem}" for i, problem in bad.items()]
    return (
        f"{len(bad)} image file(s) of {where} cannot be used:"
        + listing(rows)
        + "\nFix or remove these entries, or set dataset.skip_bad=true to leave them out (they "
        "are counted in the log)."
    )


def log_skipped(where: str, bad: Mapping[str, str], labels: Mapping[str, str]) -> None:
    rows = [f"{labels.get(i, i)}: {problem}" for i, problem in bad.items()]
    log.warning(
        "dataset.skip_bad=true: skipped %d bad image file(s) of %s:%s",
        len(bad),
        where,
        listing(rows),
    )


class FileDataset:
    """The dataset protocol for readers that index image files by id (release, manifest).

    Subclasses fill ``_records`` (split -> records), ``_paths`` (image id -> file) and
    ``_identity``, and say where they read from (``location``, ``identity_prefix``).
    """

    identity_prefix: str = ""
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    _records: dict[str, list[ImageRecord]]
    _paths: dict[str, Path]
    _identity: str

    @property
    def location(self) -> str:
        """Where the images come from, for messages ("manifest /x.csv")."""
        raise NotImplementedError

    def records(self, split: str) -> Sequence[ImageRecord]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        return self._records.get(split, [])

    def load_image(self, record: ImageRecord) -> Image.Image:
        path = self._paths.get(record.image_id)
        if path is None:
            raise DataError(f"Image id {record.image_id!r} is not in {self.location}.")
        return open_rgb(path, self.max_image_pixels)

    def identity(self) -> str:
        return f"{self.identity_prefix}-{self._identity}"

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={len(v)}" for k, v in self._records.items())
        return f"{type(self).__name__}({self.location}, {counts})"


def safe_file_stem(name: str) -> str:
    """``name`` with every character other than letters, digits, ``-``, ``_`` and ``.``
    replaced by ``_``: crater ids become file names that are safe on every file system."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
