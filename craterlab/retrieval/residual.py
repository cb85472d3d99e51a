"""ColBERTv2 residual compression of token stores.

Each token is stored as the id of its nearest centroid (k-means over gallery tokens, cosine)
plus its residual (token - centroid) quantized to ``nbits`` (1 or 2) bits per dimension:
every residual coordinate falls in one of 2**nbits buckets cut at quantiles of the training
residuals, and decodes to that bucket's median value (Santhanam et al., ColBERTv2, 2022).
Decoding (on the fly, per gathered row) is ``normalize(centroid[id] + weights[bucket])``.

Bytes per token: 4 (int32 centroid id) + D * nbits / 8; at K=32, D=384: 3,200 B per image
with 2 bits, 1,664 B with 1 bit. The centroids, cutoffs and bucket weights are per-gallery
constants (``overhead``). The centroid ids double as a token-level inverted file: the
``token_ivf`` stage reads them instead of training its own lists
(:mod:`craterlab.retrieval.token_ivf`).

A codec trained on other features would code the gallery with large residuals it cannot
represent, silently degrading the ranking: :meth:`ResidualQuantizer.encode` measures the mean
squared residual of what it encodes against what it saw in training and refuses (naming the
ratio) when it is more than ``max_residual_ratio`` times larger.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch

from craterlab.errors import ConfigError, DataError
from craterlab.retrieval.stores import CodeStore
from craterlab.types import Tokens


def pack_bits(buckets: torch.Tensor, nbits: int) -> torch.Tensor:
    """(…, D) bucket indices < 2**nbits -> (…, D * nbits / 8) uint8, first value highest."""
    per = 8 // nbits
    shifts = (per - 1 - torch.arange(per)) * nbits
    b = buckets.to(torch.int32).reshape(*buckets.shape[:-1], -1, per)
    return (b << shifts).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, nbits: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: (…, B) uint8 -> (…, B * 8 / nbits) long indices."""
    per = 8 // nbits
    shifts = ((per - 1 - torch.arange(per, device=packed.device)) * nbits).to(torch.int32)
    vals = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << nbits) - 1)
    return vals.reshape(*packed.shape[:-1], -1).long()


