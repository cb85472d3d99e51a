"""Helpers shared by the file-based datasets: image decoding, id mapping, file fingerprints."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from craterlab.errors import DataError

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
