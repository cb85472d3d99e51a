"""The from-scratch fine-tuning recipe measured in ``benchmarks/bench_finetune.py``.

One definition serves the benchmark and the slow test that asserts fine-tuning learns, so the
docs/fine-tuning.md's table and the test always describe the same training. Why each setting: the
benchmark's module docstring (600 identities, GeM because a random ViT's CLS hardly depends on
the image, a BN neck so that triplet and ArcFace cannot collapse, lr 3e-4 with a 10% warmup,
crops mild enough for 64 px images).
"""

from __future__ import annotations

from typing import Any

FROM_SCRATCH_LOSSES: dict[str, dict[str, Any]] = {
    "supcon": {"name": "supcon", "temperature": 0.1},
    "arcface": {"name": "arcface", "scale": 16.0, "margin": 0.2},
    "triplet": {"name": "triplet", "margin": 0.2},
}

FROM_SCRATCH_RECIPE: dict[str, Any] = {
    "epochs": 10,
    "lr": 3e-4,
    "head_lr": 1e-2,
    "warmup": 0.1,
    "batch_size": 32,
    "embedding": "gem",
    "neck": "bn",
    "crop_scale": [0.7, 1.0],
    "color_jitter": 0.1,
    "flip": False,
    "global_crops": 2,
    "local_crops": 1,
    "local_scale": [0.3, 0.7],
    "val_fraction": 0.0,
    "progress": False,
}
"""The train config shared by every loss."""


def from_scratch_config(loss: str, augment: str, **overrides: Any) -> dict[str, Any]:
    """The recipe's train config for one loss and crop mode."""
    return {
        "name": loss,
        "loss": FROM_SCRATCH_LOSSES[loss],
        **FROM_SCRATCH_RECIPE,
        "augment": augment,
        **overrides,
    }
