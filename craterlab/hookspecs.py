"""Hook specifications: how plugins add components to craterlab and observe runs.

Each ``register_*`` hook receives a ``register(name, factory, description="", schema=None)``
callback. ``factory`` is called with the component's validated config as keyword arguments;
when ``schema`` is omitted, the factory's signature is the schema (its parameters are the valid
config keys, their annotations the expected types).

Built-in components use these same hooks (see :mod:`craterlab.plugins`).
"""

from __future__ import annotations

from typing import Any, Protocol

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("craterlab")
hookimpl = HookimplMarker("craterlab")


class Register(Protocol):
    def __call__(
        self, name: str, factory: Any, description: str = "", schema: type | None = None
    ) -> None: ...


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets: factories returning a :class:`craterlab.types.CraterDataset`."""


@hookspec
def register_backbones(register: Register) -> None:
    """Register backbones: factories returning a :class:`craterlab.types.Backbone`."""


@hookspec
def register_poolings(register: Register) -> None:
    """Register poolings: Features -> one vector per image."""


@hookspec
def register_selectors(register: Register) -> None:
    """Register token selectors: Features -> top-K patch tokens."""


@hookspec
def register_aggregators(register: Register) -> None:
    """Register token aggregators: Features -> K aggregated tokens."""


@hookspec
def register_matchers(register: Register) -> None:
    """Register matchers: score query token sets against gallery token sets."""


@hookspec
def register_quantizers(register: Register) -> None:
    """Register quantizers: encode gallery tokens into a token store."""


@hookspec
def register_stages(register: Register) -> None:
    """Register retrieval stages (single-vector search, rerank, exhaustive)."""


@hookspec
def register_losses(register: Register) -> None:
    """Register metric-learning losses for fine-tuning."""


@hookspec
def run_started(config: dict[str, Any], run_dir: str) -> None:
    """Called when a run starts, with the resolved config as a plain dict."""


@hookspec
def run_finished(
    config: dict[str, Any], run_dir: str, results: dict[str, dict[str, float]]
) -> None:
    """Called when a run finishes, with per-mode metrics (mode -> metric name -> value)."""
