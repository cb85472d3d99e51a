"""Paths read from files (an index's ``meta.json``, a token store's array names, a cache entry's
manifest) are data: each must name a file inside the folder that holds it.

A name that is absolute, climbs with ``..``, or leads out through a symbolic link makes the
whole file count as damaged (or crafted) and refused; it is never read or written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from craterlab.errors import DataError

SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
"""A plain file name: letters, digits, ``_ . -``; no separators, never ``.`` or ``..``."""


def contained(root: Path, rel: object, what: str) -> Path:
    """``root / rel`` when ``rel`` is a relative POSIX path that stays inside ``root``.

    ``what`` names the file that listed ``rel`` (for the error message).
    """
    bad = not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel
    if not bad:
        parts = PurePosixPath(rel).parts
        bad = (
            PurePosixPath(rel).is_absolute()
            or any(p in ("..", ".") for p in parts)
            or not all(SAFE_NAME.match(p) for p in parts)
        )
    path = root / str(rel)
    if not bad and os.path.lexists(path):
        real, base = os.path.realpath(path), os.path.realpath(root)
        bad = not real.startswith(base.rstrip(os.sep) + os.sep)
    if bad:
        raise DataError(
            f"{what} names the file {rel!r}, which is not a plain file name inside {root} "
            "(absolute, '..', a link out of the folder, or odd characters). The file is "
            "damaged or was crafted, and is refused: nothing it names is read or written. "
            "Rebuild it from its source."
        )
    return path


def safe_name(name: object, what: str) -> str:
    """``name`` when it is a plain file name (see :data:`SAFE_NAME`), else a DataError."""
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        raise DataError(
            f"{what} names an array {name!r} that is not a plain file name (letters, digits, "
            "'_', '.', '-'): the file is damaged or was crafted, and is refused; nothing it "
            "names is read or written. Rebuild it from its source."
        )
    return name