def assign(vectors: np.ndarray, centroids: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Nearest centroid (max inner product) of each row, in chunks; int32."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    out = np.empty(len(vectors), dtype=np.int32)
    for s in range(0, len(vectors), chunk):
        x = np.ascontiguousarray(vectors[s : s + chunk], dtype=np.float32)
        out[s : s + len(x)] = index.search(x, 1)[1][:, 0]
    return out


class ResidualStore(CodeStore):
    """Centroid id (N, K) int32 + bit-packed residual buckets (N, K, D*nbits/8) uint8;
    ``overhead``: centroids (C, D), bucket cutoffs and weights. Decoded on the fly."""

    format = "residual"

    def __init__(self, *args: Any, nbits: int = 2, train_mse: float = 0.0, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.nbits = nbits
        self.train_mse = train_mse

    def settings(self) -> dict[str, Any]:
        return {"nbits": self.nbits, "train_mse": self.train_mse}

    def restore_settings(self, meta: dict[str, Any]) -> None:
        self.nbits = int(meta["nbits"])
        self.train_mse = float(meta.get("train_mse", 0.0))

    @property
    def centroids(self) -> torch.Tensor:
        return self.overhead["centroids"]

    @property
    def codes(self) -> torch.Tensor:
        """(N, K) centroid id of every token (padding included; see ``mask``)."""
        return self.payload["codes"]

    def decode_rows(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        codes = rows["codes"].long()
        buckets = unpack_bits(rows["residuals"], self.nbits)
        weights = self.overhead["weights"].to(buckets.device)
        vec = self.centroids.index_select(0, codes.reshape(-1)).view(*codes.shape, -1)
        vec = vec + weights[buckets]
        return torch.nn.functional.normalize(vec, dim=-1)


class ResidualQuantizer:
    """Train centroids and residual buckets on gallery tokens, then encode token sets.

    ``nbits``: residual bits per dimension (1 or 2). ``centroids``: k-means centroids (0:
    chosen from the token count as 2**floor(log2(4 * sqrt(tokens))), PLAID's rule scaled
    down for CPU training). ``sample``: at most this many training tokens. ``iters``: k-means
    iterations. ``max_residual_ratio``: refuse to encode tokens whose mean squared residual is
    this many times the training one (a codec trained on other features).
    """

    def __init__(
        self,
        nbits: int = 2,
        centroids: int = 0,
        sample: int = 100_000,
        iters: int = 10,
        max_residual_ratio: float = 1.5,
        seed: int = 0,
    ) -> None:
        if nbits not in (1, 2):
            raise ValueError(f"nbits must be 1 or 2 (bits per residual dimension), got {nbits}")
        if centroids < 0 or sample < 1 or iters < 1:
            raise ValueError("centroids must be >= 0 (0: automatic), sample and iters >= 1")
        self.nbits = nbits
        self.n_centroids = centroids
        self.sample = sample
        self.iters = iters
        self.max_residual_ratio = max_residual_ratio
        self.seed = seed
        self.centroids: torch.Tensor | None = None
        self.cutoffs: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self.train_mse = 0.0

    def fit(self, tokens: Tokens) -> None:
        """k-means on a sample of the real tokens, then bucket cutoffs (quantiles of the
        residual coordinates) and bucket weights (their midpoints' quantiles)."""
        flat = _real_tokens(tokens)
        rng = np.random.default_rng(self.seed)
        if len(flat) > self.sample:
            flat = flat[np.sort(rng.choice(len(flat), self.sample, replace=False))]
        n_cent = self.n_centroids or 2 ** int(np.floor(np.log2(4 * np.sqrt(len(flat)))))
        if len(flat) < n_cent:
            raise ConfigError(
                f"The residual codec has {n_cent} centroids but only {len(flat)} training "
                "tokens: every centroid needs tokens to be trained. Fit on more tokens or set "
                f"quantizer.centroids <= {len(flat)} (0 picks it from the token count)."
            )
        d = flat.shape[1]
        km = faiss.Kmeans(d, n_cent, niter=self.iters, seed=self.seed, spherical=True)
        km.train(np.ascontiguousarray(flat, dtype=np.float32))
        cent = km.centroids.astype(np.float32)
        resid = flat - cent[assign(flat, cent)]
        nb = 2**self.nbits
        values = torch.from_numpy(resid.reshape(-1))
        qs = torch.arange(1, nb, dtype=torch.float64) / nb
        mids = (torch.arange(nb, dtype=torch.float64) + 0.5) / nb
        if values.numel() > 2**24:  # torch.quantile's input limit
            values = values[torch.randperm(values.numel(), generator=_gen(self.seed))[: 2**24]]
        self.cutoffs = torch.quantile(values.double(), qs).float()
        self.weights = torch.quantile(values.double(), mids).float()
        self.centroids = torch.from_numpy(cent)
        self.train_mse = float((resid**2).sum(1).mean())

    def encode(self, tokens: Tokens) -> ResidualStore:
        if self.centroids is None or self.cutoffs is None or self.weights is None:
            raise ConfigError("The residual quantizer must be fit on gallery tokens first.")
        x = tokens.vectors.float()
        n, k, d = x.shape
        if d != self.centroids.shape[1]:
            raise DataError(
                f"Tokens of dimension {d} cannot be coded by a residual codec trained on "
                f"{self.centroids.shape[1]}-dimensional tokens: fit the quantizer on these "
                "features (same backbone and aggregator) first."
            )
        if d * self.nbits % 8:
            raise DataError(f"D * nbits must be a multiple of 8 to pack residuals; D={d}.")
        flat = x.reshape(n * k, d).numpy()
        codes = torch.from_numpy(assign(flat, self.centroids.numpy())).view(n, k)
        resid = x - self.centroids[codes.long()]
        real = torch.ones(n, k, dtype=torch.bool) if tokens.mask is None else tokens.mask.bool()
        mse = float((resid[real] ** 2).sum(-1).mean()) if real.any() else 0.0
        if self.train_mse > 0 and mse > self.max_residual_ratio * self.train_mse:
            raise DataError(
                f"These tokens' mean squared residual to the codec's centroids is {mse:.4f}, "
                f"{mse / self.train_mse:.1f}x the {self.train_mse:.4f} of its training tokens "
                f"(limit {self.max_residual_ratio}x): the codec was trained on other features, "
                "so its buckets cannot represent them and rankings would silently degrade. "
                "Fit the quantizer on these features (the gallery's own tokens)."
            )
        buckets = torch.bucketize(resid, self.cutoffs)
        payload = {"codes": codes.to(torch.int32), "residuals": pack_bits(buckets, self.nbits)}
        overhead = {"centroids": self.centroids, "cutoffs": self.cutoffs, "weights": self.weights}
        return ResidualStore(
            payload,
            k,
            d,
            tokens.mask,
            overhead,
            nbits=self.nbits,
            train_mse=self.train_mse,
        )


def _real_tokens(tokens: Tokens) -> np.ndarray:
    x = tokens.vectors.float()
    flat = x.reshape(-1, x.shape[-1])
    if tokens.mask is not None:
        flat = flat[tokens.mask.reshape(-1).bool()]
    return flat.numpy()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
