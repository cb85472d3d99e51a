"""The backbone config keys, defined once: the registry's schema, the factories' keywords and
the fields :class:`~craterlab.backbones.timm_backbone.TimmBackbone` reads.

``WeightsOptions`` are the keys every backbone shares (where the weights come from and how
the forward runs); ``TimmOptions`` adds the timm architecture (``timm_vit``, ``timm_cnn``) and
``MarsDinoOptions`` the MarsDINO size (``marsdino``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from craterlab.devices import Precision


@dataclass(frozen=True, kw_only=True)
class WeightsOptions:
    """Keys shared by every backbone.

    ``weights``: 'pretrained' (timm hub), 'random', a checkpoint path or 'hf-hub:ORG/NAME'.
    ``allow_random_weights``: fall back to a seeded random init, loudly, when the weights are
    unreachable. ``seed``: that init's seed. ``precision``: the forward's precision; 'auto' is
    bf16 autocast on CUDA and on CPUs where a cached probe measured it faster, fp32 elsewhere
    (see :mod:`craterlab.devices`).
    ``checkpoint_key``: the state dict to read from a DINO-style checkpoint (teacher/student).
    """

    weights: str = "pretrained"
    allow_random_weights: bool = False
    seed: int = 0
    precision: Precision = "auto"
    checkpoint_key: str = "teacher"


@dataclass(frozen=True, kw_only=True)
class TimmOptions(WeightsOptions):
    """A timm architecture: ``model`` (``vit_small_patch16_224``), its weights tag
    ``pretrained_tag`` (``dino``) and an optional input ``image_size`` (DINOv2 at 224)."""

    model: str
    pretrained_tag: str | None = None
    image_size: int | None = None


@dataclass(frozen=True, kw_only=True)
class MarsDinoOptions(WeightsOptions):
    """MarsDINO ViT-S/16 or B/16: ``size`` picks the architecture; ``weights`` has no public
    default (a checkpoint path or 'hf-hub:ORG/NAME')."""

    size: Literal["s", "b"] = "s"
    weights: str | None = None
