"""Synthetic observations for trying the workflows: a tile plus its crater catalog.

Renders a square window of the procedural surface (:mod:`craterlab.data.surface`) as a PNG,
and writes the craters of a diameter range whose centres lie in it as a catalog CSV (``id, x,
y, diameter`` in pixels of the tile). Two observations of overlapping windows under different
suns see the same craters with the same ids, which is what ``match`` should recover.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from craterlab.data.surface import CraterField, Photometry, render


@dataclass(frozen=True)
class Observation:
    image: Path
    catalog: Path
    craters: int
    origin: tuple[float, float]
    """Top-left corner of the tile in the shared pixel frame (pixel (0, 0) = world (0, 0))."""


def render_observation(
    out_stem: str | os.PathLike[str],
    *,
    centre: tuple[float, float] = (16.0, 16.0),
    width: float = 32.0,
    size: int = 256,
    sun_azimuth: float = 270.0,
    sun_elevation: float = 30.0,
    diameters: tuple[float, float] = (2.0, 6.0),
    seed: int = 3,
    noise_seed: int = 1,
) -> Observation:
    """Write ``<out_stem>.png`` and ``<out_stem>.csv`` (see the module docstring).

    ``centre``, ``width`` and ``diameters`` are world units (``size / width`` pixels each).
    """
    field = CraterField(lam=1.0)
    photometry = Photometry(sun_azimuth=sun_azimuth, sun_elevation=sun_elevation, noise=0.01)
    img = render(seed, field, centre, width, size, photometry, noise_seed)
    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    image, catalog = stem.with_suffix(".png"), stem.with_suffix(".csv")
    Image.fromarray(img).save(image)
    x0, y0 = centre[0] - width / 2, centre[1] - width / 2
    c = field.craters_in(seed, x0, y0, x0 + width, y0 + width, diameters[0])
    px = width / size
    keep = (c["d"] < diameters[1]) & (c["x"] > x0) & (c["x"] < x0 + width)
    keep &= (c["y"] > y0) & (c["y"] < y0 + width)
    with open(catalog, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "x", "y", "diameter"])
        for i in np.flatnonzero(keep):
            cid = f"c{c['cls'][i]}_{c['ix'][i]}_{c['iy'][i]}_{c['k'][i]}"
            w.writerow(
                [
                    cid,
                    f"{(c['x'][i] - x0) / px:.3f}",
                    f"{(c['y'][i] - y0) / px:.3f}",
                    f"{c['d'][i] / px:.3f}",
                ]
            )
    return Observation(image, catalog, int(keep.sum()), (x0 / px, y0 / px))
