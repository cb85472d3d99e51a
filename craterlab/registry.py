"""The component registry: ``(kind, config) -> object``.

A component is registered under a kind and a name with a factory. Its schema is either an
explicit dataclass or the factory's own signature: parameter names are the valid config keys,
annotations the expected types, defaults the optional keys. ``build`` looks the name up,
validates the config against the schema, and calls the factory with it.

A factory may be named by a string, ``"package.module:attribute"`` (a :class:`LazyFactory`):
its module is imported only when the component is built or its schema is read, so listing
components (``--help``, ``plugins``) imports no model code. The built-ins register this way.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import inspect
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, get_args, get_origin

from omegaconf import DictConfig, ListConfig, OmegaConf

from craterlab.errors import ConfigError, UnknownComponentError, closest
from craterlab.kinds import GROUP_KINDS, KINDS  # noqa: F401 (GROUP_KINDS: re-exported)

# Config keys every component node may carry that are not factory parameters.
RESERVED_KEYS = frozenset({"name"})


@dataclass(frozen=True)
class Param:
    """One config key of a component schema."""

    name: str
    annotation: Any
    default: Any = inspect.Parameter.empty

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


@dataclass(frozen=True)
class LazyFactory:
    """A factory named by ``"package.module:attribute"``, imported when first called or read."""

    target: str

    def __post_init__(self) -> None:
        module, sep, attribute = self.target.partition(":")
        if not (sep and module and attribute):
            raise ValueError(
                f"factory {self.target!r} is a string but not 'package.module:attribute'; "
                "pass the callable itself or name it as 'package.module:attribute'"
            )

    def resolve(self) -> Callable[..., Any]:
        """The named callable (imports its module)."""
        return import_target(self.target)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)


def import_target(target: str) -> Any:
    """The object named by ``"package.module:attribute"`` (imports its module)."""
    module_name, _, attribute = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"The component {target!r} could not be imported ({type(exc).__name__}: {exc}). "
            "Install what its plugin needs, or fix the 'package.module:attribute' it was "
            "registered with."
        ) from exc
    return obj


def resolve_factory(factory: Any) -> Any:
    """The callable behind a factory (a :class:`LazyFactory` is imported)."""
    return factory.resolve() if isinstance(factory, LazyFactory) else factory


def first_doc_line(obj: Any) -> str:
    """The first line of an object's docstring ('' without one)."""
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


@dataclass(frozen=True)
class Component:
    """A registered component: where it came from, how to build it, what it accepts.

    ``params`` (the schema) and, when none was given, ``description`` are read on first use,
    so a lazily named factory is imported only when they are needed.
    """

    kind: str
    name: str
    factory: Callable[..., Any]
    schema: type | str | None = None
    given_description: str = ""
    plugin: str = ""

    @cached_property
    def params(self) -> tuple[Param, ...]:
        schema = import_target(self.schema) if isinstance(self.schema, str) else self.schema
        return schema_params(resolve_factory(self.factory), schema)

    @cached_property
    def description(self) -> str:
        return self.given_description or first_doc_line(resolve_factory(self.factory))

    def param(self, key: str) -> Param | None:
        return next((p for p in self.params if p.name == key), None)


def schema_params(factory: Callable[..., Any], schema: type | None = None) -> tuple[Param, ...]:
    """The config keys of a factory: from an explicit dataclass schema or its signature."""
    target = schema if schema is not None else factory
    if dataclasses.is_dataclass(target):
        hints = typing.get_type_hints(target)
        out = []
        for f in dataclasses.fields(target):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = inspect.Parameter.empty
            out.append(Param(f.name, hints.get(f.name, Any), default))
        return tuple(out)
    init = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # unresolvable forward references: fall back to no type checks
        hints = {}
    sig = inspect.signature(target)
    return tuple(
        Param(p.name, hints.get(p.name, Any), p.default)
        for p in sig.parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )


def type_name(annotation: Any) -> str:
    """A readable name for an annotation (``int``, ``float | None``, ``one of 'a', 'b'``)."""
    if annotation is Any:
        return "any value"
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(annotation))
    if origin in (list, tuple, typing.Sequence):
        args = get_args(annotation)
        return f"a list of {type_name(args[0])}" if args else "a list"
    if origin in (dict, typing.Mapping):
        return "a mapping"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def check_value(annotation: Any, value: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits ``annotation``, and the value converted (int -> float, list)."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True, value
    origin = get_origin(annotation)
    if origin is Literal:
        return value in get_args(annotation), value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(annotation):
            ok, converted = check_value(arg, value)
            if ok:
                return True, converted
        return False, value
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, list | tuple):
            return False, value
        args = get_args(annotation)
        item_type = args[0] if args else Any
        converted = []
        for item in value:
            ok, c = check_value(item_type, item)
            if not ok:
                return False, value
            converted.append(c)
        return True, converted
    if origin in (dict, typing.Mapping):
        return isinstance(value, Mapping), dict(value) if isinstance(value, Mapping) else value
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if isinstance(annotation, type):
        return isinstance(value, annotation), value
    return True, value


def to_plain(config: Any) -> dict[str, Any]:
    """A component config (DictConfig, dict or None) as a plain resolved dict."""
    if config is None:
        return {}
    if isinstance(config, DictConfig | ListConfig):
        return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
    if isinstance(config, str):
        return {"name": config}
    return dict(config)


