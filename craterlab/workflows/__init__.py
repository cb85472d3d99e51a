"""Workflows: what planetary scientists do with craterlab, as commands and a Python API.

``ingest`` (crops or a tile + catalog -> manifest), ``index`` (encode and store; ``add`` and
``remove`` by id), ``search``, ``dedup`` (duplicate craters in one catalog) and ``match``
(mutual best matches between two observations). Each is a composition of the experiments'
configs and components; see :mod:`craterlab.workflows.api` for :class:`CraterIndex`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CraterIndex"]


def __getattr__(name: str) -> Any:
    if name == "CraterIndex":  # imported on first use: the API pulls in torch and the backbones
        from craterlab.workflows.api import CraterIndex

        return CraterIndex
    raise AttributeError(f"module 'craterlab.workflows' has no attribute {name!r}")
