"""Matchers: late interaction over token sets and cosine over single vectors.

Scoring functions are pure (tensors in, tensors out) and run unchanged on CPU and CUDA.

Late interaction (ColBERT-style, the study's definition)::

    s(q, g) = (1 / Kq) * sum_i max_j <q_i, g_j>

over the real tokens of each side (``Tokens.mask``; padded tokens are ignored). A query with
no real token scores 0 everywhere; a gallery item with no real token scores ``-inf``.

The exhaustive score is tiled *gallery-major*: a tile of gallery tokens forms the rows of one
matmul against a chunk of query tokens, and the max runs over the gallery-token axis, so memory
stays bounded (``tile_bytes``) at any gallery size. On CUDA the matmuls run in fp16.

On CPU, when the gallery is a plain tensor (fp32/fp16 tokens, or a store's payload), both
scores take a faster path (:func:`rerank_cpu`, :func:`score_cpu`): candidates are gathered into
a reused per-thread buffer, similarity blocks are sized to stay in the L2 cache, and independent
blocks run on ``workers`` threads that each run torch single-threaded (:func:`run_blocks`):
torch's own intra-op threading scales poorly on these small blocks, and combining both
oversubscribes the cores.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from craterlab.devices import resolve_device
from craterlab.hookspecs import hookimpl
from craterlab.types import Tokens

GatherFn = Callable[[torch.Tensor], Tokens]
"""Gallery rows (1-D long indices) -> their tokens (decoded), on the compute device."""

DEFAULT_TILE_BYTES = 64 * 2**20


def compute_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (tensor cores), fp32 on CPU (fp16/bf16 matmuls are slower there)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def _finish(maxsim: torch.Tensor, qmask: torch.Tensor | None) -> torch.Tensor:
    """(..., Kq) per-query-token maxima -> (...) masked mean over the query tokens."""
    if qmask is None:
        return maxsim.mean(dim=-1)
    qm = qmask.to(maxsim.device)  # broadcastable to maxsim
    total = torch.where(qm, maxsim, torch.zeros((), dtype=maxsim.dtype, device=maxsim.device))
    count = qm.sum(dim=-1).clamp(min=1).to(maxsim.dtype)
    return total.sum(dim=-1) / count


def _masked_max(sim: torch.Tensor, gmask: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Max over the gallery-token axis ``dim`` of ``sim``, padding tokens excluded (-inf)."""
    if gmask is not None:
        sim = sim.masked_fill(~gmask, float("-inf"))
    return sim.amax(dim=dim)


# --------------------------------------------------------------------------- CPU engine

CPU_CACHE_BYTES = 1 * 2**20
"""Target size of one similarity block on CPU (fits the L2 cache of one core)."""

_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_TLS = threading.local()


def resolve_workers(threads: int) -> int:
    """Worker threads for the CPU paths: ``threads``, or torch's intra-op count when 0."""
    return threads if threads > 0 else torch.get_num_threads()


def _pin_one_thread() -> None:
    """Make torch run single-threaded in this (worker) thread, once per thread."""
    if not getattr(_TLS, "pinned", False):
        torch.get_num_threads()  # triggers torch's lazy per-thread init before we override it
        torch.set_num_threads(1)
        _TLS.pinned = True


def run_blocks(fn: Callable[[int], None], nblocks: int, workers: int) -> None:
    """Call ``fn(b)`` for ``b`` in ``range(nblocks)`` on ``workers`` threads.

    Each worker runs torch ops with one intra-op thread, so two workers use two cores without
    oversubscription (nested OpenMP teams spinning on two cores made a 2-worker pool slower than
    one thread). The caller's torch thread setting is restored afterwards. ``workers <= 1`` runs
    inline with torch's own threading.
    """
    if workers <= 1 or nblocks <= 1:
        for b in range(nblocks):
            fn(b)
        return
    key = (os.getpid(), workers)  # a forked child must not reuse the parent's dead threads
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="craterlab-li")
    saved = torch.get_num_threads()

    def call(b: int) -> None:
        _pin_one_thread()
        fn(b)

    try:
        for f in [pool.submit(call, b) for b in range(nblocks)]:
            f.result()
    finally:
        torch.set_num_threads(saved)  # set_num_threads in a worker also moved the global default


def thread_buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch tensor reused across calls (reallocated when the size changes)."""
    buf = getattr(_TLS, name, None)
    numel = 1
    for n in shape:
        numel *= n
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        setattr(_TLS, name, buf)
    return buf[:numel].view(shape)


def gallery_bias(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(N, K) float: 0 for real gallery tokens, -inf for padding (added before the max)."""
    if mask is None:
        return None
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(mask.cpu(), zero, torch.tensor(float("-inf")))