def check_config(
    params: tuple[Param, ...],
    values: Mapping[str, Any],
    *,
    label: str,
    group: str,
    skip: frozenset[str] = RESERVED_KEYS,
) -> dict[str, Any]:
    """``values`` checked against a schema's ``params``: the keyword arguments, converted.

    The one place config keys are validated, for registered components and for config groups
    that are not registry kinds (``train``): an unknown key names the valid keys and the closest
    match, a wrong type names the expected type, a missing required key is named. ``label``
    starts each message (``selector 'norm'``), ``group`` is the command-line prefix of the fix
    (``selector.k=VALUE``), and keys in ``skip`` are passed over.
    """
    valid = [p.name for p in params]
    by_name = {p.name: p for p in params}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key in skip:
            continue
        param = by_name.get(key)
        if param is None:
            raise ConfigError(
                f"{label} has no config key {key!r}.{closest(key, valid)} "
                f"Valid keys: {', '.join(valid) or '(none)'}. Fix the key in your config "
                f"or override (e.g. {group}.{valid[0] if valid else 'KEY'}=VALUE)."
            )
        ok, converted = check_value(param.annotation, value)
        if not ok:
            raise ConfigError(
                f"{label}: key {key!r} must be {type_name(param.annotation)}, "
                f"got {value!r} ({type(value).__name__}). Fix it in your config or "
                f"override {group}.{key}=VALUE."
            )
        kwargs[key] = converted
    missing = [p.name for p in params if p.required and p.name not in kwargs]
    if missing:
        raise ConfigError(
            f"{label} needs config key(s) {', '.join(missing)}. Set them in the "
            f"config or on the command line ({group}.{missing[0]}=VALUE)."
        )
    return kwargs


class Registry:
    """Components by kind and name, filled by the ``register_*`` hooks of installed plugins."""

    def __init__(self) -> None:
        self._components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}

    def register(
        self,
        kind: str,
        name: str,
        factory: Callable[..., Any] | str,
        description: str = "",
        schema: type | str | None = None,
        plugin: str = "",
    ) -> None:
        """Register ``factory`` as kind/name; ``factory`` and ``schema`` may be named
        ``"package.module:attribute"`` to be imported on first use."""
        if kind not in self._components:
            raise ValueError(f"Unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
        if isinstance(factory, str):
            factory = LazyFactory(factory)
        existing = self._components[kind].get(name)
        if existing is not None and existing.factory != factory:
            raise ValueError(
                f"{kind} {name!r} is registered twice: by {existing.plugin!r} and by {plugin!r}. "
                "Uninstall one of the plugins or rename the component."
            )
        self._components[kind][name] = Component(kind, name, factory, schema, description, plugin)

    def kinds(self) -> tuple[str, ...]:
        return tuple(self._components)

    def names(self, kind: str, pattern: str = "*") -> list[str]:
        """Sorted names of one kind matching a shell-style wildcard."""
        self._check_kind(kind)
        return sorted(n for n in self._components[kind] if fnmatch.fnmatch(n, pattern))

    def __iter__(self) -> Iterator[Component]:
        for kind in self._components.values():
            yield from kind.values()

    def get(self, kind: str, name: str) -> Component:
        self._check_kind(kind)
        try:
            return self._components[kind][name]
        except KeyError:
            known = self.names(kind)
            raise UnknownComponentError(
                f"Unknown {kind} {name!r}.{closest(name, known)} Known {kind}s: "
                f"{', '.join(known) or '(none installed)'}. Choose one on the command line "
                f"({kind}=NAME), or install the plugin package that provides {name!r} "
                "(`python -m craterlab plugins` lists what is installed)."
            ) from None

    def validate(
        self, kind: str, config: Any, group: str | None = None
    ) -> tuple[Component, dict[str, Any]]:
        """The component and its keyword arguments, after checking every key and type.

        ``group``: the config path the fix in an error message names (default: the kind;
        a retrieval stage's is ``retrieval.stages.<stage>``)."""
        values = to_plain(config)
        name = values.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(
                f"The {kind} config has no 'name'. Set it to one of: "
                f"{', '.join(self.names(kind))} (e.g. {kind}=NAME on the command line)."
            )
        component = self.get(kind, name)
        label = f"{kind} {name!r}"
        kwargs = check_config(component.params, values, label=label, group=group or kind)
        return component, kwargs

    def build(self, kind: str, config: Any, group: str | None = None, **context: Any) -> Any:
        """Validate ``config`` (a mapping with ``name``) and build the component.

        ``group``: the config path an error's fix names (as in :meth:`validate`).
        ``context`` passes run-level values (such as ``seed``) to factories that declare them;
        they are not config keys.
        """
        component, kwargs = self.validate(kind, config, group)
        accepted = {p.name for p in component.params}
        kwargs.update({k: v for k, v in context.items() if k in accepted and k not in kwargs})
        try:
            return component.factory(**kwargs)
        except ValueError as exc:
            raise ConfigError(f"{kind} {component.name!r} rejected its config: {exc}") from exc

    def _check_kind(self, kind: str) -> None:
        if kind not in self._components:
            raise UnknownComponentError(
                f"Unknown component kind {kind!r}.{closest(kind, KINDS)} Kinds: {', '.join(KINDS)}."
            )
