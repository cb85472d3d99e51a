"""Every built-in component keeps its kind's contract (craterlab.testing.check_component).

The registry is built from craterlab's own plugins only, so installing a third-party plugin
cannot add or change cases here. Backbones run timm's tiny test models; the real architectures
are exercised in test_backbones.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from craterlab.errors import ConfigError
from craterlab.registry import KINDS, Registry
from craterlab.testing import (
    CONTRACTS,
    builtin_registry,
    check_component,
    check_config_errors,
    configs_by_component,
)
from craterlab.types import Tokens

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = builtin_registry()
COMPONENTS = sorted((c.kind, c.name) for c in REGISTRY)
TINY_SYNTHETIC = {
    "name": "synthetic",
    "size": "tiny",
    "n_identities": 6,
    "n_query_craters": 2,
    "image_size": 64,
}
# Explicit configs where the conf/ option would be slow (full-size backbones, 224 px images).
CONFIGS = {
    ("backbone", "timm_vit"): {"model": "test_vit", "weights": "random", "precision": "fp32"},
    ("backbone", "timm_cnn"): {"model": "test_resnet", "weights": "random", "precision": "fp32"},
    ("backbone", "marsdino"): {"size": "s", "weights": "random", "precision": "fp32"},
    ("dataset", "synthetic"): TINY_SYNTHETIC,
    ("dataset", "manifest"): {"path": str(ROOT / "examples/manifest/manifest.csv")},
}
SLOW = {("backbone", "marsdino"): "builds ViT-S/16 twice (22M parameters)"}


def cases(kinds: tuple[str, ...] = KINDS) -> list:
    return [
        pytest.param(kind, name, marks=pytest.mark.slow) if (kind, name) in SLOW else (kind, name)
        for kind, name in COMPONENTS
        if kind in kinds
    ]


@pytest.mark.parametrize(("kind", "name"), cases())
def test_component_keeps_its_contract(kind: str, name: str, tmp_path: Path) -> None:
    config = CONFIGS.get((kind, name))
    if (kind, name) == ("dataset", "craterbench_r"):  # a release written by the exporter
        from craterlab.data.export import export_dataset

        release = tmp_path / "release"
        export_dataset(REGISTRY.build("dataset", TINY_SYNTHETIC), release, progress=False)
        config = {"root": str(release), "download": False}
    check_component(kind, name, config, registry=REGISTRY)


def test_every_kind_has_a_contract_and_a_builtin() -> None:
    assert {k for k, _ in COMPONENTS} == set(KINDS)
    missing = set(KINDS) - set(CONTRACTS)
    assert not missing, f"kinds without a contract in craterlab.testing: {sorted(missing)}"


def test_every_builtin_ships_a_config() -> None:
    configs = configs_by_component()
    unconfigured = [c for c in COMPONENTS if c not in configs]
    assert not unconfigured, f"components with no conf/ option: {unconfigured}"


def test_builtin_registry_ignores_installed_plugins(monkeypatch) -> None:
    """With a plugin installed (a fake entry point) and entry points enabled, the built-in
    registry, and so every case above, stays the same; the process-wide one gains it."""
    import sys
    import types
    from importlib.metadata import EntryPoint

    from craterlab import hookimpl, plugins

    module = types.ModuleType("fake_center_plugin")

    @hookimpl
    def register_selectors(register):
        register("fake_center", Unnormalized, "a selector from an installed plugin")

    module.register_selectors = register_selectors
    monkeypatch.setitem(sys.modules, "fake_center_plugin", module)
    fake = EntryPoint("fake-center", "fake_center_plugin", "craterlab")
    monkeypatch.setattr(plugins, "installed_entry_points", lambda: [fake])
    monkeypatch.setenv("CRATERLAB_LOAD_PLUGINS", "1")
    assert "fake_center" in plugins.fill_registry(plugins.make_manager()).names("selector")
    assert sorted((c.kind, c.name) for c in builtin_registry()) == COMPONENTS


# ------------------------------------------------------------------ the checks can fail


def registry_with(kind: str, name: str, factory) -> Registry:
    registry = builtin_registry()
    registry.register(kind, name, factory, description="a deliberately broken component")
    return registry


class Unnormalized:
    """Selects the first k tokens but forgets to L2-normalize them."""

    def __init__(self, k: int = 2) -> None:
        self.k = k

    def __call__(self, features):
        return Tokens(features.tokens[:, : self.k])


class BatchDependent:
    """Pools the mean token minus the batch mean: each image depends on the others."""

    def __call__(self, features):
        v = features.tokens.mean(1)
        return torch.nn.functional.normalize(v - v.mean(0, keepdim=True), dim=-1)


class Unseeded:
    """Draws K random patch tokens from the global RNG state, advanced on every build."""

    calls = 0

    def __init__(self, k: int = 2) -> None:
        Unseeded.calls += 1
        self.offset = Unseeded.calls
        self.k = k

    def __call__(self, features):
        picked = features.tokens[:, self.offset % 4 : self.offset % 4 + self.k]
        return Tokens(torch.nn.functional.normalize(picked, dim=-1))


class InventedTokens:
    """Returns normalized random vectors instead of patch tokens."""

    def __init__(self, k: int = 2) -> None:
        self.k = k

    def __call__(self, features):
        n, _, d = features.tokens.shape
        g = torch.Generator().manual_seed(0)
        return Tokens(torch.nn.functional.normalize(torch.randn(n, self.k, d, generator=g), dim=-1))


@pytest.mark.parametrize(
    ("kind", "factory", "message"),
    [
        ("selector", Unnormalized, "must be L2-normalized"),
        ("pooling", BatchDependent, "a batch must equal its halves"),
        ("selector", Unseeded, "two seeded builds must agree"),
        ("selector", InventedTokens, "must select the image's own patch tokens"),
    ],
)
def test_contract_catches_a_broken_component(kind: str, factory, message: str) -> None:
    registry = registry_with(kind, "broken", factory)
    with pytest.raises(AssertionError, match=message):
        check_component(kind, "broken", {}, registry=registry)


def test_contract_catches_a_matcher_that_scores_padding() -> None:
    class CountsPadding:
        """Mean over all token pairs, masks ignored."""

        def score(self, queries, gallery):
            return torch.einsum("qkd,gjd->qg", queries.vectors, gallery.vectors)

        def rerank(self, queries, gallery, candidates):
            return self.score(queries, gallery).gather(1, candidates)

    registry = registry_with("matcher", "padding", CountsPadding)
    with pytest.raises(AssertionError, match="padding tokens"):
        check_component("matcher", "padding", {}, registry=registry)


def test_config_check_needs_the_valid_keys_in_the_error() -> None:
    registry = builtin_registry()

    def terse(k: int = 1) -> int:
        """A component whose unknown keys would go unexplained if the registry did not help."""
        return k

    registry.register("pooling", "terse", terse)
    check_config_errors(registry, "pooling", {"name": "terse"})  # the registry names them
    with pytest.raises(ConfigError, match="Valid keys: k"):
        registry.validate("pooling", {"name": "terse", "kk": 2})
