"""Example third-party craterlab plugin: a centre-prior selector and a run observer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from craterlab import Features, Tokens, hookimpl


class CenterSelector:
    """The K patch tokens nearest the crop centre (crater crops are centred on the crater)."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.k = k

    def __call__(self, features: Features) -> Tokens:
        rows, cols = features.grid
        if self.k > rows * cols:
            raise ValueError(f"k={self.k} exceeds the {rows * cols} patch tokens")
        r = torch.arange(rows, dtype=torch.float32, device=features.tokens.device)
        c = torch.arange(cols, dtype=torch.float32, device=features.tokens.device)
        rr, cc = torch.meshgrid(r - (rows - 1) / 2, c - (cols - 1) / 2, indexing="ij")
        distance = (rr**2 + cc**2).flatten()
        # stable order: nearest first, ties broken by raster index
        order = torch.argsort(distance, stable=True)[: self.k]
        picked = features.tokens[:, order]
        return Tokens(torch.nn.functional.normalize(picked, dim=-1))


@hookimpl
def register_selectors(register: Any) -> None:
    register("center", CenterSelector, "K patch tokens nearest the crop centre (example plugin)")


@hookimpl
def run_finished(run_dir: str, results: dict[str, dict[str, float]], tracker: Any) -> None:
    """Write mAP per mode to center_summary.json in the run directory, and log it."""
    summary = Path(run_dir, "center_summary.json")
    summary.write_text(json.dumps({m: r.get("mAP") for m, r in results.items()}, indent=2))
    tracker.log_artifact(summary)
