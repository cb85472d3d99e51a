"""Built-in backbones: every frozen model of the study through two generic timm factories.

- ``timm_vit``: any timm Vision Transformer (DINO, DINOv2/v3, MAE, CLIP, AugReg, DeiT...).
- ``timm_cnn``: any timm CNN (ResNet, ConvNeXt, EfficientNet, DenseNet, VGG, MobileNetV3).
- ``marsdino``: the study's in-domain DINO ViTs, whose weights come from a checkpoint.

Each ``conf/backbone/*.yaml`` picks a factory, a timm ``model`` and its ``pretrained_tag``.
``weights`` is 'pretrained' (timm hub), 'random', a checkpoint path, or 'hf-hub:ORG/NAME'.
"""

from __future__ import annotations

from typing import Literal

from craterlab.backbones.timm_backbone import EXTRACTOR_VERSION, Precision, TimmCNN, TimmViT
from craterlab.hookspecs import hookimpl

__all__ = ["EXTRACTOR_VERSION", "TimmCNN", "TimmViT", "marsdino", "timm_cnn", "timm_vit"]


def timm_vit(
    model: str,
    pretrained_tag: str | None = None,
    weights: str = "pretrained",
    allow_random_weights: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    precision: Precision = "auto",
    checkpoint_key: str = "teacher",
) -> TimmViT:
    """A timm ViT: CLS, patch tokens and last-block CLS->patch attention.

    ``model`` is a timm architecture (``vit_small_patch16_224``) and ``pretrained_tag`` its
    weights tag (``dino``); ``image_size`` overrides the input size (DINOv2 at 224);
    ``precision`` 'auto' means bf16 autocast on CUDA and fp32 on CPU.
    """
    return TimmViT(
        model,
        pretrained_tag,
        weights,
        allow_random_weights,
        seed,
        image_size,
        precision,
        checkpoint_key,
    )


def timm_cnn(
    model: str,
    pretrained_tag: str | None = None,
    weights: str = "pretrained",
    allow_random_weights: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    precision: Precision = "auto",
) -> TimmCNN:
    """A timm CNN: final feature map cells as tokens, their mean as the global vector."""
    return TimmCNN(
        model, pretrained_tag, weights, allow_random_weights, seed, image_size, precision
    )


MARSDINO_ARCH = {"s": "vit_small_patch16_224", "b": "vit_base_patch16_224"}


def marsdino(
    size: Literal["s", "b"] = "s",
    weights: str | None = None,
    allow_random_weights: bool = False,
    seed: int = 0,
    precision: Precision = "auto",
    checkpoint_key: str = "teacher",
) -> TimmViT:
    """MarsDINO ViT-S/16 or B/16 (the study's in-domain DINO models) from a checkpoint.

    ``weights`` is a local DINO-style checkpoint (teacher/student keys, ``module.`` /
    ``backbone.`` prefixes) or 'hf-hub:ORG/NAME[/FILE]'. The weights are not public yet, so
    without one this is an error, or random weights with allow_random_weights.
    """
    arch = MARSDINO_ARCH[size]
    reason = None
    if not weights or weights == "pretrained":
        reason = (
            f"MarsDINO ViT-{size.upper()}/16 weights are not on a public hub; pass "
            f"backbone.weights=/path/to/checkpoint.pth (or hf-hub:ORG/NAME)"
        )
        weights = "pretrained"
    return TimmViT(
        arch,
        "dino",  # DINO's preprocessing (ImageNet mean/std, bicubic, crop 0.9)
        weights,
        allow_random_weights,
        seed,
        None,
        precision,
        checkpoint_key,
        label=f"marsdino_{size}",
        unavailable_reason=reason,
    )


@hookimpl
def register_backbones(register) -> None:  # type: ignore[no-untyped-def]
    register("timm_vit", timm_vit, "timm Vision Transformer (CLS, patch tokens, CLS attention)")
    register("timm_cnn", timm_cnn, "timm CNN (feature-map cells as tokens, GAP global vector)")
    register("marsdino", marsdino, "MarsDINO ViT-S/16 or B/16 from a DINO-style checkpoint")
