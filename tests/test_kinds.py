"""The one table of component kinds, and everything derived from it."""

from __future__ import annotations

import inspect

import pytest

from craterlab import hookspecs, kinds, plugins, registry, testing
from craterlab.kinds import KIND_TABLE
from craterlab.plugins import config_dir

ROWS = {row.name: row for row in KIND_TABLE}


def test_the_lists_of_kinds_are_the_table() -> None:
    assert tuple(ROWS) == registry.KINDS
    assert set(registry.GROUP_KINDS) == set(ROWS) - {"stage", "loss"}
    assert {row.hook: row.name for row in KIND_TABLE} == plugins.REGISTER_HOOKS
    assert testing.KIND_GROUPS == {"stage": "retrieval", "loss": "train"}
    assert len({row.hook for row in KIND_TABLE}) == len(KIND_TABLE)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_each_kind_has_its_hookspec_group_and_protocol(name: str) -> None:
    row = ROWS[name]
    spec = getattr(hookspecs, row.hook)
    assert spec.__name__ == row.hook and spec.__doc__ == row.doc
    assert list(inspect.signature(spec).parameters) == ["register"]
    assert row.hook in plugins.hook_names()
    assert (config_dir() / row.group).is_dir(), f"no config group {row.group!r} for {name}"
    assert inspect.isclass(row.protocol_class())
    assert kinds.kind(name) is row


def test_every_registration_hookspec_is_a_row() -> None:
    hooks = [h for h in plugins.hook_names() if h.startswith("register_")]
    assert sorted(hooks) == sorted([row.hook for row in KIND_TABLE] + ["register_commands"])
    with pytest.raises(KeyError):
        kinds.kind("poolings")
