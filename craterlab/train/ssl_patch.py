"""iBOT's masked patch-token objective for DINO pretraining (``pretrain.patch_loss=ibot``).

The DINO loss trains one pooled vector per view; late interaction scores patch tokens, which
it trains only indirectly. iBOT adds a token-level target: the student sees a global crop with
some patch tokens replaced by a learned mask token, the EMA teacher sees the crop whole, and at
every masked position the student's projected token learns to predict the teacher's centred,
sharpened projection of the token it could not see.

lightly provides the parts: the block masks (:func:`~lightly.models.utils.random_block_mask`,
DINOv2's masking: a share of the crops masked, each with its own ratio), the masked encoder
(:class:`~lightly.models.modules.MaskedVisionTransformerTIMM`, wrapping the student's own timm
ViT without touching its weights) and the loss with its centre
(:class:`~lightly.loss.IBOTPatchLoss`). This module picks the masked positions and feeds them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from craterlab.errors import ConfigError


def require_vit(
    model: torch.nn.Module,
    objective: str = "pretrain.patch_loss=ibot masks",
    off: str = "pretrain.patch_loss=none",
) -> None:
    """Refuse a model without a sequence of patch tokens (not a timm VisionTransformer) for
    the token-level ``objective`` ("<option> <what it does with them>"); ``off`` turns it off."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ConfigError(
            f"{objective} patch tokens of a timm VisionTransformer, and the backbone's model "
            f"is a {type(model).__name__}. Use a ViT backbone (e.g. backbone=dino_s16, or "
            f"backbone.model=test_vit), or turn the objective off ({off})."
        )


def masked_encoder(model: torch.nn.Module, mask_token: torch.nn.Parameter) -> torch.nn.Module:
    """lightly's masked ViT around ``model`` (the same modules, weights untouched): its
    ``encode(x, mask=...)`` is ``model.forward_features`` with the masked tokens replaced."""
    from lightly.models.modules import MaskedVisionTransformerTIMM

    require_vit(model)
    return MaskedVisionTransformerTIMM(
        vit=model,
        mask_token=mask_token,
        weight_initialization="skip",
        pos_embed_initialization="skip",
    )


def grid_of(model: torch.nn.Module, size: int) -> tuple[int, int]:
    """(rows, columns) of patch tokens for a ``size`` px square input."""
    patch = model.patch_embed.patch_size  # type: ignore[union-attr]
    p = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return size // int(p[0]), size // int(p[1])


def check_grid(grid: tuple[int, int], mask_ratio: Any) -> None:
    """Refuse a mask ratio that masks no token of the crops' patch grid."""
    rows, cols = grid
    if int(rows * cols * float(mask_ratio[1])) < 1:
        raise ConfigError(
            f"pretrain.mask_ratio {list(mask_ratio)} masks no token of a {rows}x{cols} patch "
            f"grid (the upper end times {rows * cols} tokens is below 1), so the patch loss "
            f"would never train. Raise the upper end (e.g. pretrain.mask_ratio=[0.1,0.5]), use "
            "larger global crops, or turn it off (pretrain.patch_loss=none)."
        )


def block_masks(
    n: int, grid: tuple[int, int], prefix: int, mask_ratio: Any, mask_share: float, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks for ``n`` crops: ``(sequence mask (n, prefix + rows*cols), block mask (n, rows,
    cols))``. lightly's DINOv2 block masking: ``int(n * mask_share)`` crops masked, their
    ratios spread over ``mask_ratio``, the rest unmasked; prefix tokens are never masked.
    Randomness: Python's ``random`` (seed it for reproducible masks)."""
    from lightly.models.utils import random_block_mask

    rows, cols = grid
    lo, hi = float(mask_ratio[0]), float(mask_ratio[1])
    # a block never needs more tokens than the smallest mask holds (lightly refuses otherwise)
    min_block = max(0, min(4, int(rows * cols * lo)))
    block = random_block_mask(
        size=(n, rows, cols),
        batch_mask_ratio=mask_share,
        min_image_mask_ratio=lo,
        max_image_mask_ratio=hi,
        min_num_masks_per_block=min_block,
        device=device,
    )
    seq = torch.zeros((n, prefix + rows * cols), dtype=torch.bool, device=device)
    seq[:, prefix:] = block.flatten(1)
    return seq, block


def patch_loss(
    criterion: torch.nn.Module,
    teacher_tokens: torch.Tensor,
    student_tokens: torch.Tensor,
    mask: torch.Tensor,
    block: torch.Tensor,
    teacher_head: torch.nn.Module,
    student_head: torch.nn.Module,
    teacher_temp: float,
) -> torch.Tensor | None:
    """iBOT's loss over the masked positions only: the heads project the teacher's (unmasked
    view) and the student's (masked view) tokens at ``mask``; lightly's ``IBOTPatchLoss``
    compares them (per crop: the mean over its masked tokens; then the sum over crops / crops)
    and updates its centre. None when fewer than 2 tokens are masked in the whole batch (no
    centre update from an empty batch; a BatchNorm head needs 2 rows)."""
    if int(mask.sum()) < 2:
        return None
    with torch.no_grad():
        t_out = teacher_head(teacher_tokens[mask]).float()
    s_out = student_head(student_tokens[mask]).float()
    return criterion(t_out, s_out, mask=block, teacher_temp=teacher_temp)


@contextmanager
def python_random(seed: int) -> Iterator[None]:
    """Seed Python's global ``random`` (lightly's masks draw from it) inside the block and put
    the caller's state back afterwards."""
    saved = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved)
