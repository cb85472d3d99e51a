"""Planetary data in, GIS out: georeferenced mosaics, lat/lon catalogs, map layers.

- :mod:`craterlab.geo.bodies`: CRSs and the bodies they belong to (pyproj's IAU CRSs).
- :mod:`craterlab.geo.rasters`: a mosaic read window by window (rasterio), crater crops sized in
  km, centred on the crater in a local azimuthal projection.
- :mod:`craterlab.geo.catalogs`: crater catalogs as scientists keep them (Robbins columns,
  lat/lon in -180..180 or 0..360, diameters in km) or in pixels.
- :mod:`craterlab.geo.layers`: results written as GeoPackage/GeoJSON layers with their CRS.
- :mod:`craterlab.geo.ingest`: catalog + mosaic -> crops and a manifest carrying lat/lon.

The field's libraries (rasterio, pyproj, geopandas/pyogrio, shapely) come with the ``geo``
extra: ``pip install 'craterlab[geo]'``; :func:`require` names it when one is missing.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from craterlab.errors import ConfigError

EXTRA = "pip install 'craterlab[geo]'"


def require(module: str) -> ModuleType:
    """Import one of the geo extra's libraries, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"Georeferenced mosaics and map layers need {module.split('.')[0]} ({exc}). Install "
            f"the geo extra: {EXTRA} (rasterio, pyproj, geopandas, pyogrio, shapely)."
        ) from None
