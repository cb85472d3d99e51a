"""Names a package re-exports from its submodules, imported on first use (PEP 562).

The built-in plugin packages (``craterlab.retrieval``, ``craterlab.backbones``...) are imported
whenever plugins load, including for ``--help``; re-exporting through :func:`lazy_exports`
keeps ``from craterlab.retrieval import EncodedGallery`` working without importing torch,
timm or FAISS until a name is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__``: ``exports`` maps each name to the module it is imported from."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__
