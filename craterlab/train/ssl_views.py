"""Multi-crop views of grey orbital images for self-supervised pretraining.

Crater imagery is one band; its nuisance factors are the sun (its azimuth moves the shadow
around the rim, its elevation the shadow length), the sensor (gain, gamma, blur, noise) and the
crop placement. So a view is a random resized crop, a random azimuth change (one of the 8
rotations/flips of the square, or a left-right flip only), a random gamma, contrast and
brightness, an optional Gaussian blur and Gaussian noise; there is no colour jitter.
The views are grey tensors repeated to 3 channels and normalized with the model's own mean and
std, at the global size (the model's input) or the local size.

Randomness comes from torch's global RNG, which the pretraining loop seeds per epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from craterlab.train.pretrain_config import PretrainConfig


def _uniform(n: int, lo: float, hi: float) -> torch.Tensor:
    """``n`` draws from U[lo, hi), shaped (n, 1, 1, 1) to scale a batch of images."""
    return (lo + (hi - lo) * torch.rand(n)).view(n, 1, 1, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Blur each (1, S, S) image of ``x`` (B, 1, S, S) with its own ``sigma`` (B,): separable,
    one grouped convolution per axis, reflect padding (torchvision's gaussian_blur per image)."""
    b = x.shape[0]
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, 2r+1)
    x = x.view(1, b, *x.shape[-2:])
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(b, 1, 1, -1), groups=b)
    x = F.conv2d(x, kernel.view(b, 1, -1, 1), groups=b)
    return x.view(b, 1, *x.shape[-2:])


class GreyView:
    """Augmented views of grey images in [0, 1] at ``size`` pixels: a random resized crop per
    image, then the azimuth, photometric and sensor changes drawn per image but applied to the
    whole batch at once (the per-image Python work is only the crop)."""

    def __init__(self, cfg: PretrainConfig, size: int, scale: Sequence[float]) -> None:
        self.cfg = cfg
        self.size = size
        self.crop = v2.RandomResizedCrop((size, size), scale=tuple(scale), antialias=True)

    def __call__(self, grey: torch.Tensor) -> torch.Tensor:
        """One (1, H, W) image -> its (1, size, size) view."""
        return self.batch([grey])[0]

    def batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """(1, H, W) images -> (B, 1, size, size) views."""
        c = self.cfg
        x = torch.stack([self.crop(g) for g in images])
        n = x.shape[0]
        if c.azimuth == "dihedral":
            turns = torch.randint(4, (n,))
            for k in range(1, 4):
                sel = turns == k
                if sel.any():
                    x[sel] = torch.rot90(x[sel], k, dims=(-2, -1))
        if c.azimuth in ("dihedral", "flip"):
            flip = torch.rand(n) < 0.5
            if flip.any():
                x[flip] = torch.flip(x[flip], dims=(-1,))
        x = x.clamp(0, 1) ** _uniform(n, *c.gamma)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * _uniform(n, 1 - c.contrast, 1 + c.contrast) + mean
        x = x + _uniform(n, -c.brightness, c.brightness)
        if c.blur_prob > 0:
            blur = torch.rand(n) < c.blur_prob
            if blur.any():
                lo, hi = c.blur_sigma
                sigma = lo + (hi - lo) * torch.rand(int(blur.sum()))
                radius = min(max(1, round(3 * hi)), (self.size - 1) // 2)
                x[blur] = gaussian_blur(x[blur], sigma, radius)
        if c.noise > 0:
            x = x + torch.randn_like(x) * _uniform(n, 0, c.noise)
        return x.clamp(0, 1)


class MultiCrop:
    """``global_crops`` views at the model's input size and ``local_crops`` smaller ones.

    ``__call__`` maps a batch of grey images to ``(globals, locals)``: lists of (B, 3, S, S)
    normalized tensors, one per crop index (the layout lightly's DINOLoss expects).
    """

    def __init__(
        self,
        cfg: PretrainConfig,
        global_size: int,
        local_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.cfg = cfg
        self.global_size, self.local_size = global_size, local_size
        self.global_view = GreyView(cfg, global_size, cfg.global_scale)
        self.local_view = GreyView(cfg, local_size, cfg.local_scale)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)

    def _normalize(self, grey: torch.Tensor) -> torch.Tensor:
        return (grey.expand(-1, 3, -1, -1) - self.mean) / self.std

    def __call__(
        self, images: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every view of batch element ``b`` cut from ``images[b]`` (plain DINO)."""
        return self.views([images] * self.cfg.global_crops, [images] * self.cfg.local_crops)

    def views(
        self,
        global_sources: Sequence[Sequence[torch.Tensor]],
        local_sources: Sequence[Sequence[torch.Tensor]],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Crop ``k`` of batch element ``b`` cut from ``global_sources[k][b]`` (or
        ``local_sources``): paired views take each crop from another image of one place."""
        globals_ = [self._normalize(self.global_view.batch(s)) for s in global_sources]
        locals_ = [self._normalize(self.local_view.batch(s)) for s in local_sources]
        return globals_, locals_
