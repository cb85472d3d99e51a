"""Late interaction, the math: pure reference functions, written to be read.

The study's score of a query token set q against a gallery token set g (ColBERT-style)::

    s(q, g) = (1 / |Q|) * sum_{i in Q} max_{j in G} <q_i, g_j>

where Q and G are the *real* tokens of each side (``Tokens.mask``; padding is ignored). A query
with no real token scores 0 everywhere; a gallery item with no real token scores ``-inf``.

These functions materialize the whole (Nq, Ng, Kq, Kg) similarity tensor: use them for
small inputs and as the reference the fast engines are tested against
(:mod:`craterlab.retrieval.cpu_engine`, :mod:`craterlab.retrieval.gather_engine`). The two
helpers :func:`masked_max` and :func:`masked_mean` are the building blocks every engine shares.
"""

from __future__ import annotations

import torch

from craterlab.types import Tokens


def masked_max(sim: torch.Tensor, gmask: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Max of ``sim`` over the gallery-token axis ``dim``; padding tokens (``gmask`` False,
    broadcastable to ``sim``) count as ``-inf``, so an item with no real token gives ``-inf``."""
    if gmask is not None:
        sim = sim.masked_fill(~gmask, float("-inf"))
    return sim.amax(dim=dim)


def masked_mean(maxsim: torch.Tensor, qmask: torch.Tensor | None) -> torch.Tensor:
    """(..., Kq) per-query-token maxima -> (...) mean over the real query tokens (``qmask``,
    broadcastable to ``maxsim``); a query with no real token scores 0."""
    if qmask is None:
        return maxsim.mean(dim=-1)
    qm = qmask.to(maxsim.device)
    total = torch.where(qm, maxsim, torch.zeros((), dtype=maxsim.dtype, device=maxsim.device))
    count = qm.sum(dim=-1).clamp(min=1).to(maxsim.dtype)
    return total.sum(dim=-1) / count


def late_interaction(queries: Tokens, gallery: Tokens) -> torch.Tensor:
    """(Nq, Ng) late-interaction scores of every query against every gallery item."""
    q, g = queries.vectors, gallery.vectors.to(queries.vectors.dtype)
    sim = torch.einsum("aid,bjd->abij", q, g)  # (Nq, Ng, Kq, Kg)
    gmask = None if gallery.mask is None else gallery.mask[None, :, None, :]
    maxsim = masked_max(sim, gmask, dim=-1)  # (Nq, Ng, Kq)
    qmask = None if queries.mask is None else queries.mask[:, None, :]
    return masked_mean(maxsim, qmask)


def late_interaction_pairs(
    queries: Tokens, gallery: Tokens, candidates: torch.Tensor
) -> torch.Tensor:
    """(Nq, S) scores of each query against its own candidate gallery rows (Nq, S); a
    candidate index of -1 means "no candidate" and scores ``-inf``."""
    cand = candidates.long()
    rows = cand.clamp(min=0)
    g = gallery.vectors[rows].to(queries.vectors.dtype)  # (Nq, S, Kg, D)
    sim = torch.einsum("aid,asjd->asij", queries.vectors, g)  # (Nq, S, Kq, Kg)
    gmask = None if gallery.mask is None else gallery.mask[rows][:, :, None, :]
    maxsim = masked_max(sim, gmask, dim=-1)  # (Nq, S, Kq)
    qmask = None if queries.mask is None else queries.mask[:, None, :]
    return masked_mean(maxsim, qmask).masked_fill(cand < 0, float("-inf"))
