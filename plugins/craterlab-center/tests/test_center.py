"""Tests of the example plugin, runnable from its own folder once installed."""

from __future__ import annotations

import torch
from craterlab_center import CenterSelector

from craterlab.testing import check_component, random_features


def test_registered_through_entry_point(craterlab_registry) -> None:
    assert craterlab_registry.get("selector", "center").plugin == "center"


def test_keeps_the_selector_contract() -> None:
    check_component("selector", "center")  # config: conf/selector/center.yaml with k=4
    check_component("selector", "center", {"k": 16})  # every token of the 4x4 grid


def test_picks_tokens_nearest_the_centre() -> None:
    features = random_features(n=2, grid=(3, 3), dim=4)
    tokens = CenterSelector(k=1)(features)
    expected = torch.nn.functional.normalize(features.tokens[:, 4], dim=-1)  # the middle cell
    torch.testing.assert_close(tokens.vectors[:, 0], expected)
    assert tokens.vectors.shape == (2, 1, 4)
