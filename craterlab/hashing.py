"""Content hashes used as identities: of files (checkpoints, splits) and of config payloads."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def sha256_of(path: str | Path) -> str:
    """sha256 of a file's content, read now (for integrity checks, which must not trust a memo)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's content, memoized on (path, size, mtime) so reruns don't reread it.

    For identities (checkpoints, split files); integrity checks use :func:`sha256_of`.
    """
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = sha256_of(path)
    return _FILE_HASHES[key]


def stable_hash(payload: Any, length: int = 16) -> str:
    """A short sha256 of a JSON-serializable payload, independent of dict key order."""
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def fingerprint(*parts: object) -> str:
    """A short sha256 over the reprs of ``parts`` (for values JSON can't encode, like bytes)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
