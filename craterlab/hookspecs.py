"""Hook specifications: how plugins add components and commands to craterlab and observe runs.

There is one ``register_*`` hook per component kind, made from the table of kinds
(:data:`craterlab.kinds.KIND_TABLE`: kind, hook, config group, protocol, documentation). Each
``register_*`` hook receives a ``register(name, factory, description="", schema=None)``
callback. ``factory`` is called with the component's validated config as keyword arguments;
when ``schema`` (a dataclass) is omitted, the factory's signature is the schema: its parameters
are the valid config keys, their annotations the expected types, their defaults the optional
keys. ``description`` defaults to the first line of the factory's docstring. ``factory`` and
``schema`` may also be named as ``"package.module:attribute"`` strings, imported only when the
component is built or its schema is read (the built-ins do this, so ``--help`` and ``plugins``
import no model code).

Built-in components use these same hooks (see :mod:`craterlab.plugins`). ``docs/plugins.md``
documents every hook with an example; a test fails when a hook has no section there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from pluggy import HookimplMarker, HookspecMarker

from craterlab.kinds import KIND_TABLE, Kind

hookspec = HookspecMarker("craterlab")
hookimpl = HookimplMarker("craterlab")


class Register(Protocol):
    """The callback a ``register_*`` hook receives."""

    def __call__(
        self, name: str, factory: Any, description: str = "", schema: type | str | None = None
    ) -> None: ...


def _registration_hook(kind: Kind) -> Callable[[Register], None]:
    """The hookspec of one kind's registration hook (``register_<kinds>(register)``)."""

    def hook(register: Register) -> None:
        pass

    hook.__name__ = hook.__qualname__ = kind.hook
    hook.__doc__ = kind.doc
    return hookspec(hook)


# One registration hook per component kind, from the one table of kinds.
for _kind in KIND_TABLE:
    globals()[_kind.hook] = _registration_hook(_kind)
del _kind


@hookspec
def register_commands(register: Register) -> None:
    """Register subcommands of ``python -m craterlab``: ``register(name, handler, description)``
    where ``handler(args: list[str]) -> int`` gets the arguments after the name and returns an
    exit status. Called when the command line starts, before Hydra sees the arguments."""


@hookspec
def run_started(config: dict[str, Any], run_dir: str, tracker: Any) -> None:
    """Called when a run starts, with the resolved config as a plain dict and the run's
    :class:`craterlab.tracking.Tracker` (log through it: ``tracker.log_metrics({...})``)."""


@hookspec
def run_finished(
    config: dict[str, Any], run_dir: str, results: dict[str, dict[str, float]], tracker: Any
) -> None:
    """Called when a run finishes, with per-mode metrics (mode -> metric name -> value) and the
    run's tracker, still open: metrics and artifacts logged here land in the same run."""
