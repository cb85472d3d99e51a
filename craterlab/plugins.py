"""The plugin manager: built-in components and installed plugin packages, loaded once.

Built-in modules register through the same hooks as third-party packages, which are found via
the ``craterlab`` entry-point group. Set ``CRATERLAB_LOAD_PLUGINS=0`` to skip entry points
(e.g. to rule out a broken third-party plugin).
"""

from __future__ import annotations

import importlib
import os
from functools import partial
from typing import Any

import pluggy

from craterlab import hookspecs
from craterlab.registry import Registry

ENTRY_POINT_GROUP = "craterlab"

# Built-in plugin modules, each with ``@hookimpl`` registration functions.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "craterlab.data",
    "craterlab.backbones",
    "craterlab.tokens",
    "craterlab.matching",
    "craterlab.quantization",
    "craterlab.retrieval",
    "craterlab.train",
)

# hook name -> registry kind
REGISTER_HOOKS: dict[str, str] = {
    "register_datasets": "dataset",
    "register_backbones": "backbone",
    "register_poolings": "pooling",
    "register_selectors": "selector",
    "register_aggregators": "aggregator",
    "register_matchers": "matcher",
    "register_quantizers": "quantizer",
    "register_stages": "stage",
    "register_losses": "loss",
}

_manager: pluggy.PluginManager | None = None
_registry: Registry | None = None


def make_manager(load_entry_points: bool | None = None) -> pluggy.PluginManager:
    """A plugin manager with built-ins and (unless disabled) installed plugin packages.

    ``check_pending`` makes a misspelled hook implementation (``register_pooling``) fail here,
    loudly, instead of being silently ignored.
    """
    pm = pluggy.PluginManager("craterlab")
    pm.add_hookspecs(hookspecs)
    if load_entry_points is None:
        load_entry_points = os.environ.get("CRATERLAB_LOAD_PLUGINS", "1") != "0"
    if load_entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)
        if not pm.is_registered(module):
            pm.register(module, name=module_name)
    pm.check_pending()
    return pm


def fill_registry(pm: pluggy.PluginManager) -> Registry:
    """Call every registration hook, recording which plugin registered each component."""
    registry = Registry()
    for hook_name, kind in REGISTER_HOOKS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
            register = partial(_register, registry, kind, plugin_name)
            impl.function(register=register)
    return registry


def _register(
    registry: Registry,
    kind: str,
    plugin: str,
    name: str,
    factory: Any,
    description: str = "",
    schema: type | None = None,
) -> None:
    registry.register(kind, name, factory, description=description, schema=schema, plugin=plugin)


def get_manager() -> pluggy.PluginManager:
    global _manager
    if _manager is None:
        _manager = make_manager()
    return _manager


def get_registry() -> Registry:
    """The process-wide registry (built on first use)."""
    global _registry
    if _registry is None:
        _registry = fill_registry(get_manager())
    return _registry


def reset() -> None:
    """Forget the loaded plugins (tests use this after registering a plugin)."""
    global _manager, _registry
    _manager = None
    _registry = None


def plugin_table(registry: Registry | None = None) -> list[tuple[str, str, str, str]]:
    """(plugin, kind, name, description) for every registered component, sorted."""
    registry = registry or get_registry()
    rows = [(c.plugin, c.kind, c.name, c.description) for c in registry]
    return sorted(rows, key=lambda r: (not r[0].startswith("craterlab."), r[0], r[1], r[2]))
