"""The component kinds, declared once: (kind, registration hook, config group, protocol).

Everything else that lists kinds is derived from :data:`KIND_TABLE`: the ``register_*``
hookspecs (:mod:`craterlab.hookspecs`), the registry's kinds and the kinds a config group of
the same name chooses (:mod:`craterlab.registry`), the hook -> kind map the plugin manager
calls (:mod:`craterlab.plugins`) and the config group of each kind that the plugin contract
composes (:mod:`craterlab.testing`). A new kind is one new row here.

The protocol is named, not imported (``craterlab.types.Pooling``), so reading this table costs
nothing: :meth:`Kind.protocol_class` imports it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    """One component kind."""

    name: str
    """The registry kind: ``registry.build(name, config)``."""
    hook: str
    """The hook plugins implement to register components of this kind."""
    group: str
    """The config group that configures it. A group of the kind's own name picks one component
    (``pooling=gem``); stages are configured inside ``retrieval``, losses inside ``train``."""
    protocol: str
    """What a built component is: the dotted name of its protocol (or base class)."""
    doc: str
    """The hook's documentation (its hookspec's docstring)."""

    @property
    def chosen_by_group(self) -> bool:
        """Whether ``<group>=<option>`` picks one component of this kind."""
        return self.group == self.name

    def protocol_class(self) -> type:
        """The protocol class, imported."""
        module, _, name = self.protocol.rpartition(".")
        return getattr(importlib.import_module(module), name)


KIND_TABLE: tuple[Kind, ...] = (
    Kind(
        "dataset",
        "register_datasets",
        "dataset",
        "craterlab.types.CraterDataset",
        """Register datasets: factories returning a :class:`craterlab.types.CraterDataset`.

    Called once per process, when the registry is first built; ``dataset=NAME`` builds one.
    """,
    ),
    Kind(
        "backbone",
        "register_backbones",
        "backbone",
        "craterlab.types.Backbone",
        """Register backbones: factories returning a :class:`craterlab.types.Backbone`.

    ``backbone=NAME`` builds one; the run passes ``seed`` to factories that declare it.
    """,
    ),
    Kind(
        "pooling",
        "register_poolings",
        "pooling",
        "craterlab.types.Pooling",
        """Register poolings: ``Features -> (N, D)`` L2-normalized single vectors.""",
    ),
    Kind(
        "selector",
        "register_selectors",
        "selector",
        "craterlab.types.Selector",
        """Register token selectors: ``Features -> Tokens``, K of the patch tokens,
    L2-normalized.""",
    ),
    Kind(
        "aggregator",
        "register_aggregators",
        "aggregator",
        "craterlab.types.Aggregator",
        """Register token aggregators: ``Features -> Tokens``, K aggregated L2-normalized tokens.

    A factory may return None ('use the selector's tokens'); a component with ``fit`` is fitted
    on the gallery features first.
    """,
    ),
    Kind(
        "matcher",
        "register_matchers",
        "matcher",
        "craterlab.types.Matcher",
        """Register matchers: ``score(queries, gallery)`` and ``rerank(queries, gallery,
    candidates)`` over token sets (:class:`craterlab.types.Matcher`).""",
    ),
    Kind(
        "quantizer",
        "register_quantizers",
        "quantizer",
        "craterlab.types.Quantizer",
        """Register quantizers: ``fit(tokens)`` then ``encode(tokens) -> TokenStore``.""",
    ),
    Kind(
        "stage",
        "register_stages",
        "retrieval",
        "craterlab.types.Stage",
        """Register retrieval stages: ``search(RetrievalInputs) -> Ranking`` (single-vector
    search, rerank, exhaustive). Each value of ``retrieval.stages`` builds one.""",
    ),
    Kind(
        "loss",
        "register_losses",
        "train",
        "craterlab.types.Loss",
        """Register metric-learning losses for fine-tuning: ``(embeddings, labels) -> scalar``.""",
    ),
    Kind(
        "tracking",
        "register_trackers",
        "tracking",
        "craterlab.tracking.base.Tracker",
        """Register experiment trackers: factories returning a
    :class:`craterlab.tracking.Tracker` (``start``, ``log_params``, ``log_metrics``,
    ``log_artifact``, ``set_tags``, ``finish``).

    ``tracking=NAME`` picks one (built in: ``mlflow``, ``none``); its config keys are the
    factory's parameters. A tracker must never raise on tracking trouble: it records what it
    could not log in ``not_logged`` instead.
    """,
    ),
)

KINDS: tuple[str, ...] = tuple(k.name for k in KIND_TABLE)
"""Every registry kind, in the table's order."""
GROUP_KINDS: tuple[str, ...] = tuple(k.name for k in KIND_TABLE if k.chosen_by_group)
"""Kinds chosen by a config group of the same name."""
REGISTER_HOOKS: dict[str, str] = {k.hook: k.name for k in KIND_TABLE}
"""Registration hook -> kind."""
KIND_GROUPS: dict[str, str] = {k.name: k.group for k in KIND_TABLE if not k.chosen_by_group}
"""The config group that configures each kind, where it is not the kind's own name."""


def kind(name: str) -> Kind:
    """The row of kind ``name`` (KeyError for an unknown kind)."""
    for row in KIND_TABLE:
        if row.name == name:
            return row
    raise KeyError(name)


STAGE_PREFIX = "retrieval.stages."
"""Where a retrieval stage is configured: ``retrieval.stages.<stage>.<key>=value``."""
