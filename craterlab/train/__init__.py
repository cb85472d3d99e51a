"""Fine-tuning baselines: metric-learning losses (registered as plugins) and ``finetune``.

The losses are registered through the same ``register_losses`` hook a third-party plugin uses.
The training loop lives in :mod:`craterlab.train.finetune` (imported on demand, since it pulls
in torchvision); its config is checked by :func:`craterlab.train.config.validate_train_config`.
Self-supervised (DINO) pretraining lives in :mod:`craterlab.train.pretrain`, its command
(``python -m craterlab pretrain``) in :mod:`craterlab.commands.pretrain`.
"""

from __future__ import annotations

from typing import Any

from craterlab.hookspecs import hookimpl
from craterlab.lazy import lazy_exports

__all__ = [
    "ArcFaceLoss",
    "BatchHardTripletLoss",
    "LateInteractionContrastiveLoss",
    "SupConLoss",
    "register_losses",
]
__getattr__ = lazy_exports(__name__, dict.fromkeys(__all__[:-1], "craterlab.train.losses"))


@hookimpl
def register_losses(register: Any) -> None:
    register(
        "supcon",
        "craterlab.train.losses:SupConLoss",
        "Supervised contrastive loss (Khosla et al. 2020), all same-label samples positive",
    )
    register(
        "arcface",
        "craterlab.train.losses:ArcFaceLoss",
        "ArcFace additive angular margin (s=64, m=0.5); class weights sized from the train split",
    )
    register(
        "triplet",
        "craterlab.train.losses:BatchHardTripletLoss",
        "Batch-hard triplet loss (Hermans et al. 2017) on L2-normalized embeddings, margin 0.2",
    )
    register(
        "late_interaction",
        "craterlab.train.losses:LateInteractionContrastiveLoss",
        "Token-aware: SupCon over late-interaction (Eq. 1) scores of instance/selected tokens",
    )
