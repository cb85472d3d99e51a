"""The gather engine: late interaction over gallery rows gathered (decoded) on demand, with
plain torch ops on any device (CPU or CUDA).

This is the engine for CUDA (fp16 matmuls, codes resident on the GPU) and for stores whose
codes are not a matmul operand (PQ, or INT8 asked to decode): a ``gather`` function turns
gallery row indices into float tokens, so the whole gallery is never materialized in float.
The math is :mod:`craterlab.retrieval.late_interaction`'s, tiled *gallery-major*: a tile of
gallery tokens forms the rows of one matmul against a chunk of query tokens, and the max runs
over the gallery-token axis, so memory stays near ``tile_bytes`` at any gallery size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from craterlab.devices import compute_dtype
from craterlab.retrieval.late_interaction import masked_max, masked_mean
from craterlab.types import Tokens

GatherFn = Callable[[torch.Tensor], Tokens]
"""Gallery rows (1-D long indices) -> their tokens (decoded), on any device."""

DEFAULT_TILE_BYTES = 64 * 2**20


def tokens_gather(gallery: Tokens) -> GatherFn:
    """A gather function over plain tokens (rows selected on the tokens' device)."""

    def gather(index: torch.Tensor) -> Tokens:
        index = index.to(gallery.vectors.device)
        return Tokens(
            gallery.vectors.index_select(0, index),
            None if gallery.mask is None else gallery.mask.index_select(0, index),
        )

    return gather


def score(
    queries: Tokens,
    num_gallery: int,
    gather: GatherFn,
    device: torch.device,
    tile_bytes: int = DEFAULT_TILE_BYTES,
) -> torch.Tensor:
    """(Nq, Ng) scores of every query against all ``num_gallery`` rows; result on CPU.

    Tile sizes keep the (Gt*Kg, Qc*Kq) similarity block within ``tile_bytes``, with at least
    ~64 gallery images per tile so each matmul is large enough to run near peak.
    """
    dt = compute_dtype(device)
    q = queries.vectors.to(device, dt)
    nq, kq, d = q.shape
    qmask = None if queries.mask is None else queries.mask.to(device)
    out = torch.empty(nq, num_gallery, dtype=torch.float32, device=device)
    if nq == 0 or num_gallery == 0:
        return out.cpu()
    kg = gather(torch.arange(1)).vectors.shape[1]
    elem = torch.finfo(dt).bits // 8
    q_chunk = max(1, min(nq, tile_bytes // max(1, elem * kq * kg * 64)))
    g_tile = max(1, min(num_gallery, tile_bytes // max(1, elem * kg * q_chunk * kq)))
    qflat = q.reshape(nq * kq, d)
    for g0 in range(0, num_gallery, g_tile):
        idx = torch.arange(g0, min(g0 + g_tile, num_gallery))
        tile = gather(idx)
        gt = len(idx)
        gv = tile.vectors.to(device, dt).reshape(gt * kg, d)
        gm = None if tile.mask is None else tile.mask.to(device).reshape(gt, kg, 1)
        for q0 in range(0, nq, q_chunk):
            q1 = min(q0 + q_chunk, nq)
            sim = gv @ qflat[q0 * kq : q1 * kq].T  # (Gt*Kg, Qc*Kq), gallery tokens as rows
            mx = masked_max(sim.view(gt, kg, (q1 - q0) * kq), gm, dim=1)  # (Gt, Qc*Kq)
            mx = mx.view(gt, q1 - q0, kq).float()
            s = masked_mean(mx, None if qmask is None else qmask[q0:q1].unsqueeze(0))
            out[q0:q1, g0 : g0 + gt] = s.T
    return out.cpu()


def rerank(
    queries: Tokens,
    candidates: torch.Tensor,
    gather: GatherFn,
    device: torch.device,
    chunk_bytes: int = 32 * 2**20,
) -> torch.Tensor:
    """(Nq, S) scores of each query against its own candidates (Nq, S); -1 scores ``-inf``.

    The candidates of a chunk of queries are gathered (decoded) into one block, sized near
    ``chunk_bytes``, and scored with one batched matmul.
    """
    dt = compute_dtype(device)
    nq, s = candidates.shape
    out = torch.full((nq, s), float("-inf"), dtype=torch.float32)
    if nq == 0 or s == 0:
        return out
    q = queries.vectors.to(device, dt)
    kq, d = q.shape[1:]
    qmask = None if queries.mask is None else queries.mask.to(device)
    cand = candidates.to(torch.long)
    valid = cand >= 0
    kg = gather(torch.zeros(1, dtype=torch.long)).vectors.shape[1]
    per_query = s * kg * d * (torch.finfo(dt).bits // 8)
    chunk = max(1, min(nq, chunk_bytes // max(1, per_query)))
    for q0 in range(0, nq, chunk):
        q1 = min(q0 + chunk, nq)
        c = cand[q0:q1].clamp(min=0).reshape(-1)
        tok = gather(c)
        g = tok.vectors.to(device, dt).view(q1 - q0, s * kg, d)
        sim = torch.bmm(g, q[q0:q1].transpose(1, 2))  # (Qc, S*Kg, Kq)
        gm = None if tok.mask is None else tok.mask.to(device).view(q1 - q0, s, kg, 1)
        mx = masked_max(sim.view(q1 - q0, s, kg, kq), gm, dim=2).float()  # (Qc, S, Kq)
        out[q0:q1] = masked_mean(mx, None if qmask is None else qmask[q0:q1].unsqueeze(1)).cpu()
    return out.masked_fill_(~valid, float("-inf"))
