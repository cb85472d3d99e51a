"""Helpers for tests (here and in plugin packages): tiny synthetic features and token sets."""

from __future__ import annotations

import torch

from craterlab.types import Features, Tokens


def random_features(
    n: int = 4,
    grid: tuple[int, int] = (4, 4),
    dim: int = 8,
    *,
    attention: bool = True,
    seed: int = 0,
) -> Features:
    """Random features with a valid attention distribution (rows sum to one)."""
    g = torch.Generator().manual_seed(seed)
    t = grid[0] * grid[1]
    attn = torch.rand(n, t, generator=g).softmax(dim=-1) if attention else None
    return Features(
        cls=torch.randn(n, dim, generator=g),
        tokens=torch.randn(n, t, dim, generator=g),
        attn=attn,
        grid=grid,
    )


def random_tokens(n: int = 4, k: int = 3, dim: int = 8, *, seed: int = 0) -> Tokens:
    """Random L2-normalized token sets (N, K, D)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(n, k, dim, generator=g), dim=-1)
    return Tokens(v)
