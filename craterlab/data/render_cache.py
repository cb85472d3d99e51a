"""Rendered images kept on disk, so a procedural dataset renders each image once per machine.

The synthetic benchmark renders an image from (seed, image id) in about 26 ms of CPU; a run
whose features are not cached yet (another backbone, another precision) would render all of
them again. A :class:`RenderCache` keeps one split's images in two memory-mapped files under
the feature cache directory (see :func:`craterlab.cache.renders_dir`): ``pixels.u8``
(N, H, W) uint8 and ``sums.u8`` (N,) uint64, where a row's sum is its CRC-32 plus one (0: not
rendered yet). A row is read back only when its pixels match its sum, so a torn write (a crash,
a full disk) costs a re-render, never a wrong image. Rows are written in place by whichever
process renders them (DataLoader workers, parallel jobs): renders are deterministic, so two
writers of one row write the same bytes. Files are created whole by an atomic rename.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np


class RenderCache:
    """One split's rendered uint8 images of a fixed shape, filled as they are first rendered."""

    def __init__(self, directory: Path, n: int, shape: tuple[int, ...]) -> None:
        self.directory = Path(directory)
        self.n, self.shape = int(n), tuple(int(s) for s in shape)
        self._maps: tuple[int, np.memmap, np.memmap] | None = None

    def _open(self) -> tuple[np.memmap, np.memmap] | None:
        """The (pixels, sums) maps of this process; None where the directory is unusable."""
        if self._maps is not None and self._maps[0] == os.getpid():
            return self._maps[1], self._maps[2]
        try:
            pixels = self._map("pixels.u8", np.uint8, (self.n, *self.shape))
            sums = self._map("sums.u8", np.uint64, (self.n,))
        except (OSError, ValueError):
            return None  # read-only or full disk, a file of another shape: render every time
        self._maps = (os.getpid(), pixels, sums)
        return pixels, sums

    def _map(self, name: str, dtype: type, shape: tuple[int, ...]) -> np.memmap:
        path = self.directory / name
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not path.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                f.truncate(size)  # sparse: zero sums mean "not rendered"
            os.replace(tmp, path)
        if path.stat().st_size != size:
            raise ValueError(f"{path} has {path.stat().st_size} bytes, expected {size}")
        return np.memmap(path, dtype=dtype, mode="r+", shape=shape)

    @staticmethod
    def checksum(image: np.ndarray) -> int:
        return zlib.crc32(np.ascontiguousarray(image).data) + 1

    def get(self, i: int, render: Callable[[], np.ndarray]) -> np.ndarray:
        """Image ``i``: read back when its row is intact, else ``render()``-ed and stored."""
        maps = self._open()
        if maps is None:
            return render()
        pixels, sums = maps
        if sums[i]:
            row = np.array(pixels[i])
            if self.checksum(row) == int(sums[i]):
                return row
        image = render()
        if image.shape != self.shape or image.dtype != np.uint8:
            return image  # not this cache's kind of image: never stored
        pixels[i] = image
        sums[i] = self.checksum(image)
        return image
