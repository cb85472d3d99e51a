"""MUVERA fixed-dimensional encodings (FDE) of token sets.

An FDE turns a token set into one vector whose inner product approximates late interaction
(Dhulipala et al., MUVERA, 2024), so any single-vector ANN index can shortlist for the exact
rerank. Per repetition r (``repetitions`` of them, independent randomness):

1. SimHash: ``simhash_bits`` random Gaussian hyperplanes split the unit sphere into
   B = 2**simhash_bits partitions; a token's partition is its sign pattern.
2. Projection: each token is projected to ``projection_dim`` dims by a random +-1 matrix
   scaled by 1/sqrt(projection_dim) (identity when ``projection_dim`` is 0).
3. Asymmetric aggregation: a *query* block is the **sum** of its projected tokens in each
   partition; a *document* block is their **mean**, and an empty document partition is
   filled with the projected token whose sign pattern is nearest (Hamming) to it.

The blocks are concatenated (R * B * projection_dim dims) and, when ``final_dim`` > 0,
compressed by a count sketch (each coordinate added with a random sign into one of
``final_dim`` buckets). <FDE(q), FDE(d)> = sum_r sum_i <P q_i, mean of d's tokens in q_i's
partition>, an estimate of Kq * LI(q, d); the reference test recomputes it token by token.

Seeds make an encoder reproducible: queries must be encoded by the encoder (same settings,
same seed, same token dimension) that encoded the gallery; :meth:`FdeEncoder.identity` says
which, and an index built by one encoder refuses queries of another.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from craterlab.errors import ConfigError, DataError
from craterlab.types import Tokens


@dataclass(frozen=True)
class FdeSettings:
    """What defines an FDE: partitions, repetitions, projection, final sketch, seed."""

    simhash_bits: int = 4
    repetitions: int = 8
    projection_dim: int = 32
    final_dim: int = 0
    fill_empty: bool = True
    seed: int = 0

    def check(self) -> None:
        if not 0 <= self.simhash_bits <= 12:
            raise ConfigError(f"simhash_bits must be in 0..12, got {self.simhash_bits}")
        if self.repetitions < 1:
            raise ConfigError(f"repetitions must be >= 1, got {self.repetitions}")
        if self.projection_dim < 0 or self.final_dim < 0:
            raise ConfigError("projection_dim and final_dim must be >= 0 (0: none)")


class FdeEncoder:
    """Fixed-dimensional encodings of token sets of dimension ``dim`` (see the module doc)."""

    def __init__(self, dim: int, settings: FdeSettings | None = None) -> None:
        self.settings = settings or FdeSettings()
        self.settings.check()
        self.dim = dim
        s = self.settings
        g = torch.Generator().manual_seed(s.seed)
        self.partitions = 2**s.simhash_bits
        self.block_dim = s.projection_dim or dim
        r = s.repetitions
        self.hyperplanes = torch.randn(r, dim, s.simhash_bits, generator=g)
        if s.projection_dim:
            signs = torch.randint(0, 2, (r, dim, s.projection_dim), generator=g) * 2 - 1
            self.projection: torch.Tensor | None = signs.float() / s.projection_dim**0.5
        else:
            self.projection = None
        self.raw_dim = r * self.partitions * self.block_dim
        if s.final_dim:
            self.sketch_index = torch.randint(0, s.final_dim, (self.raw_dim,), generator=g)
            self.sketch_sign = (torch.randint(0, 2, (self.raw_dim,), generator=g) * 2 - 1).float()
        bits = torch.arange(self.partitions).unsqueeze(1) >> torch.arange(s.simhash_bits)
        self.partition_bits = (bits & 1).bool()  # (B, b): bit j of partition p

    @property
    def out_dim(self) -> int:
        return self.settings.final_dim or self.raw_dim

    def identity(self) -> dict[str, int | bool]:
        """Everything that must match between the gallery's and the queries' encoder."""
        return {**asdict(self.settings), "dim": self.dim}

    # -- encoding
    def partition_of(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(…, R) partition index and (…, R, b) sign bits of each token in each repetition."""
        r, d, b = self.hyperplanes.shape
        flat = vectors.reshape(-1, d) @ self.hyperplanes.permute(1, 0, 2).reshape(d, r * b)
        bits = (flat > 0).view(*vectors.shape[:-1], r, b)
        weights = 1 << torch.arange(b)
        return (bits.long() * weights).sum(-1), bits

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """(…, R, block_dim) projected tokens per repetition."""
        if self.projection is None:
            return vectors.unsqueeze(-2).expand(*vectors.shape[:-1], self.settings.repetitions, -1)
        r, d, p = self.projection.shape
        flat = vectors.reshape(-1, d) @ self.projection.permute(1, 0, 2).reshape(d, r * p)
        return flat.view(*vectors.shape[:-1], r, p)

    def encode(self, tokens: Tokens, kind: str) -> torch.Tensor:
        """(N, out_dim) float32 encodings; ``kind`` is ``query`` (sums) or ``document``
        (means, empty partitions filled)."""
        if kind not in ("query", "document"):
            raise ValueError(f"kind must be 'query' or 'document', got {kind!r}")
        x = tokens.vectors.float()
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise DataError(
                f"Token sets of shape {tuple(x.shape)} cannot be encoded by an FDE encoder of "
                f"{self.dim}-dimensional tokens: encode queries with the tokens (backbone, "
                "aggregator) that built the gallery's encodings."
            )
        n, k, _ = x.shape
        r, nb, p = self.settings.repetitions, self.partitions, self.block_dim
        mask = torch.ones(n, k, dtype=torch.bool) if tokens.mask is None else tokens.mask.bool()
        part, bits = self.partition_of(x)  # (n, k, R), (n, k, R, b)
        proj = self.project(x) * mask[:, :, None, None]  # (n, k, R, p), padding zeroed
        slot = part + torch.arange(r) * nb  # (n, k, R): block index within the FDE
        sums = torch.zeros(n, r * nb, p)
        sums.scatter_add_(1, slot.reshape(n, k * r, 1).expand(-1, -1, p), proj.reshape(n, k * r, p))
        if kind == "document":
            counts = torch.zeros(n, r * nb)
            ones = mask[:, :, None].expand(-1, -1, r).reshape(n, k * r).float()
            counts.scatter_add_(1, slot.reshape(n, k * r), ones)
            sums = sums / counts.clamp(min=1).unsqueeze(-1)
            if self.settings.fill_empty:
                sums = self._fill_empty(sums, counts, bits, proj, mask)
        out = sums.reshape(n, self.raw_dim)
        return self._sketch(out)

    def _fill_empty(
        self,
        sums: torch.Tensor,
        counts: torch.Tensor,
        bits: torch.Tensor,
        proj: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Empty document partitions take the projected token nearest in Hamming distance."""
        n, k, r, _ = bits.shape
        nb = self.partitions
        # (n, k, R, B): Hamming distance of each token's bits to each partition's bits
        dist = (bits.unsqueeze(3) != self.partition_bits.view(1, 1, 1, nb, -1)).sum(-1)
        dist = dist.masked_fill(~mask[:, :, None, None], 1 << 20)
        nearest = dist.argmin(dim=1)  # (n, R, B): token index (first on ties)
        fill = proj.permute(0, 2, 1, 3).gather(  # (n, R, k, p) -> (n, R, B, p)
            2, nearest.unsqueeze(-1).expand(-1, -1, -1, proj.shape[-1])
        )
        empty = (counts.view(n, r, nb) == 0) & mask.any(1)[:, None, None]
        blocks = sums.view(n, r, nb, -1)
        return torch.where(empty.unsqueeze(-1), fill, blocks).reshape(n, r * nb, -1)

    def _sketch(self, raw: torch.Tensor) -> torch.Tensor:
        if not self.settings.final_dim:
            return raw.contiguous()
        out = torch.zeros(len(raw), self.settings.final_dim)
        out.index_add_(1, self.sketch_index, raw * self.sketch_sign)
        return out

    def encode_chunks(self, tokens: Tokens, kind: str, chunk: int = 2048) -> torch.Tensor:
        """:meth:`encode` in chunks of images (bounded temporary memory)."""
        parts = [self.encode(tokens[i : i + chunk], kind) for i in range(0, len(tokens), chunk)]
        return torch.cat(parts) if parts else torch.empty(0, self.out_dim)
