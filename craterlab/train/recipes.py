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


PRETRAIN_CPU_RECIPE: dict[str, Any] = {
    "batch_size": 32,
    "lr": 1e-3,
    "min_lr": 1e-5,
    "warmup": 0.1,
    "weight_decay": 0.04,
    "weight_decay_end": 0.1,
    "out_dim": 1024,
    "hidden_dim": 256,
    "bottleneck_dim": 64,
    "head_batch_norm": True,
    "embedding": "gem",
    "global_crops": 2,
    "local_crops": 4,
    "global_scale": [0.5, 1.0],
    "local_scale": [0.2, 0.5],
    "momentum": 0.99,
    "momentum_end": 1.0,
    "teacher_temp": 0.02,
    "warmup_teacher_temp": 0.02,
    "freeze_last_layer": 0.0,
    "blur_sigma": [0.1, 1.0],
    "azimuth": "none",
    "eval_every": None,
    "progress": False,
}
"""DINO from random init on a few CPU cores (benchmarks/bench_pretrain.py and its slow test).

Measured on 200 identities, 100-250 steps (docs/pretraining.md): with DINO's ViT defaults
(CLS into the head, no BatchNorm, teacher temperature 0.04) the loss drifts to ln(out_dim), the
uniform collapse: a random ViT's outputs hardly differ between images, so centring leaves the
teacher nothing to sharpen. BatchNorm in the head (``head_batch_norm``, as DINO's ResNet
head), a sharper teacher (0.02) and GeM over the patch tokens as the head's input (what the
retrieval evaluates) keep it learning; the CLS variant of the same recipe did not move test
mAP. Small head, lr 1e-3.

``azimuth: none`` (no rotations or flips): the views a query differs by in the synthetic set
(and in orbital imagery) keep the surface's orientation and move only the shadow, so a 90-degree
rotation or a mirror makes the model treat a crater field and its rotated copy as one, throwing
away the layout of the neighbouring craters that tells one crater from another. Measured, seed
0, 400 steps: test GeM mAP 0.080 with the 8 dihedral turns, 0.101 without (random init 0.058);
LI K=32 0.123 vs 0.150. 4 local crops instead of 2: GeM 0.108 vs 0.101 at 400 steps, for
about 30% more time per step. With 2 local crops, test mAP peaked at 400-600 steps of a
1000-step schedule (GeM 0.101) and ended lower (0.091 at 1000) while the loss kept falling: the
student starts to memorize the 660 images of the 200-identity set."""


def pretrain_cpu_config(steps: int, **overrides: Any) -> dict[str, Any]:
    """The CPU pretraining recipe for ``steps`` optimizer steps (one epoch of that length)."""
    return {**PRETRAIN_CPU_RECIPE, "epochs": 1, "steps_per_epoch": steps, **overrides}
