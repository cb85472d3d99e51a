"""Poolings: Features -> one L2-normalized vector per image, (N, D).

CLS, mean (GAP), max and GeM pool the backbone output directly. ``InstancePooling`` pools the
K instance tokens of :class:`~craterlab.tokens.aggregation.InstanceAggregator`; NetVLAD-style
soft-assignment pooling with PCA whitening lives in :mod:`craterlab.tokens.baselines`.
"""

from __future__ import annotations

from typing import Literal

import torch

from craterlab.tokens.aggregation import InstanceAggregator
from craterlab.tokens.common import as_float, l2norm
from craterlab.types import Features


class ClsPooling:
    """The backbone's CLS token (a pooled global vector for CNNs), L2-normalized."""

    def __call__(self, features: Features) -> torch.Tensor:
        return l2norm(as_float(features.cls))


class MeanPooling:
    """Global average pooling (GAP) of the patch tokens, L2-normalized."""

    def __call__(self, features: Features) -> torch.Tensor:
        return l2norm(as_float(features.tokens).mean(dim=1))


class MaxPooling:
    """Per-dimension max over the patch tokens, L2-normalized."""

    def __call__(self, features: Features) -> torch.Tensor:
        return l2norm(as_float(features.tokens).amax(dim=1))


class GeMPooling:
    """Generalized-mean pooling of the patch tokens: (mean_t clamp(x_t, eps)^p)^(1/p).

    Tokens are clamped at ``eps`` first (GeM is defined on non-negative activations), so p=1 is
    the mean of the clamped tokens and p -> inf tends to their max.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        if p <= 0:
            raise ValueError(f"GeM p must be positive, got {p}. Use p=3 (the study's value).")
        if eps <= 0:
            raise ValueError(f"GeM eps must be positive, got {eps}. Use eps=1e-6.")
        self.p = float(p)
        self.eps = float(eps)

    def __call__(self, features: Features) -> torch.Tensor:
        x = as_float(features.tokens).clamp(min=self.eps)
        # Factor out the per-dimension max so x^p cannot overflow for large p or activations.
        top = x.amax(dim=1, keepdim=True)
        pooled = (x / top).pow(self.p).mean(dim=1).pow(1.0 / self.p) * top.squeeze(1)
        return l2norm(pooled)


class InstancePooling:
    """Instance tokens pooled to one vector: mean or max of the K instance tokens, L2-normalized.

    The tokens come from :class:`InstanceAggregator` with the same ``k``, ``seeds`` and
    ``assign``; with ``reduce='mean'`` the vector is l2norm(sum_k z_k).
    """

    def __init__(
        self,
        k: int = 32,
        reduce: Literal["mean", "max"] = "mean",
        seeds: Literal["attention", "fps"] = "attention",
        assign: Literal["hard", "soft2", "soft4", "dense"] = "hard",
        temperature: float = 0.05,
    ) -> None:
        if reduce not in ("mean", "max"):
            raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}.")
        self.reduce = reduce
        self.aggregator = InstanceAggregator(
            k=k, seeds=seeds, assign=assign, temperature=temperature
        )

    def __call__(self, features: Features) -> torch.Tensor:
        z = self.aggregator(features).vectors
        pooled = z.mean(dim=1) if self.reduce == "mean" else z.amax(dim=1)
        return l2norm(pooled)
