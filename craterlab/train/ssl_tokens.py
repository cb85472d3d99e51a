"""A token-level contrastive objective for pretraining (``pretrain.token_loss=late_interaction``).

Late interaction ranks a gallery by ``s(q, g) = mean_i max_j <q_i, g_j>`` over patch tokens.
The DINO loss trains one pooled vector per view, so the tokens learn only through the pool.
This objective trains the retrieval score itself: the student's global crops of a batch are
token sets, each scored against every other crop with late interaction, and the crops of one
batch element (one image, or one place under paired views: other illuminations) are the
positives of a contrastive softmax over the rest of the batch. No label is read: the positives
are the crops the pretraining already cut from one place.

The score and the softmax are the token-aware fine-tuning loss's
(:class:`~craterlab.train.losses.LateInteractionContrastiveLoss`), with the batch position as
the label.
"""

from __future__ import annotations

import torch

from craterlab.errors import ConfigError
from craterlab.train.losses import LateInteractionContrastiveLoss
from craterlab.train.ssl_patch import require_vit


def require_patch_tokens(model: torch.nn.Module, global_crops: int) -> None:
    """Refuse a model without a sequence of patch tokens (not a timm VisionTransformer), or
    fewer than 2 global crops (a crop needs a positive)."""
    objective = "pretrain.token_loss=late_interaction scores the"
    require_vit(model, objective, off="pretrain.token_loss=none")
    if global_crops < 2:
        raise ConfigError(
            f"pretrain.token_loss=late_interaction contrasts the global crops of each batch "
            f"element with each other, and pretrain.global_crops is {global_crops}. Set "
            "pretrain.global_crops=2 (or more), or turn the token objective off "
            "(pretrain.token_loss=none)."
        )


def token_contrast_loss(tokens: torch.Tensor, batch_size: int, temperature: float) -> torch.Tensor:
    """The loss of ``tokens`` (crops x batch_size, N, D): the student's patch tokens of its
    global crops, crop-major (crop ``c`` of element ``e`` at row ``c * batch_size + e``), as
    the pretraining loop concatenates them."""
    n = tokens.shape[0]
    if n % batch_size or n // batch_size < 2:
        raise ValueError(
            f"token_contrast_loss needs 2 or more crops of each of the {batch_size} batch "
            f"elements, crop-major; got {n} token sets"
        )
    labels = torch.arange(batch_size, device=tokens.device).repeat(n // batch_size)
    return LateInteractionContrastiveLoss(temperature=temperature, tokens="all")(tokens, labels)
