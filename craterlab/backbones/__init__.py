"""Built-in backbones: every frozen model of the study through two generic timm factories.

- ``timm_vit``: any timm Vision Transformer (DINO, DINOv2/v3, MAE, CLIP, AugReg, DeiT...).
- ``timm_cnn``: any timm CNN (ResNet, ConvNeXt, EfficientNet, DenseNet, VGG, MobileNetV3).
- ``marsdino``: the study's in-domain DINO ViTs, whose weights come from a checkpoint.

Each ``conf/backbone/*.yaml`` picks a factory, a timm ``model`` and its ``pretrained_tag``.
The config keys are defined once, in :mod:`craterlab.backbones.options`; they are the
registry's schema and the factories' keywords.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any

from craterlab.hookspecs import hookimpl
from craterlab.lazy import lazy_exports

if TYPE_CHECKING:
    from craterlab.backbones.timm_backbone import TimmCNN, TimmViT

__all__ = [
    "EXTRACTOR_VERSION",
    "MarsDinoOptions",
    "TimmCNN",
    "TimmOptions",
    "TimmViT",
    "WeightsOptions",
    "marsdino",
    "timm_cnn",
    "timm_vit",
]
# The factories below import their models on first call, so loading plugins imports no torch.
__getattr__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(
            ("MarsDinoOptions", "TimmOptions", "WeightsOptions"), "craterlab.backbones.options"
        ),
        **dict.fromkeys(
            ("EXTRACTOR_VERSION", "TimmCNN", "TimmViT"), "craterlab.backbones.timm_backbone"
        ),
    },
)


def timm_vit(model: str, pretrained_tag: str | None = None, **options: Any) -> TimmViT:
    """A timm ViT: CLS, patch tokens and last-block CLS->patch attention.

    ``options`` are the other keys of :class:`TimmOptions` (weights, seed, precision...).
    """
    from craterlab.backbones.options import TimmOptions
    from craterlab.backbones.timm_backbone import TimmViT

    return TimmViT(TimmOptions(model=model, pretrained_tag=pretrained_tag, **options))


def timm_cnn(model: str, pretrained_tag: str | None = None, **options: Any) -> TimmCNN:
    """A timm CNN: final feature map cells as tokens, their mean as the global vector."""
    from craterlab.backbones.options import TimmOptions
    from craterlab.backbones.timm_backbone import TimmCNN

    return TimmCNN(TimmOptions(model=model, pretrained_tag=pretrained_tag, **options))


MARSDINO_ARCH = {"s": "vit_small_patch16_224", "b": "vit_base_patch16_224"}


def marsdino(**options: Any) -> TimmViT:
    """MarsDINO ViT-S/16 or B/16 (the study's in-domain DINO models) from a checkpoint.

    ``weights`` is a local DINO-style checkpoint (teacher/student keys, ``module.`` /
    ``backbone.`` prefixes) or 'hf-hub:ORG/NAME[/FILE]'. The weights are not public yet, so
    without one this is an error, or random weights with allow_random_weights.
    """
    from craterlab.backbones.options import MarsDinoOptions, TimmOptions, WeightsOptions
    from craterlab.backbones.timm_backbone import TimmViT

    opts = MarsDinoOptions(**options)
    reason = None
    weights = opts.weights
    if not weights or weights == "pretrained":
        reason = (
            f"MarsDINO ViT-{opts.size.upper()}/16 weights are not on a public hub; pass "
            f"backbone.weights=/path/to/checkpoint.pth (or hf-hub:ORG/NAME)"
        )
        weights = "pretrained"
    shared = {f.name: getattr(opts, f.name) for f in fields(WeightsOptions)}
    timm_options = TimmOptions(
        model=MARSDINO_ARCH[opts.size],
        pretrained_tag="dino",  # DINO's preprocessing (ImageNet mean/std, bicubic, crop 0.9)
        **{**shared, "weights": weights},
    )
    return TimmViT(timm_options, label=f"marsdino_{opts.size}", unavailable_reason=reason)


@hookimpl
def register_backbones(register) -> None:  # type: ignore[no-untyped-def]
    register(
        "timm_vit",
        timm_vit,
        "timm Vision Transformer (CLS, patch tokens, CLS attention)",
        schema="craterlab.backbones.options:TimmOptions",
    )
    register(
        "timm_cnn",
        timm_cnn,
        "timm CNN (feature-map cells as tokens, GAP global vector)",
        schema="craterlab.backbones.options:TimmOptions",
    )
    register(
        "marsdino",
        marsdino,
        "MarsDINO ViT-S/16 or B/16 from a DINO-style checkpoint",
        schema="craterlab.backbones.options:MarsDinoOptions",
    )
