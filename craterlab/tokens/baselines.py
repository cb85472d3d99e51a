"""Baselines at the same token budget: per-image K-means, medoids, VLAD, NetVLAD + PCA-whitening.

All work on L2-normalized patch tokens, batched over images.

- ``KMeansAggregator``: per-image Lloyd K-means (``iters`` iterations; seeded init: K distinct
  random tokens of the image, drawn as the random selector draws them), its centroids as
  tokens. An empty cluster keeps its centroid.
- ``MedoidAggregator``: the real token nearest each of those centroids.
- ``VLADAggregator``: K global centroids learned on the gallery (``fit``); per image, hard
  assignment to the nearest centroid and one intra-normalized residual sum per centroid,
  v_k = l2norm(sum_{i in k} (x_i - c_k)). A centroid no token of the image falls into is
  padding: ``mask`` False (matchers ignore it), vector l2norm(c_k) (so every vector is unit).
- ``NetVLADPooling``: soft assignment a_ik = softmax_k(-||x_i - c_k||^2 / temperature) to
  ``clusters`` global centroids, intra-normalized residuals flattened and L2-normalized, then
  PCA-whitened (fit on gallery VLAD vectors) to one vector of the token dimension.
"""

from __future__ import annotations

import math

import torch

from craterlab.errors import ConfigError
from craterlab.tokens.common import (
    as_float,
    check_k_positive,
    check_k_tokens,
    gather_tokens,
    l2norm,
    random_keys,
    top_k_indices,
)
from craterlab.types import Features, Tokens


def lloyd(x: torch.Tensor, centroids: torch.Tensor, iters: int) -> torch.Tensor:
    """Batched Lloyd K-means: x (N, T, D), initial centroids (N, K, D) -> centroids (N, K, D).

    Each iteration assigns every point to its nearest centroid (squared Euclidean; ties go to
    the lowest centroid index) and moves each centroid to the mean of its points; a centroid
    with no points stays where it is.
    """
    c = centroids.clone()
    for _ in range(iters):
        sums, counts = cluster_sums(x, nearest_centroid(x, c), c.shape[1])
        means = sums / counts.clamp_min(1.0).unsqueeze(-1)
        c = torch.where((counts > 0).unsqueeze(-1), means, c)
    return c


