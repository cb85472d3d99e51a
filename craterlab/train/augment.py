"""Training views of a PIL image: none, a single random crop, or multi-crop.

Views are PIL images of the input's size; ``backbone.transform`` then resizes and normalizes
them exactly as at evaluation time, so augmentation never changes the model's input format.
Randomness comes from torch's global RNG (torchvision.transforms.v2), which ``finetune`` seeds
per epoch.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image
from torchvision.transforms import v2

from craterlab.train.config import TrainConfig


def _crop_pipeline(
    size: tuple[int, int], scale: list[float], cfg: TrainConfig
) -> Callable[[Image.Image], Image.Image]:
    steps: list[Callable] = [v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True)]
    if cfg.flip:
        steps.append(v2.RandomHorizontalFlip())
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j / 2))
    return v2.Compose(steps)


def make_views(cfg: TrainConfig) -> Callable[[Image.Image], list[Image.Image]]:
    """A function image -> list of ``cfg.views_per_image`` augmented views.

    ``single_crop``: one random resized crop (area ``crop_scale``) + flip + colour jitter.
    ``multi_crop``: ``global_crops`` such crops plus ``local_crops`` at ``local_scale``.
    """

    def views(image: Image.Image) -> list[Image.Image]:
        if cfg.augment == "none":
            return [image]
        size = (image.height, image.width)
        crop = _crop_pipeline(size, cfg.crop_scale, cfg)
        if cfg.augment == "single_crop":
            return [crop(image)]
        local = _crop_pipeline(size, cfg.local_scale, cfg)
        return [crop(image) for _ in range(cfg.global_crops)] + [
            local(image) for _ in range(cfg.local_crops)
        ]

    return views
