"""Helpers shared by the file-based datasets: image decoding, id mapping, file fingerprints."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from craterlab.errors import DataError
from craterlab.types import ImageRecord

SPLITS = ("gallery", "query", "train")

MAX_LISTED = 10  # offending rows/files named in one error message


def open_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file as RGB; a missing or corrupt file raises DataError naming it."""
    p = Path(path)
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(
            f"Image file {p} does not exist (it was listed by the dataset). Restore the file, "
            "or fix/remove its entry in the dataset's split or manifest file."
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"Cannot decode image {p}: {exc}. Replace it with a valid image file (JPEG/PNG/TIFF), "
            "or remove its entry from the dataset."
        ) from None


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


class FileDataset:
    """The dataset protocol for readers that index image files by id (release, manifest).

    Subclasses fill ``_records`` (split -> records), ``_paths`` (image id -> file) and
    ``_identity``, and say where they read from (``location``, ``identity_prefix``).
    """

    identity_prefix: str = ""
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
        return open_rgb(path)

    def identity(self) -> str:
        return f"{self.identity_prefix}-{self._identity}"

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={len(v)}" for k, v in self._records.items())
        return f"{type(self).__name__}({self.location}, {counts})"
