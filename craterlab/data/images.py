"""Image files -> 8-bit RGB, and the cheap up-front checks that find bad files before encoding.

High bit depth. Planetary products are often 16-bit integers (CTX and HiRISE EDR/RDR exports,
whose real data use 10-12 bits of the 16) or floats (THEMIS IR radiance or brightness
temperature, calibrated I/F). PIL's ``convert("RGB")`` clips such data to 0..255, which turns a
16-bit crop almost white and a float crop black. :func:`to_rgb8` instead stretches each image
linearly from its own minimum to its own maximum (finite values only) onto 0..255:

- a fixed range (0..65535 for 16-bit) would crush a 10-bit HiRISE crop into its lowest 4 grey
  levels, and floats have no fixed range at all (their units differ by product);
- a min-max stretch keeps the order of all values and uses the full 8-bit range, which is what
  the 8-bit crops of the CraterBench-R release (stretched CTX mosaics) look like;
- no-data is black: NaN and infinities, and for floats the ISIS special pixels (values beyond
  +-1e30, e.g. -3.4e38), which would otherwise set the range. A constant image becomes black.

8-bit modes (L, RGB, P, LA, RGBA, CMYK, 1) keep PIL's own conversion, so 8-bit results are
unchanged.

Up-front checks. :func:`file_problem` refuses what is not a regular file (a FIFO or device
would block the reader forever), and :func:`image_problem` reads only the header (format,
size): unreadable files and decompression bombs are found in microseconds per image instead of
after the whole split is encoded.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from craterlab.errors import DataError

# PIL's own default limit (about 89.5 Mpx): larger images are refused unless allowed.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
NODATA_ABS = 1e30  # float values beyond this are no-data (ISIS special pixels are ~ -3.4e38)
HIGH_DEPTH_MODES = ("I", "F")  # PIL modes I, I;16, I;16B, I;16L, I;16N, F


def to_rgb8(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``image``; 16/32-bit and float images by a min-max stretch.

    See the module docstring for why the stretch is per image.
    """
    if image.mode == "RGB":
        return image
    if not image.mode.startswith(HIGH_DEPTH_MODES):
        return image.convert("RGB")
    data = np.asarray(image).astype(np.float64)
    valid = np.isfinite(data)
    if image.mode == "F":
        valid &= np.abs(data) < NODATA_ABS
    out = np.zeros(data.shape, dtype=np.uint8)
    if valid.any():
        lo, hi = data[valid].min(), data[valid].max()
        if hi > lo:
            scaled = np.rint((data[valid] - lo) * (255.0 / (hi - lo)))
            out[valid] = np.clip(scaled, 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(out[:, :, None], 3, axis=2), mode="RGB")


def file_problem(path: Path) -> str | None:
    """None for an existing regular file, else what is wrong (missing, FIFO, device, folder)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a folder"
            if stat.S_ISDIR(st.st_mode)
            else "a FIFO (named pipe)"
            if stat.S_ISFIFO(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a socket"
            if stat.S_ISSOCK(st.st_mode)
            else "not a regular file"
        )
        return f"is {kind}, not an image file (reading it could block forever)"
    if st.st_size == 0:
        return "is empty (0 bytes)"
    return None


def pixel_limit_problem(size: tuple[int, int], max_pixels: int | None) -> str | None:
    """What is wrong with an image of ``size`` (w, h) under ``max_pixels``, or None."""
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        return (
            f"has {w} x {h} = {w * h:,} pixels, more than dataset.max_image_pixels="
            f"{max_pixels:,} (a guard against decompression bombs); if the image is genuine, "
            f"allow it with dataset.max_image_pixels={w * h} (or null for no limit)"
        )
    return None


def bomb_problem(exc: Exception, max_pixels: int | None) -> str:
    """The pixel-limit message for PIL's DecompressionBombError (far over the limit)."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = int(found.group(1)) if found else None
    allow = f"dataset.max_image_pixels={pixels}" if pixels else "a larger dataset.max_image_pixels"
    return (
        f"has {f'{pixels:,}' if pixels else 'too many'} pixels, more than "
        f"dataset.max_image_pixels={max_pixels:,} (a guard against decompression bombs); if the "
        f"image is genuine, allow it with {allow} (or null for no limit)"
    )


def allow_pixels(max_pixels: int | None) -> None:
    """Let PIL open images up to ``max_pixels`` (our own check enforces the limit)."""
    current = Image.MAX_IMAGE_PIXELS
    if current is None:
        return
    if max_pixels is None or max_pixels > current:
        Image.MAX_IMAGE_PIXELS = max_pixels


def image_problem(path: Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> str | None:
    """None when ``path`` is a regular file with a readable image header within the pixel
    limit, else what is wrong. Reads the header only (no pixel data)."""
    problem = file_problem(path)
    if problem:
        return problem
    allow_pixels(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                size = im.size
    except Image.DecompressionBombError as exc:
        return bomb_problem(exc, max_pixels)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return f"is not a readable image ({exc})"
    return pixel_limit_problem(size, max_pixels)


def open_rgb(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode an image file as 8-bit RGB (:func:`to_rgb8`); a missing, non-regular, too large
    or corrupt file raises DataError naming it."""
    p = Path(path)
    problem = file_problem(p)
    if problem == "does not exist":
        raise DataError(
            f"Image file {p} does not exist (it was listed by the dataset). Restore the file, "
            "or fix/remove its entry in the dataset's split or manifest file."
        )
    if problem:
        raise DataError(
            f"Image {p} {problem}. Point the dataset entry at an image file, or remove it."
        )
    allow_pixels(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                too_big = pixel_limit_problem(im.size, max_pixels)
                if too_big:
                    raise DataError(f"Image {p} {too_big}.")
                im.load()
                return to_rgb8(im)
    except Image.DecompressionBombError as exc:
        raise DataError(f"Image {p} {bomb_problem(exc, max_pixels)}.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"Cannot decode image {p}: {exc}. Replace it with a valid image file (JPEG/PNG/TIFF), "
            "or remove its entry from the dataset."
        ) from None
