"""Token sketches: a cheap approximate late interaction for the token IVF's staged pruning.

PLAID does not send its centroid-score candidates straight to the exact scorer: it keeps the
best few hundred, scores those again with an approximation that sees each token's own
position (its centroid plus its compressed residual), and only then scores the best few
exactly. The list score cannot see inside a centroid: two images whose tokens fall in the same
lists tie, whatever their tokens' distance to the query's. A sketch restores that resolution
at a fraction of the exact rerank's cost:

- every gallery token is projected to ``dims`` dimensions by the top eigenvectors of the
  tokens' second-moment matrix (the directions that keep most of the inner products'
  energy, fitted on the k-means sample), and stored as int8 codes with one scale per token
  (``dims + 4`` bytes per token; the exact store holds 384 + 4 at D=384 in int8);
- a query's tokens are projected the same way and each candidate is scored by late
  interaction in the projected space, ``(1/Kq) sum_i max_j <P q_i, s_j g_j>``, on the fused
  int8 VNNI kernel the exact rerank uses (:mod:`.fused`; a torch computation where that
  kernel does not run).

The score only reorders the list score's top ``refine`` candidates; the exact rerank still
reads the top S of the result from the store.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from craterlab.errors import ConfigError, DataError
from craterlab.retrieval import fused
from craterlab.retrieval.cpu_engine import run_blocks
from craterlab.retrieval.late_interaction import late_interaction_pairs
from craterlab.retrieval.quantizers import quantize_int8
from craterlab.types import Tokens

INLINE = functools.partial(run_blocks, workers=1)
"""Runs the kernel's work items on the calling thread (the token IVF's queries already run in
parallel on the engine's workers)."""


def fit_projection(sample: np.ndarray, dims: int) -> torch.Tensor:
    """(D, dims) orthonormal columns: the top eigenvectors of the (uncentered) second-moment
    matrix of the (T, D) ``sample`` tokens, which best preserve their inner products."""
    d = sample.shape[1]
    if not 1 <= dims <= d:
        raise ConfigError(
            f"token_ivf refine_dims={dims} does not fit {d}-dimensional tokens: use "
            f"1 <= refine_dims <= {d} (a multiple of 4 runs on the fused int8 kernel)."
        )
    x = torch.from_numpy(np.ascontiguousarray(sample, np.float32)).double()
    _, vecs = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
    return vecs[:, -dims:].flip(1).float().contiguous()


class TokenSketch:
    """Projected int8 codes (N, K, dims) with per-token scales (N, K) of a gallery's tokens."""

    def __init__(
        self,
        projection: torch.Tensor,
        codes: torch.Tensor,
        scales: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> None:
        if codes.dim() != 3 or codes.shape[-1] != projection.shape[1]:
            raise ValueError(
                f"sketch codes {tuple(codes.shape)} do not match a projection to "
                f"{projection.shape[1]} dimensions"
            )
        if tuple(scales.shape) != tuple(codes.shape[:2]):
            raise ValueError(f"sketch scales {tuple(scales.shape)} for codes {tuple(codes.shape)}")
        self.projection = projection.float().contiguous()
        self.codes = codes
        self.scales = scales.float()
        self.mask = None if mask is None else mask.bool()

    @property
    def dims(self) -> int:
        return int(self.projection.shape[1])

    @property
    def nbytes(self) -> int:
        """Per-gallery bytes: int8 codes and float32 scales (the mask is the store's)."""
        return int(self.codes.numel() + self.scales.numel() * 4)

    @property
    def overhead_bytes(self) -> int:
        return int(self.projection.numel() * 4)

    def score(self, query: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows),) approximate late interaction of one query's real tokens (Kq, D)
        with the sketched gallery rows."""
        if query.shape[-1] != self.projection.shape[0]:
            raise DataError(
                f"Query tokens of dimension {query.shape[-1]} cannot be scored by a sketch of "
                f"{self.projection.shape[0]}-dimensional gallery tokens."
            )
        if len(rows) == 0:
            return torch.empty(0)
        qp = (query.float() @ self.projection).unsqueeze(0)  # (1, Kq, dims)
        cand = rows.long().unsqueeze(0)
        if fused.supports("int8", self.codes, self.scales):
            return fused.rerank(
                "int8", qp, None, self.codes, self.scales, self.mask, cand, INLINE, 1
            )[0]
        g = self.codes[rows].float() * self.scales[rows].unsqueeze(-1)
        gm = None if self.mask is None else self.mask[rows]
        local = torch.arange(len(rows)).unsqueeze(0)
        return late_interaction_pairs(Tokens(qp), Tokens(g, gm), local)[0]


def build_sketch(
    decode: Callable[[torch.Tensor], Tokens],
    n: int,
    projection: torch.Tensor,
    mask: torch.Tensor | None,
    chunk: int = 2048,
) -> TokenSketch:
    """Sketch every row of a store: ``decode(rows)`` gives its tokens, ``chunk`` rows at a
    time (a memory-mapped store is never decoded whole)."""
    parts_c, parts_s = [], []
    for a in range(0, n, chunk):
        t = decode(torch.arange(a, min(n, a + chunk)))
        codes, scales = quantize_int8(t.vectors.float() @ projection)
        parts_c.append(codes)
        parts_s.append(scales)
    return TokenSketch(projection, torch.cat(parts_c), torch.cat(parts_s), mask)
