"""craterlab: instance-level crater retrieval experiments (CraterBench-R and beyond).

What a plugin needs is importable from here::

    from craterlab import hookimpl, Features, Tokens, build

- ``hookimpl``: the marker for hook implementations (every hook: ``docs/plugins.md``).
- The values that flow between components (``Features``, ``Tokens``, ``ImageRecord``,
  ``RetrievalInputs``, ``Ranking``) and the protocol each component kind implements
  (``Pooling``, ``Selector``, ``Aggregator``, ``Matcher``, ``StoreMatcher``, ``Quantizer``,
  ``TokenStore``, ``Stage``, ``StageReport``, ``Loss``, ``Backbone``, ``CraterDataset``); see
  :mod:`craterlab.types`.
- ``build(kind, config)``: a registered component from its config (validated).
- ``run(cfg)``: one experiment from a composed Hydra config (:func:`craterlab.experiment.run`).
- ``CraterlabError``, ``ConfigError``: errors shown to the user as one paragraph.

Everything is imported on first use, so ``import craterlab`` stays cheap (no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from craterlab.lazy import lazy_exports

__version__ = "0.1.0"

_TYPES = (
    "Aggregator",
    "Backbone",
    "CraterDataset",
    "Features",
    "Fittable",
    "ImageRecord",
    "Loss",
    "Matcher",
    "Pooling",
    "Quantizer",
    "Ranking",
    "RetrievalInputs",
    "Selector",
    "Stage",
    "StageReport",
    "StoreMatcher",
    "TokenStore",
    "Tokens",
)
_LAZY = {
    **dict.fromkeys(_TYPES, "craterlab.types"),
    "hookimpl": "craterlab.hookspecs",
    "Register": "craterlab.hookspecs",
    "CraterlabError": "craterlab.errors",
    "ConfigError": "craterlab.errors",
    "CraterIndex": "craterlab.workflows",
    "run": "craterlab.experiment",
}

__all__ = [
    "Aggregator",
    "Backbone",
    "ConfigError",
    "CraterDataset",
    "CraterlabError",
    "Features",
    "Fittable",
    "ImageRecord",
    "CraterIndex",
    "Loss",
    "Matcher",
    "Pooling",
    "Quantizer",
    "Ranking",
    "Register",
    "RetrievalInputs",
    "Selector",
    "Stage",
    "StageReport",
    "StoreMatcher",
    "TokenStore",
    "Tokens",
    "__version__",
    "build",
    "hookimpl",
    "run",
]

if TYPE_CHECKING:
    from craterlab.errors import ConfigError, CraterlabError
    from craterlab.experiment import run
    from craterlab.hookspecs import Register, hookimpl
    from craterlab.types import (
        Aggregator,
        Backbone,
        CraterDataset,
        Features,
        Fittable,
        ImageRecord,
        Loss,
        Matcher,
        Pooling,
        Quantizer,
        Ranking,
        RetrievalInputs,
        Selector,
        Stage,
        StageReport,
        StoreMatcher,
        Tokens,
        TokenStore,
    )


def build(kind: str, config: Any, **context: Any) -> Any:
    """Build a registered component: ``build("selector", {"name": "attention", "k": 16})``.

    ``config`` is a mapping with ``name`` (or just the name); its keys are validated against
    the component's schema. ``context`` passes run-level values (``seed``) to factories that
    declare them. Uses every installed plugin (:func:`craterlab.plugins.get_registry`).
    """
    from craterlab.plugins import get_registry

    return get_registry().build(kind, config, **context)


__getattr__ = lazy_exports(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
