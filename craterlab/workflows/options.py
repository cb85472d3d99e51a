"""Validation of the workflows' numeric options, as the experiment validates its config:
a value outside its range is one paragraph naming the option, the value and the valid range,
before any work is done (never an empty or meaningless result with exit status 0)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from craterlab.errors import ConfigError

MIN_CROP_PIXELS = 8
"""The smallest crop side (pixels) that ingest cuts: a backbone sees nothing in fewer."""


def _fail(name: str, value: object, valid: str) -> ConfigError:
    return ConfigError(f"{name} {value!r} is not valid: {valid}.")


def positive_int(name: str, value: int | None, what: str = "") -> None:
    """``value`` (when given) is an integer >= 1."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(name, value, f"it must be a whole number >= 1{what}")


def finite(name: str, value: float | None, lo: float | None = None, what: str = "") -> None:
    """``value`` (when given) is a finite number, ``>= lo`` when ``lo`` is given."""
    if value is None:
        return
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(name, value, f"it must be a finite number{what}")
    if lo is not None and value < lo:
        raise _fail(name, value, f"it must be >= {lo:g}{what}")


def fraction(name: str, value: float | None) -> None:
    """``value`` (when given) lies in (0, 1]."""
    if value is None:
        return
    if not math.isfinite(value) or not 0 < value <= 1:
        raise _fail(name, value, "it must be a number in (0, 1]")


def factors(values: Iterable[float]) -> None:
    """Crop factors: numbers >= 1 (the crop holds the whole crater)."""
    for f in values:
        if not isinstance(f, int | float) or not math.isfinite(f) or f < 1:
            raise _fail(
                "--factors",
                f,
                "each factor is the crop side in crater diameters and must be >= 1 (the study "
                "uses 2 and 3)",
            )


def geometry(max_distance: float | None, max_offset: float | None, max_ratio: float | None) -> None:
    """The geometry pre-filter's limits (pixels, diameters, a ratio of diameters)."""
    finite("--max-distance", max_distance, 0.0, " (a centre distance in pixels)")
    finite("--max-offset", max_offset, 0.0, " (a centre distance in larger diameters)")
    finite("--max-ratio", max_ratio, 1.0, " (larger / smaller diameter, so 1 or more)")
