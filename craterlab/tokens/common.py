"""Shared helpers of the token methods: normalization, K checks, attention checks, gathers.

Every token method works on a float32 view of the features on whatever device they live on,
fully vectorized over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from craterlab.errors import ConfigError
from craterlab.types import Features

# Selectors that work without CLS->patch attention (CNN backbones); named in error messages.
NO_ATTENTION_SELECTORS = ("norm", "random", "grid", "cls_similarity", "cls_distance", "all")


def l2norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """L2-normalize along ``dim`` (zero vectors stay zero)."""
    return F.normalize(x, dim=dim, eps=1e-12)


def as_float(x: torch.Tensor) -> torch.Tensor:
    """The tensor as float32 (a no-op when it already is)."""
    return x if x.dtype == torch.float32 else x.float()


def check_k_positive(k: int) -> int:
    """Build-time check of a K knob (the token count is only known at call time)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}. Set k=1..T (T patch tokens per image).")
    return k


def check_k_tokens(k: int, num_tokens: int, what: str) -> None:
    """Call-time check: K may not exceed the number of patch tokens."""
    if k > num_tokens:
        raise ConfigError(
            f"{what}: k={k} is larger than the number of patch tokens per image ({num_tokens}). "
            f"Choose k between 1 and {num_tokens} (e.g. k={num_tokens} keeps every token), or "
            "use a backbone/resolution with more patches."
        )


def require_attention(features: Features, what: str) -> torch.Tensor:
    """The (N, T) CLS->patch attention as float32, or a clear error when the backbone has none."""
    if features.attn is None:
        raise ConfigError(
            f"{what} needs the backbone's CLS->patch attention, but these features have none "
            "(CNN backbones have no attention). Use a ViT backbone, or a method that works "
            f"without attention: selector={' | '.join(NO_ATTENTION_SELECTORS)}, or instance "
            "tokens seeded by farthest-point sampling (aggregator=instance aggregator.seeds=fps, "
            "or pooling.seeds=fps for pooling=instance_mean/instance_max)."
        )
    return as_float(features.attn)


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens (N, T, D), index (N, K) -> (N, K, D)."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N, T) scores -> (N, K) indices of the K largest, in descending score order."""
    return torch.topk(scores, k, dim=1, largest=True, sorted=True).indices


# ---------------------------------------------------------------------- seeded random keys

_MASK32 = 0xFFFFFFFF


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def image_hash(vectors: torch.Tensor) -> torch.Tensor:
    """(N, D) float vectors (e.g. the CLS tokens) -> (N,) int64 32-bit hashes of their bits.

    Integer sums are exact and order-free, so the hash is the same on CPU and CUDA and in any
    batch. Images with bit-identical vectors get the same hash.
    """
    bits = as_float(vectors).contiguous().view(torch.int32).to(torch.int64) & _MASK32
    d = bits.shape[-1]
    mult = _fmix32(torch.arange(1, d + 1, device=bits.device, dtype=torch.int64)) | 1
    return _fmix32((bits * mult).sum(dim=-1) & _MASK32)


def random_keys(seed: int, vectors: torch.Tensor, t: int) -> torch.Tensor:
    """(N, t) distinct int64 pseudo-random keys per image, seeded.

    Key (i, j) depends only on (seed, the bits of image i's ``vectors`` row, j), so an image
    gets the same draw whatever the batch it comes in, however often it is processed, and on
    CPU or CUDA; the top-k of a row is a uniform random k-subset. The token index j is folded
    into the low bits, so keys within a row are distinct.
    """
    img = image_hash(vectors).unsqueeze(1)
    tok = torch.arange(t, device=img.device, dtype=torch.int64).unsqueeze(0)
    x = _fmix32((img ^ (int(seed) & _MASK32)) & _MASK32)
    x = _fmix32((x ^ ((tok * 0x9E3779B1) & _MASK32)) & _MASK32)
    x = _fmix32((x + img) & _MASK32)
    return x * 65536 + tok
