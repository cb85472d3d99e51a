"""The registry: lookup, validation of names, keys and types, wildcard listing."""

from __future__ import annotations

from typing import Literal

import pytest

from craterlab.errors import ConfigError, UnknownComponentError
from craterlab.registry import Registry


class Scaled:
    """Scale things by a factor."""

    def __init__(
        self,
        k: int,
        factor: float = 1.0,
        mode: Literal["a", "b"] = "a",
        tags: list[str] | None = None,
        seed: int = 0,
    ) -> None:
        self.k, self.factor, self.mode, self.tags, self.seed = k, factor, mode, tags, seed


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    reg.register("pooling", "scaled", Scaled, plugin="tests")
    reg.register("pooling", "scaled_max", Scaled, "max variant", plugin="tests")
    return reg


def test_build_passes_validated_values(registry: Registry) -> None:
    obj = registry.build("pooling", {"name": "scaled", "k": 3, "factor": 2, "mode": "b"})
    assert (obj.k, obj.factor, obj.mode) == (3, 2.0, "b")
    assert isinstance(obj.factor, float)  # an int is accepted where a float is expected


def test_description_defaults_to_docstring(registry: Registry) -> None:
    assert registry.get("pooling", "scaled").description == "Scale things by a factor."
    assert registry.get("pooling", "scaled_max").description == "max variant"


def test_unknown_name_lists_known_and_closest(registry: Registry) -> None:
    with pytest.raises(UnknownComponentError) as err:
        registry.build("pooling", {"name": "scaledd", "k": 1})
    msg = str(err.value)
    assert "Unknown pooling 'scaledd'" in msg
    assert "Did you mean 'scaled'?" in msg
    assert "scaled, scaled_max" in msg


def test_unknown_key_names_valid_keys(registry: Registry) -> None:
    with pytest.raises(ConfigError) as err:
        registry.build("pooling", {"name": "scaled", "k": 1, "facter": 2.0})
    msg = str(err.value)
    assert "no config key 'facter'" in msg and "Did you mean 'factor'?" in msg
    assert "Valid keys: k, factor, mode, tags, seed" in msg


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("k", "three", "must be int"),
        ("k", True, "must be int"),
        ("factor", "x", "must be float"),
        ("mode", "c", "must be one of 'a', 'b'"),
        ("tags", [1, 2], "must be a list of str or null"),
    ],
)
def test_wrong_type_names_key_and_type(registry: Registry, key, value, expected) -> None:
    cfg = {"name": "scaled", "k": 1, key: value}
    with pytest.raises(ConfigError) as err:
        registry.build("pooling", cfg)
    assert f"key {key!r} {expected}" in str(err.value)


def test_missing_required_key(registry: Registry) -> None:
    with pytest.raises(ConfigError, match="needs config key"):
        registry.build("pooling", {"name": "scaled"})


def test_missing_name(registry: Registry) -> None:
    with pytest.raises(ConfigError, match="has no 'name'"):
        registry.build("pooling", {"k": 1})


def test_context_fills_declared_parameters_only(registry: Registry) -> None:
    obj = registry.build("pooling", {"name": "scaled", "k": 1}, seed=7, device="cpu")
    assert obj.seed == 7


def test_factory_value_error_becomes_config_error() -> None:
    reg = Registry()

    def picky(k: int) -> int:
        if k < 1:
            raise ValueError("k must be at least 1")
        return k

    reg.register("selector", "picky", picky)
    with pytest.raises(ConfigError, match="selector 'picky' rejected its config: k must be"):
        reg.build("selector", {"name": "picky", "k": 0})


def test_wildcard_listing(registry: Registry) -> None:
    assert registry.names("pooling", "*max") == ["scaled_max"]
    assert registry.names("pooling") == ["scaled", "scaled_max"]


def test_unknown_kind() -> None:
    with pytest.raises(UnknownComponentError, match="Unknown component kind 'poolings'"):
        Registry().names("poolings")


def test_same_name_from_two_plugins_is_refused(registry: Registry) -> None:
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("pooling", "scaled", lambda k: k, plugin="other")