def cpu_fast(queries: Tokens, gallery_vectors: torch.Tensor, device: torch.device) -> bool:
    """Whether the CPU fast paths apply: CPU compute, gallery a CPU float tensor (N, K, D)."""
    return (
        device.type == "cpu"
        and gallery_vectors.device.type == "cpu"
        and queries.vectors.device.type == "cpu"
        and gallery_vectors.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and gallery_vectors.dim() == 3
    )


def rerank_blocks(
    nq: int, s: int, candidate_bytes: int, block_bytes: int
) -> tuple[int, Callable[[int], tuple[int, int, int, int]]]:
    """Split a (Nq, S) rerank into blocks whose gathered candidates fit ``block_bytes``.

    A block is a few whole queries (S small) or a slice of one query's candidates (S large).
    Returns the block count and ``bounds(b) -> (q0, q1, c0, c1)``: queries q0:q1, candidates
    c0:c1 of block b.
    """
    per_query = s * candidate_bytes
    if per_query <= block_bytes:
        qb = max(1, min(nq, block_bytes // max(1, per_query)))

        def whole_queries(b: int) -> tuple[int, int, int, int]:
            return b * qb, min(nq, (b + 1) * qb), 0, s

        return (nq + qb - 1) // qb, whole_queries
    cs = max(1, block_bytes // candidate_bytes)
    nc = (s + cs - 1) // cs

    def candidate_slices(b: int) -> tuple[int, int, int, int]:
        q, c = divmod(b, nc)
        return q, q + 1, c * cs, min(s, (c + 1) * cs)

    return nq * nc, candidate_slices


def rerank_cpu(
    queries: Tokens,
    gallery: torch.Tensor,
    candidates: torch.Tensor,
    gmask: torch.Tensor | None = None,
    workers: int = 0,
    block_bytes: int = 4 * 2**20,
) -> torch.Tensor:
    """(Nq, S) late-interaction rerank on CPU with fp32 matmuls, gallery (N, K, D) float.

    Per block (a few queries, or a slice of one query's candidates, so the gathered tokens
    stay within ``block_bytes``): one ``index_select`` into a reused buffer, one batched matmul
    with gallery tokens as rows, max over the gallery-token axis. Blocks run on ``workers``
    single-threaded workers (0: torch's intra-op thread count).
    """
    nq, s = candidates.shape
    if nq == 0 or s == 0:
        return torch.full((nq, s), float("-inf"))
    n, k, d = gallery.shape
    flat = gallery.reshape(n, k * d)
    q = queries.vectors.float().contiguous()
    qt = q.transpose(1, 2)  # (Nq, D, Kq)
    kq = q.shape[1]
    qmask = queries.mask
    bias = gallery_bias(gmask)
    cand = candidates.to(torch.long)
    idx_all = cand.clamp(min=0)
    nblocks, bounds = rerank_blocks(nq, s, k * d * 4, block_bytes)
    mx = torch.empty(nq, s, kq)

    def block(b: int) -> None:
        q0, q1, c0, c1 = bounds(b)
        m, c = q1 - q0, c1 - c0
        idx = idx_all[q0:q1, c0:c1].reshape(-1)
        g = thread_buffer("rr_g", (m * c, k * d), flat.dtype)
        torch.index_select(flat, 0, idx, out=g)
        if flat.dtype != torch.float32:
            g = thread_buffer("rr_g32", (m * c, k * d), torch.float32).copy_(g)
        sim = thread_buffer("rr_sim", (m, c * k, kq), torch.float32)
        torch.bmm(g.view(m, c * k, d), qt[q0:q1], out=sim)
        sim4 = sim.view(m, c, k, kq)
        if bias is not None:
            sim4.add_(bias.index_select(0, idx).view(m, c, k, 1))
        torch.amax(sim4, dim=2, out=mx[q0:q1, c0:c1])

    run_blocks(block, nblocks, resolve_workers(workers))
    out = _finish(mx, None if qmask is None else qmask.cpu().unsqueeze(1))
    return out.masked_fill_(cand < 0, float("-inf"))


def score_cpu(
    queries: Tokens,
    gallery: torch.Tensor,
    gmask: torch.Tensor | None = None,
    workers: int = 0,
    cache_bytes: int = CPU_CACHE_BYTES,
) -> torch.Tensor:
    """(Nq, Ng) exhaustive late interaction on CPU, gallery (N, K, D) float, tiled for cache.

    Gallery tiles are contiguous slices (no copy for fp32); a tile's tokens are the rows of one
    matmul against a chunk of query tokens, and the (rows, columns) similarity block stays
    within ``cache_bytes``. Tiles of the gallery are split between ``workers``.
    """
    q = queries.vectors.float().contiguous()
    nq, kq, d = q.shape
    ng, k = gallery.shape[:2]
    out = torch.empty(nq, ng)
    if nq == 0 or ng == 0:
        return out
    qmask = queries.mask
    bias = gallery_bias(gmask)
    q_chunk, g_tile = _tiles(nq, kq, k, cache_bytes)
    qt = q.reshape(nq * kq, d).T  # (D, Nq*Kq)
    nt = (ng + g_tile - 1) // g_tile

    def tile(t: int) -> None:
        g0, g1 = t * g_tile, min(ng, (t + 1) * g_tile)
        gt = g1 - g0
        gv = gallery[g0:g1].reshape(gt * k, d)
        if gv.dtype != torch.float32:
            gv = thread_buffer("sc_g32", (gt * k, d), torch.float32).copy_(gv)
        for q0 in range(0, nq, q_chunk):
            q1 = min(nq, q0 + q_chunk)
            sim = thread_buffer("sc_sim", (gt * k, (q1 - q0) * kq), torch.float32)
            torch.mm(gv, qt[:, q0 * kq : q1 * kq], out=sim)
            sim3 = sim.view(gt, k, -1)
            if bias is not None:
                sim3.add_(bias[g0:g1].unsqueeze(-1))
            mx = sim3.amax(dim=1).view(gt, q1 - q0, kq)
            out[q0:q1, g0:g1] = _finish(mx, None if qmask is None else qmask[q0:q1]).T

    run_blocks(tile, nt, resolve_workers(workers))
    return out


def _tiles(nq: int, kq: int, kg: int, cache_bytes: int, elem: int = 4) -> tuple[int, int]:
    """(queries per chunk, gallery images per tile) so one similarity block fits the cache:
    up to 512 query-token columns, then as many gallery images as fit (at least one)."""
    q_chunk = max(1, min(nq, 512 // max(1, kq)))
    g_tile = max(1, cache_bytes // max(1, elem * kg * q_chunk * kq))
    return q_chunk, g_tile


def late_interaction_score(
    queries: Tokens,
    gallery: Tokens | None = None,
    *,
    num_gallery: int | None = None,
    gather: GatherFn | None = None,
    device: torch.device | str | None = None,
    tile_bytes: int = DEFAULT_TILE_BYTES,
    workers: int = 0,
) -> torch.Tensor:
    """(Nq, Ng) late-interaction scores of every query against every gallery item.

    Either ``gallery`` tokens, or ``num_gallery`` plus a ``gather`` function that decodes
    gallery rows on demand (a quantized store), so the whole gallery is never materialized in
    fp32. Memory per step is about ``tile_bytes``; the result lives on CPU. On CPU with
    ``gallery`` tokens this runs :func:`score_cpu` (``workers`` threads, 0: torch's count).
    """
    dev0 = torch.device(device) if device is not None else queries.vectors.device
    if gallery is not None and cpu_fast(queries, gallery.vectors, dev0):
        cache = min(tile_bytes, CPU_CACHE_BYTES)
        return score_cpu(queries, gallery.vectors, gallery.mask, workers, cache)
    if gallery is not None:
        num_gallery = len(gallery)
        gather = _tokens_gather(gallery)
    assert gather is not None and num_gallery is not None
    dev = torch.device(device) if device is not None else queries.vectors.device
    dt = compute_dtype(dev)
    q = queries.vectors.to(dev, dt)
    nq, kq, d = q.shape
    qmask = None if queries.mask is None else queries.mask.to(dev)
    out = torch.empty(nq, num_gallery, dtype=torch.float32, device=dev)
    if nq == 0 or num_gallery == 0:
        return out.cpu()
    probe = gather(torch.arange(1))
    kg = probe.vectors.shape[1]
    elem = torch.finfo(dt).bits // 8
    # Tile sizes: the (Gt*Kg, Qc*Kq) similarity block stays within tile_bytes, with at least
    # ~64 gallery images per tile so each matmul is large enough to run near peak.
    q_chunk = max(1, min(nq, tile_bytes // max(1, elem * kq * kg * 64)))
    g_tile = max(1, min(num_gallery, tile_bytes // max(1, elem * kg * q_chunk * kq)))
    qflat = q.reshape(nq * kq, d)
    for g0 in range(0, num_gallery, g_tile):
        idx = torch.arange(g0, min(g0 + g_tile, num_gallery))
        tile = gather(idx)
        gt = len(idx)
        gv = tile.vectors.to(dev, dt).reshape(gt * kg, d)
        gm = None if tile.mask is None else tile.mask.to(dev).reshape(gt, kg, 1)
        for q0 in range(0, nq, q_chunk):
            q1 = min(q0 + q_chunk, nq)
            sim = gv @ qflat[q0 * kq : q1 * kq].T  # (Gt*Kg, Qc*Kq), gallery tokens as rows
            mx = _masked_max(sim.view(gt, kg, (q1 - q0) * kq), gm, dim=1)  # (Gt, Qc*Kq)
            mx = mx.view(gt, q1 - q0, kq).float()
            s = _finish(mx, None if qmask is None else qmask[q0:q1].unsqueeze(0))
            out[q0:q1, g0 : g0 + gt] = s.T
    return out.cpu()


def late_interaction_rerank(
    queries: Tokens,
    candidates: torch.Tensor,
    gallery: Tokens | None = None,
    *,
    gather: GatherFn | None = None,
    device: torch.device | str | None = None,
    chunk_bytes: int = 32 * 2**20,
    workers: int = 0,
) -> torch.Tensor:
    """(Nq, S) late-interaction scores of each query against its own candidates (Nq, S).

    Candidates of a chunk of queries are gathered (decoded) into one block and scored with one
    batched matmul per chunk; the chunk is sized so the gathered block stays near
    ``chunk_bytes``. Candidate index -1 (no candidate) scores ``-inf``. On CPU with ``gallery``
    tokens this runs :func:`rerank_cpu` (``workers`` threads, 0: torch's count).
    """
    dev0 = torch.device(device) if device is not None else queries.vectors.device
    if gallery is not None and cpu_fast(queries, gallery.vectors, dev0):
        block = min(chunk_bytes, 4 * 2**20)
        return rerank_cpu(queries, gallery.vectors, candidates, gallery.mask, workers, block)
    if gallery is not None:
        gather = _tokens_gather(gallery)
    assert gather is not None
    dev = torch.device(device) if device is not None else queries.vectors.device
    dt = compute_dtype(dev)
    nq, s = candidates.shape
    out = torch.full((nq, s), float("-inf"), dtype=torch.float32)
    if nq == 0 or s == 0:
        return out
    q = queries.vectors.to(dev, dt)
    kq, d = q.shape[1:]
    qmask = None if queries.mask is None else queries.mask.to(dev)
    cand = candidates.to(torch.long)
    valid = cand >= 0
    probe = gather(torch.zeros(1, dtype=torch.long))
    kg = probe.vectors.shape[1]
    per_query = s * kg * d * (torch.finfo(dt).bits // 8)
    chunk = max(1, min(nq, chunk_bytes // max(1, per_query)))
    for q0 in range(0, nq, chunk):
        q1 = min(q0 + chunk, nq)
        c = cand[q0:q1].clamp(min=0).reshape(-1)
        tok = gather(c)
        g = tok.vectors.to(dev, dt).view(q1 - q0, s * kg, d)
        sim = torch.bmm(g, q[q0:q1].transpose(1, 2))  # (Qc, S*Kg, Kq)
        gm = None if tok.mask is None else tok.mask.to(dev).view(q1 - q0, s, kg, 1)
        mx = _masked_max(sim.view(q1 - q0, s, kg, kq), gm, dim=2).float()  # (Qc, S, Kq)
        out[q0:q1] = _finish(mx, None if qmask is None else qmask[q0:q1].unsqueeze(1)).cpu()
    return out.masked_fill_(~valid, float("-inf"))


def _tokens_gather(gallery: Tokens) -> GatherFn:
    def gather(index: torch.Tensor) -> Tokens:
        index = index.to(gallery.vectors.device)
        return Tokens(
            gallery.vectors.index_select(0, index),
            None if gallery.mask is None else gallery.mask.index_select(0, index),
        )

    return gather


class LateInteraction:
    """Late interaction (1/Kq) sum_i max_j <q_i, g_j>, masks respected, tiled exhaustive search.

    ``device``: where the matmuls run ("auto" = CUDA when available); fp16 on CUDA.
    ``tile_mb``: memory bound of one exhaustive tile / rerank chunk in MiB.
    ``threads``: worker threads of the CPU paths (0: torch's intra-op thread count).
    """

    def __init__(self, device: str = "auto", tile_mb: int = 64, threads: int = 0) -> None:
        if tile_mb < 1:
            raise ValueError(f"tile_mb must be >= 1 (MiB), got {tile_mb}")
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's thread count), got {threads}")
        self.device = resolve_device(device)
        self.tile_bytes = tile_mb * 2**20
        self.threads = threads

    def score(self, queries: Tokens, gallery: Tokens) -> torch.Tensor:
        return late_interaction_score(
            queries,
            gallery,
            device=self.device,
            tile_bytes=self.tile_bytes,
            workers=self.threads,
        )

    def rerank(self, queries: Tokens, gallery: Tokens, candidates: torch.Tensor) -> torch.Tensor:
        return late_interaction_rerank(
            queries,
            candidates,
            gallery,
            device=self.device,
            chunk_bytes=self.tile_bytes // 2,
            workers=self.threads,
        )

    # Store-aware paths: stages call these so quantized stores are scored from their codes
    # (directly when the store has a fast path, in place when the codes are plain floats,
    # else decoding only the rows needed).
    def score_store(self, queries: Tokens, store: Any) -> torch.Tensor:
        plain = _plain_tokens(store)
        if plain is not None:
            return self.score(queries, plain)
        direct = getattr(store, "li_score", None)
        if direct is not None:
            return direct(queries, device=self.device, tile_bytes=self.tile_bytes)
        return late_interaction_score(
            queries,
            num_gallery=len(store),
            gather=_store_gather(store),
            device=self.device,
            tile_bytes=self.tile_bytes,
        )

    def rerank_store(self, queries: Tokens, store: Any, candidates: torch.Tensor) -> torch.Tensor:
        plain = _plain_tokens(store)
        if plain is not None:
            return self.rerank(queries, plain, candidates)
        direct = getattr(store, "li_rerank", None)
        if direct is not None:
            return direct(queries, candidates, device=self.device)
        return late_interaction_rerank(
            queries,
            candidates,
            gather=_store_gather(store),
            device=self.device,
            chunk_bytes=self.tile_bytes // 2,
        )


def _plain_tokens(store: Any) -> Tokens | None:
    fn = getattr(store, "plain_tokens", None)
    return fn() if fn is not None else None


def _store_gather(store: Any) -> GatherFn:
    gather = getattr(store, "gather", None)
    if gather is not None:
        return gather
    return store.decode


class Cosine:
    """Cosine similarity of single vectors.

    Token sets with K=1 are their single vector; for K>1 the real tokens are mean-pooled and
    L2-normalized first (the "pooled instance tokens" baseline), so any token set works.
    """

    def __init__(self, device: str = "auto") -> None:
        self.device = resolve_device(device)

    def vectors(self, tokens: Tokens) -> torch.Tensor:
        """(N, D) unit vectors: the single token, or the normalized masked mean."""
        v = tokens.vectors.to(self.device, torch.float32)
        if tokens.mask is None:
            pooled = v.mean(dim=1)
        else:
            m = tokens.mask.to(self.device).unsqueeze(-1).to(v.dtype)
            pooled = (v * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def score(self, queries: Tokens, gallery: Tokens) -> torch.Tensor:
        return (self.vectors(queries) @ self.vectors(gallery).T).cpu()

    def rerank(self, queries: Tokens, gallery: Tokens, candidates: torch.Tensor) -> torch.Tensor:
        q = self.vectors(queries)
        g = self.vectors(gallery)
        cand = candidates.to(self.device, torch.long)
        out = torch.einsum("qd,qsd->qs", q, g[cand.clamp(min=0)])
        return out.masked_fill(cand < 0, float("-inf")).cpu()

    def score_store(self, queries: Tokens, store: Any) -> torch.Tensor:
        return self.score(queries, store.decode())

    def rerank_store(self, queries: Tokens, store: Any, candidates: torch.Tensor) -> torch.Tensor:
        return self.rerank(queries, store.decode(), candidates)


def score_store(matcher: Any, queries: Tokens, store: Any) -> torch.Tensor:
    """(Nq, Ng) scores from any matcher: its store-aware path, else the decoded store."""
    fn = getattr(matcher, "score_store", None)
    return fn(queries, store) if fn is not None else matcher.score(queries, store.decode())


def rerank_store(
    matcher: Any, queries: Tokens, store: Any, candidates: torch.Tensor
) -> torch.Tensor:
    """(Nq, S) rerank scores from any matcher: its store-aware path, else the decoded store."""
    fn = getattr(matcher, "rerank_store", None)
    if fn is not None:
        return fn(queries, store, candidates)
    return matcher.rerank(queries, store.decode(), candidates)


@hookimpl
def register_matchers(register: Any) -> None:
    register(
        "late_interaction",
        LateInteraction,
        "Late interaction (1/Kq) sum_i max_j <q_i, g_j> with masks; tiled, CPU/CUDA",
    )
    register("cosine", Cosine, "Cosine of single vectors (K>1: normalized mean of the tokens)")
