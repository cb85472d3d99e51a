"""Hook specifications: how plugins add components and commands to craterlab and observe runs.

Each ``register_*`` hook receives a ``register(name, factory, description="", schema=None)``
callback. ``factory`` is called with the component's validated config as keyword arguments;
when ``schema`` (a dataclass) is omitted, the factory's signature is the schema: its parameters
are the valid config keys, their annotations the expected types, their defaults the optional
keys. ``description`` defaults to the first line of the factory's docstring.

Built-in components use these same hooks (see :mod:`craterlab.plugins`). ``docs/plugins.md``
documents every hook with an example; a test fails when a hook has no section there.
"""

from __future__ import annotations

from typing import Any, Protocol

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("craterlab")
hookimpl = HookimplMarker("craterlab")


class Register(Protocol):
    """The callback a ``register_*`` hook receives."""

    def __call__(
        self, name: str, factory: Any, description: str = "", schema: type | None = None
    ) -> None: ...


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets: factories returning a :class:`craterlab.types.CraterDataset`.

    Called once per process, when the registry is first built; ``dataset=NAME`` builds one.
    """


@hookspec
def register_backbones(register: Register) -> None:
    """Register backbones: factories returning a :class:`craterlab.types.Backbone`.

    ``backbone=NAME`` builds one; the run passes ``seed`` to factories that declare it.
    """


@hookspec
def register_poolings(register: Register) -> None:
    """Register poolings: ``Features -> (N, D)`` L2-normalized single vectors."""


@hookspec
def register_selectors(register: Register) -> None:
    """Register token selectors: ``Features -> Tokens``, K of the patch tokens, L2-normalized."""


@hookspec
def register_aggregators(register: Register) -> None:
    """Register token aggregators: ``Features -> Tokens``, K aggregated L2-normalized tokens.

    A factory may return None ('use the selector's tokens'); a component with ``fit`` is fitted
    on the gallery features first.
    """


@hookspec
def register_matchers(register: Register) -> None:
    """Register matchers: ``score(queries, gallery)`` and ``rerank(queries, gallery, candidates)``
    over token sets (:class:`craterlab.types.Matcher`)."""


@hookspec
def register_quantizers(register: Register) -> None:
    """Register quantizers: ``fit(tokens)`` then ``encode(tokens) -> TokenStore``."""


@hookspec
def register_stages(register: Register) -> None:
    """Register retrieval stages: ``search(RetrievalInputs) -> Ranking`` (single-vector search,
    rerank, exhaustive). Each value of ``retrieval.stages`` builds one."""


@hookspec
def register_losses(register: Register) -> None:
    """Register metric-learning losses for fine-tuning: ``(embeddings, labels) -> scalar``."""


@hookspec
def register_commands(register: Register) -> None:
    """Register subcommands of ``python -m craterlab``: ``register(name, handler, description)``
    where ``handler(args: list[str]) -> int`` gets the arguments after the name and returns an
    exit status. Called when the command line starts, before Hydra sees the arguments."""


@hookspec
def register_trackers(register: Register) -> None:
    """Register experiment trackers: factories returning a :class:`craterlab.tracking.Tracker`
    (``start``, ``log_params``, ``log_metrics``, ``log_artifact``, ``set_tags``, ``finish``).

    ``tracking=NAME`` picks one (built in: ``mlflow``, ``none``); its config keys are the
    factory's parameters. A tracker must never raise on tracking trouble: it records what it
    could not log in ``not_logged`` instead.
    """


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