def cluster_sums(
    x: torch.Tensor, assign: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums (N, K, D) and counts (N, K) of points x (N, T, D) under hard ``assign``.

    On CPU a scatter-add (``index_add_``, O(T*D) per image) is about 2x faster than a one-hot
    matmul (O(T*K*D)); on CUDA the one-hot matmul is used because it is deterministic.
    """
    n, t, d = x.shape
    if x.device.type == "cpu":
        flat = (assign + torch.arange(n, device=x.device).unsqueeze(1) * k).flatten()
        sums = torch.zeros(n * k, d, dtype=x.dtype, device=x.device)
        sums.index_add_(0, flat, x.reshape(n * t, d))
        counts = torch.bincount(flat, minlength=n * k).to(x.dtype)
        return sums.view(n, k, d), counts.view(n, k)
    onehot = torch.zeros(n, t, k, dtype=x.dtype, device=x.device)
    onehot.scatter_(-1, assign.unsqueeze(-1), 1.0)
    return torch.bmm(onehot.transpose(1, 2), x), onehot.sum(dim=1)


def nearest_centroid(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(N, T, D) points, (N, K, D) centroids -> (N, T) index of the nearest centroid."""
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is constant per point.
    dist = (c * c).sum(-1).unsqueeze(1) - 2.0 * torch.bmm(x, c.transpose(1, 2))
    return dist.argmin(dim=-1)


def sample_tokens(features: Features, max_tokens: int, seed: int, chunk: int = 256) -> torch.Tensor:
    """Up to ``max_tokens`` L2-normalized float32 patch tokens (M, D) sampled from the features.

    Works on large, memory-mapped fp16 galleries: when there are more tokens than wanted, it
    reads a seeded random subset of images (sorted, in chunks) and keeps a seeded random subset
    of the tokens of each (at least 16, more when there are few images).
    """
    tokens = features.tokens
    n, t, _ = tokens.shape
    g = torch.Generator().manual_seed(seed)
    if n * t <= max_tokens:
        images, per_image = torch.arange(n), t
    else:
        per_image = min(t, max(16, math.ceil(max_tokens / n)))
        m = min(n, math.ceil(max_tokens / per_image))
        images = torch.randperm(n, generator=g)[:m].sort().values
    out = []
    for start in range(0, len(images), chunk):
        idx = images[start : start + chunk]
        block = l2norm(as_float(tokens[idx.to(tokens.device)]))
        if per_image < t:
            keep = torch.rand(len(idx), t, generator=g).argsort(dim=1)[:, :per_image]
            block = gather_tokens(block, keep.to(block.device))
        out.append(block.reshape(-1, block.shape[-1]))
    sample = torch.cat(out)
    if len(sample) > max_tokens:
        sample = sample[torch.randperm(len(sample), generator=g)[:max_tokens].to(sample.device)]
    return sample


def global_kmeans(points: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """K-means of (M, D) points, seeded init from K distinct points -> (K, D) centroids."""
    if k > len(points):
        raise ConfigError(
            f"cannot learn {k} centroids from {len(points)} gallery tokens; use a smaller k "
            "or a larger gallery."
        )
    g = torch.Generator().manual_seed(seed)
    init = points[torch.randperm(len(points), generator=g)[:k].to(points.device)]
    return lloyd(points.unsqueeze(0), init.unsqueeze(0), iters)[0]


class KMeansAggregator:
    """Per-image K-means (Lloyd, seeded init), centroids as tokens (L2-normalized)."""

    name = "kmeans"

    def __init__(self, k: int = 32, iters: int = 20, seed: int = 0) -> None:
        self.k = check_k_positive(k)
        if iters < 1:
            raise ValueError(f"iters must be at least 1, got {iters}. The study uses 20.")
        self.iters = iters
        self.seed = int(seed)

    def centroids(self, features: Features) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit tokens (N, T, D) and their raw K-means centroids (N, K, D)."""
        x = l2norm(as_float(features.tokens))
        n, t, _ = x.shape
        check_k_tokens(self.k, t, f"aggregator {self.name!r}")
        init = top_k_indices(random_keys(self.seed, features.cls, t).to(x.device), self.k)
        return x, lloyd(x, gather_tokens(x, init), self.iters)

    def __call__(self, features: Features) -> Tokens:
        return Tokens(l2norm(self.centroids(features)[1]))


class MedoidAggregator(KMeansAggregator):
    """Per-image K-means, then the real token nearest each centroid (L2-normalized)."""

    name = "medoids"

    def __call__(self, features: Features) -> Tokens:
        x, c = self.centroids(features)
        dist = (x * x).sum(-1).unsqueeze(-1) - 2.0 * torch.bmm(x, c.transpose(1, 2))  # (N,T,K)
        return Tokens(gather_tokens(x, dist.argmin(dim=1)))


class _GalleryCentroids:
    """Global centroids learned on gallery tokens by ``fit`` (sampled, chunked, float32)."""

    def __init__(self, clusters: int, iters: int, fit_tokens: int, seed: int) -> None:
        self.clusters = check_k_positive(clusters)
        if fit_tokens < clusters:
            raise ValueError(f"fit_tokens={fit_tokens} must be at least the cluster count.")
        self.iters = iters
        self.fit_tokens = fit_tokens
        self.seed = seed
        self.centers: torch.Tensor | None = None

    def fit_centroids(self, features: Features) -> None:
        points = sample_tokens(features, self.fit_tokens, self.seed)
        self.centers = global_kmeans(points, self.clusters, self.iters, self.seed)

    def centers_on(self, device: torch.device) -> torch.Tensor:
        if self.centers is None:
            raise RuntimeError(
                f"{type(self).__name__} learns global centroids from the gallery: call "
                "fit(gallery_features) before using it."
            )
        if self.centers.device != device:
            self.centers = self.centers.to(device)
        return self.centers


class VLADAggregator(_GalleryCentroids):
    """VLAD: K intra-normalized residuals to global gallery centroids, one token per centroid."""

    def __init__(
        self, k: int = 32, iters: int = 20, fit_tokens: int = 100_000, seed: int = 0
    ) -> None:
        super().__init__(k, iters, fit_tokens, seed)
        self.k = self.clusters

    def fit(self, features: Features) -> None:
        """Learn the K global centroids (K-means on sampled gallery tokens)."""
        self.fit_centroids(features)

    def __call__(self, features: Features) -> Tokens:
        x = l2norm(as_float(features.tokens))
        c = self.centers_on(x.device)
        cb = c.unsqueeze(0).expand(len(x), -1, -1)
        sums, counts = cluster_sums(x, nearest_centroid(x, cb), len(c))
        residual = l2norm(sums - counts.unsqueeze(-1) * cb)
        present = counts > 0
        # Padding for centroids the image has no token in: the unit centroid direction (kept
        # unit-norm for quantizers), flagged False in the mask so matchers ignore it.
        vectors = torch.where(present.unsqueeze(-1), residual, l2norm(cb))
        return Tokens(vectors, mask=present)


class NetVLADPooling(_GalleryCentroids):
    """NetVLAD-style soft VLAD over gallery centroids, PCA-whitened to one D-dim vector.

    ``fit`` learns the centroids (K-means on sampled gallery tokens) and then the PCA-whitening
    on the soft-VLAD vectors of up to ``fit_images`` gallery images. When fewer than D
    components carry variance (a tiny gallery), the remaining output dimensions are zero.
    """

    def __init__(
        self,
        clusters: int = 16,
        temperature: float = 0.1,
        iters: int = 20,
        fit_tokens: int = 100_000,
        fit_images: int = 2_000,
        whiten: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(clusters, iters, fit_tokens, seed)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}. Try 0.1.")
        self.temperature = float(temperature)
        self.fit_images = fit_images
        self.whiten = whiten
        self.mean: torch.Tensor | None = None
        self.projection: torch.Tensor | None = None  # (D, K*D): whitened components as rows

    def soft_vlad(self, features: Features) -> torch.Tensor:
        """(N, K*D) L2-normalized soft VLAD vectors (before PCA)."""
        x = l2norm(as_float(features.tokens))
        c = self.centers_on(x.device)
        dist = (x * x).sum(-1, keepdim=True) - 2.0 * x @ c.T + (c * c).sum(-1)  # (N, T, K)
        a = torch.softmax(-dist / self.temperature, dim=-1)
        residual = torch.bmm(a.transpose(1, 2), x) - a.sum(dim=1).unsqueeze(-1) * c
        return l2norm(l2norm(residual).flatten(1))

    def fit(self, features: Features) -> None:
        """Learn centroids, then PCA(-whitening) on gallery soft-VLAD vectors."""
        self.fit_centroids(features)
        n, _, d = features.tokens.shape
        g = torch.Generator().manual_seed(self.seed)
        images = torch.randperm(n, generator=g)[: self.fit_images].sort().values
        vlad = torch.cat(
            [
                self.soft_vlad(features[images[s : s + 256].to(features.tokens.device)])
                for s in range(0, len(images), 256)
            ]
        ).double()
        self.mean = vlad.mean(dim=0)
        xc = vlad - self.mean
        if len(xc) <= xc.shape[1]:  # fewer samples than dims: eigen-decompose the Gram matrix
            evals, u = torch.linalg.eigh(xc @ xc.T)
            evals, u = evals.flip(0), u.flip(1)
            keep = evals > evals[0].clamp_min(1e-30) * 1e-9
            evals, u = evals[keep], u[:, keep]
            comps = (xc.T @ u / evals.sqrt()).T  # unit principal directions (r, K*D)
        else:
            evals, v = torch.linalg.eigh(xc.T @ xc)
            evals, v = evals.flip(0), v.flip(1)
            keep = evals > evals[0].clamp_min(1e-30) * 1e-9
            evals, comps = evals[keep], v[:, keep].T
        r = min(d, len(evals))
        comps, var = comps[:r], evals[:r] / max(len(xc) - 1, 1)
        if self.whiten:
            comps = comps / var.sqrt().unsqueeze(1)
        projection = torch.zeros(d, comps.shape[1], dtype=torch.float64, device=comps.device)
        projection[:r] = comps
        self.mean, self.projection = self.mean.float(), projection.float()

    def __call__(self, features: Features) -> torch.Tensor:
        if self.projection is None or self.mean is None:
            raise RuntimeError("NetVLADPooling: call fit(gallery_features) before pooling.")
        v = self.soft_vlad(features)
        if self.projection.device != v.device:
            self.projection, self.mean = self.projection.to(v.device), self.mean.to(v.device)
        return l2norm((v - self.mean) @ self.projection.T)
