"""How runs with untrained weights are marked, in one place for the run table and the report."""

from __future__ import annotations

UNTRAINED_NOTE = "NOTE: untrained (random) backbone weights; not comparable to the study."


def weights_label(weights: str) -> str:
    """The short label of a weights status: 'random (offline ...)' -> 'random'."""
    return weights.split(" (")[0].split(":")[0].strip() or "unknown"


def weights_mark(weights: str) -> str:
    """'[random weights]', '[pretrained weights]', ... as printed beside results."""
    return f"[{weights_label(weights)} weights]"
