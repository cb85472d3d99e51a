"""Tests of the example plugin, runnable from its own folder once installed."""

from __future__ import annotations

import torch
from craterlab_center import CenterSelector

from craterlab.plugins import fill_registry, make_manager
from craterlab.testing import random_features


def test_registered_through_entry_point() -> None:
    registry = fill_registry(make_manager(load_entry_points=True))
    component = registry.get("selector", "center")
    assert component.plugin == "center"


def test_picks_tokens_nearest_the_centre() -> None:
    features = random_features(n=2, grid=(3, 3), dim=4)
    tokens = CenterSelector(k=1)(features)
    expected = torch.nn.functional.normalize(features.tokens[:, 4], dim=-1)  # the middle cell
    torch.testing.assert_close(tokens.vectors[:, 0], expected)
    assert tokens.vectors.shape == (2, 1, 4)
