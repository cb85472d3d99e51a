"""Token selectors: Features -> K of the patch tokens per image, L2-normalized, (N, K, D).

Score-based selectors return the top-K tokens in descending score order:
- ``attention``: last-block CLS->patch attention (needs attention).
- ``norm``: L2 norm of the raw token.
- ``norm_attention``: norm x attention (needs attention).
- ``cls_similarity``: cosine to the CLS token (most similar first).
- ``cls_distance``: cosine distance to the CLS token (least similar first).
- ``random``: seeded uniform draw without replacement per image (keyed by the image's CLS bits).
Position-based selectors:
- ``grid``: K positions spread uniformly over the patch grid (same for every image), raster order.
- ``all``: every patch token, raster order (K = T).
"""

from __future__ import annotations

import math

import torch

from craterlab.tokens.common import (
    as_float,
    check_k_positive,
    check_k_tokens,
    gather_tokens,
    l2norm,
    random_keys,
    require_attention,
    top_k_indices,
)
from craterlab.types import Features, Tokens


class _TopKSelector:
    """Top-K patch tokens by a per-token score (subclasses define ``scores``)."""

    name = "topk"

    def __init__(self, k: int = 32) -> None:
        self.k = check_k_positive(k)

    def scores(self, features: Features, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def indices(self, features: Features) -> torch.Tensor:
        """(N, K) indices of the selected tokens, in selection order."""
        tokens = as_float(features.tokens)
        check_k_tokens(self.k, tokens.shape[1], f"selector {self.name!r}")
        return top_k_indices(self.scores(features, tokens), self.k)

    def __call__(self, features: Features) -> Tokens:
        tokens = as_float(features.tokens)
        return Tokens(l2norm(gather_tokens(tokens, self.indices(features))))


class AttentionSelector(_TopKSelector):
    """Top-K patch tokens by CLS->patch attention, highest first."""

    name = "attention"

    def scores(self, features: Features, tokens: torch.Tensor) -> torch.Tensor:
        return require_attention(features, "selector 'attention'")


class NormSelector(_TopKSelector):
    """Top-K patch tokens by L2 norm, largest first."""

    name = "norm"

    def scores(self, features: Features, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.norm(dim=-1)


class NormAttentionSelector(_TopKSelector):
    """Top-K patch tokens by L2 norm x CLS->patch attention, largest first."""

    name = "norm_attention"

    def scores(self, features: Features, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.norm(dim=-1) * require_attention(features, "selector 'norm_attention'")


class ClsSimilaritySelector(_TopKSelector):
    """Top-K patch tokens by cosine similarity to the CLS token, most similar first."""

    name = "cls_similarity"

    def scores(self, features: Features, tokens: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ntd,nd->nt", l2norm(tokens), l2norm(as_float(features.cls)))


class ClsDistanceSelector(_TopKSelector):
    """Top-K patch tokens by cosine distance to the CLS token, least similar first."""

    name = "cls_distance"

    def scores(self, features: Features, tokens: torch.Tensor) -> torch.Tensor:
        return 1.0 - torch.einsum("ntd,nd->nt", l2norm(tokens), l2norm(as_float(features.cls)))


class RandomSelector(_TopKSelector):
    """K patch tokens drawn uniformly without replacement, seeded.

    The draw of an image depends only on (seed, the image's CLS vector), so it does not depend
    on the batch, the call order or the device (see :func:`craterlab.tokens.common.random_keys`).
    """

    name = "random"

    def __init__(self, k: int = 32, seed: int = 0) -> None:
        super().__init__(k)
        self.seed = int(seed)

    def scores(self, features: Features, tokens: torch.Tensor) -> torch.Tensor:
        return random_keys(self.seed, features.cls, tokens.shape[1])


def grid_positions(grid: tuple[int, int], k: int) -> torch.Tensor:
    """K raster indices spread uniformly over a (rows, cols) grid, in raster order.

    Places an a x b lattice (a*b >= K, aspect close to the grid's) at the centres of equal
    cells, then keeps K of its a*b points evenly spaced in raster order.
    """
    rows, cols = grid
    a = min(rows, max(1, round(math.sqrt(k * rows / cols))))
    b = min(cols, math.ceil(k / a))
    if a * b < k:
        a = min(rows, math.ceil(k / b))
    r = [int((i + 0.5) * rows / a) for i in range(a)]
    c = [int((j + 0.5) * cols / b) for j in range(b)]
    lattice = [ri * cols + cj for ri in r for cj in c]
    keep = [lattice[int((i + 0.5) * len(lattice) / k)] for i in range(k)]
    return torch.tensor(sorted(keep), dtype=torch.long)


class GridSelector:
    """K patch tokens at positions spread uniformly over the spatial grid (raster order)."""

    name = "grid"

    def __init__(self, k: int = 32) -> None:
        self.k = check_k_positive(k)

    def indices(self, features: Features) -> torch.Tensor:
        n, t = features.tokens.shape[:2]
        if features.grid[0] * features.grid[1] != t:
            raise ValueError(f"features.grid {features.grid} does not match {t} patch tokens.")
        check_k_tokens(self.k, t, "selector 'grid'")
        pos = grid_positions(features.grid, self.k).to(features.tokens.device)
        return pos.unsqueeze(0).expand(n, -1)

    def __call__(self, features: Features) -> Tokens:
        tokens = as_float(features.tokens)
        return Tokens(l2norm(gather_tokens(tokens, self.indices(features))))


class AllSelector:
    """Every patch token (K = T), L2-normalized, in raster order."""

    name = "all"

    def __call__(self, features: Features) -> Tokens:
        return Tokens(l2norm(as_float(features.tokens)))


def no_selector() -> None:
    """No token method (selector=none, aggregator=none): the run computes single vectors
    only, so backbones without attention (CNNs) run the single-vector tables."""
    return None
