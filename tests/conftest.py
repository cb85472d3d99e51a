"""Shared test setup: offline, caches and tracking stores in a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

# A tiny composition that runs end to end offline in seconds (used by run and sweep tests).
TINY = [
    "dataset=synthetic",
    "dataset.identities=12",
    "dataset.query_craters=4",
    "backbone.weights=random",
    "batch_size=16",
    "k=8",
    "shortlist=5",
    "depth=20",
]


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """Keep the feature cache per test session, never in the repository's outputs/."""
    cache = tmp_path_factory.getbasetemp() / "feature-cache"
    monkeypatch.setenv("CRATERLAB_CACHE", str(cache))
