"""The CPU engine of late interaction: one blocked kernel, parametrized by its matmul.

Both searches walk the gallery in blocks sized for the cache and hand each block to the same
kernel step (:meth:`Kernel.block_max`): one matmul with *gallery tokens as rows* and query tokens
as columns, then the max over each gallery item's tokens (padding excluded by a ``-inf`` bias).
The per-query-token maxima are then averaged over the real query tokens
(:func:`~craterlab.retrieval.late_interaction.masked_mean`), which is the definition in
:mod:`craterlab.retrieval.late_interaction`.

- :func:`rerank` (two-stage, (Nq, S) candidates): a block is a few whole queries or a slice of
  one query's candidates; the candidates' rows are gathered into a reused per-thread buffer.
- :func:`score` (exhaustive, (Nq, Ng)): a block is a contiguous gallery tile (no copy) against a
  chunk of query tokens, the similarity block within ``cache_bytes`` (the L2 of one core).

Blocks run on ``workers`` threads that each run torch single-threaded (:func:`run_blocks`):
torch's own intra-op threading scales poorly on these small blocks, and combining both
oversubscribes the cores.

The kernels (:data:`KERNELS`), measured side by side in ``benchmarks/bench_retrieval.py``:

- ``fp32``: float32 matmul (fp16 codes are upcast per block). Exact to float32 rounding.
- ``bf16``: bfloat16 operands and similarities (AMX tiles where the CPU has them; several times
  the fp32 matmul rate on Sapphire Rapids). Scores carry bf16 rounding (about 3 significant
  digits), so close candidates can swap; the benchmark reports its top-10 agreement.
- ``int8``: INT8 codes, one scale per gallery token; queries are quantized per token
  (:func:`~craterlab.retrieval.quantizers.quantize_int8`), an int8 x int8 -> int32 matmul,
  the gallery-token scale applied before the max and the query-token scale after it.
- ``int8_image``: INT8 codes with one scale per gallery *image*: the max is taken on the int32
  similarities and only the maxima are scaled (less work per block than ``int8``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from craterlab.retrieval import fused as _fused
from craterlab.retrieval.late_interaction import masked_mean
from craterlab.retrieval.quantizers import quantize_int8
from craterlab.types import Tokens

CPU_CACHE_BYTES = 1 * 2**20
"""Target size of one exhaustive similarity block (fits the L2 cache of one core)."""

INT_PAD = -(2**30)
"""Integer bias of padding tokens for ``int8_image`` (|int8 dot| <= 127 * 127 * D < 2**30 for
D < 66,000, so a padded token never wins the max and an all-padding item stays below it)."""

_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_TLS = threading.local()


# --------------------------------------------------------------------------- threads, buffers


def resolve_workers(threads: int) -> int:
    """Worker threads for the CPU engine: ``threads``, or torch's intra-op count when 0."""
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
    """A per-thread scratch tensor reused across calls (reallocated when it must grow)."""
    buf = getattr(_TLS, name, None)
    numel = 1
    for n in shape:
        numel *= n
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        setattr(_TLS, name, buf)
    return buf[:numel].view(shape)


# --------------------------------------------------------------------------- blocking


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


def exhaustive_tiles(nq: int, kq: int, kg: int, cache_bytes: int) -> tuple[int, int]:
    """(queries per chunk, gallery images per tile) so one 4-byte similarity block fits the
    cache: up to 512 query-token columns, then as many gallery images as fit (at least one)."""
    q_chunk = max(1, min(nq, 512 // max(1, kq)))
    g_tile = max(1, cache_bytes // max(1, 4 * kg * q_chunk * kq))
    return q_chunk, g_tile


# --------------------------------------------------------------------------- gallery operand


@dataclass
class GalleryCodes:
    """A gallery as the engine reads it: ``rows`` (N, K, D) in the store's dtype (float32,
    float16 or int8 codes), ``scales`` (N, K) per token or (N, 1) per image for int8 codes,
    ``mask`` (N, K) of real tokens or None."""

    rows: torch.Tensor
    scales: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    _bias: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.rows.dim() != 3 or self.rows.device.type != "cpu":
            raise ValueError(f"gallery rows must be a CPU (N, K, D) tensor, got {self.rows.shape}")

    @property
    def k(self) -> int:
        return self.rows.shape[1]

    @property
    def dim(self) -> int:
        return self.rows.shape[2]

    def flat(self) -> torch.Tensor:
        """(N, K * D) view of the rows (for gathering candidates)."""
        return self.rows.reshape(len(self.rows), -1)

    def bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """(N, K) additive bias: 0 for real tokens, ``-inf`` (floats) or :data:`INT_PAD`
        (int32) for padding; None without a mask. Computed once per dtype."""
        if self.mask is None:
            return None
        if dtype not in self._bias:
            pad = INT_PAD if dtype == torch.int32 else float("-inf")
            zero = torch.zeros((), dtype=dtype)
            self._bias[dtype] = torch.where(self.mask.cpu(), zero, torch.tensor(pad, dtype=dtype))
        return self._bias[dtype]

    def __len__(self) -> int:
        return len(self.rows)


# --------------------------------------------------------------------------- kernels


@dataclass(frozen=True)
class Kernel:
    """One matmul variant of the blocked kernel.

    ``operand``: dtype of both matmul operands; ``sim``: dtype of the matmul result;
    ``rerank_block_bytes``: default budget of one rerank block's gathered candidates.
    """

    name: str
    operand: torch.dtype
    sim: torch.dtype
    rerank_block_bytes: int

    @property
    def integer(self) -> bool:
        return self.operand == torch.int8

    def queries(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query tokens (Nq, Kq, D) as a contiguous matmul operand, and their per-token scales
        (Nq, Kq) for integer kernels (clamped > 0: an all-zero token has codes 0, so any
        positive scale is exact for it, and it keeps ``-inf`` from turning into NaN)."""
        if not self.integer:
            return vectors.detach().cpu().to(self.operand).contiguous(), None
        codes, scales = quantize_int8(vectors.detach().cpu())
        return codes, scales.clamp(min=torch.finfo(torch.float32).tiny)

    def operand_rows(self, rows: torch.Tensor, slot: str) -> torch.Tensor:
        """Gallery rows in the operand dtype (a per-thread buffer copy when they differ)."""
        if rows.dtype == self.operand:
            return rows
        return thread_buffer(slot, tuple(rows.shape), self.operand).copy_(rows)

    def matmul(self, g: torch.Tensor, qt: torch.Tensor, out: torch.Tensor) -> None:
        """``out[b] = g[b] @ qt[b]``: g (B, R, D) gallery rows, qt (B, D, C) query columns."""
        if self.integer:
            for b in range(g.shape[0]):
                torch._int_mm(g[b], qt[b], out=out[b])
        else:
            torch.bmm(g, qt, out=out)

    def block_max(
        self,
        sim: torch.Tensor,
        scales: torch.Tensor | None,
        bias: torch.Tensor | None,
        out: torch.Tensor,
    ) -> None:
        """``out`` (R, C) float32 = max over the K gallery tokens of ``sim`` (R, K, C), with the
        gallery scales (R, K) or (R, 1) of integer kernels applied and padding excluded by
        ``bias`` (R, K) (in ``sim``'s dtype for ``int8_image``, float32 otherwise)."""
        if self.name == "int8_image":
            if bias is not None:
                sim.add_(bias.unsqueeze(-1))
            best = sim.amax(dim=1)  # (R, C) int32: the max before any scaling
            assert scales is not None
            torch.mul(best, scales, out=out)
            if bias is not None:
                out.masked_fill_(best <= INT_PAD // 2, float("-inf"))
            return
        if self.integer:
            assert scales is not None
            f = thread_buffer("k_f32", tuple(sim.shape), torch.float32)
            torch.mul(sim, scales.unsqueeze(-1), out=f)
            sim = f
        if bias is not None:
            sim.add_(bias.unsqueeze(-1).to(sim.dtype))
        if sim.dtype == torch.float32:
            torch.amax(sim, dim=1, out=out)
        else:
            out.copy_(sim.amax(dim=1))

    def bias_dtype(self) -> torch.dtype:
        return torch.int32 if self.name == "int8_image" else torch.float32


KERNELS: dict[str, Kernel] = {
    "fp32": Kernel("fp32", torch.float32, torch.float32, 4 * 2**20),
    "bf16": Kernel("bf16", torch.bfloat16, torch.bfloat16, 4 * 2**20),
    "int8": Kernel("int8", torch.int8, torch.int32, 3 * 2**20),
    "int8_image": Kernel("int8_image", torch.int8, torch.int32, 3 * 2**20),
}


# --------------------------------------------------------------------------- searches


def rerank(
    kernel: Kernel,
    queries: Tokens,
    gallery: GalleryCodes,
    candidates: torch.Tensor,
    workers: int = 0,
    block_bytes: int | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """(Nq, S) late-interaction scores of each query against its candidate rows (-1: none).

    The int8, int8_image and bf16 kernels run the fused C kernel (:mod:`.fused`) where it is
    available (``fused=False`` forces the blocked path). The blocked path, per block (a few
    queries, or a slice of one query's candidates, so the gathered rows stay within
    ``block_bytes``): one ``index_select`` into a reused buffer, one batched matmul with
    gallery tokens as rows, the max over the gallery tokens (:meth:`Kernel.block_max`).
    """
    nq, s = candidates.shape
    if nq == 0 or s == 0:
        return torch.full((nq, s), float("-inf"))
    if fused and _fused.supports(kernel.name, gallery.rows, gallery.scales):
        n_workers = resolve_workers(workers)
        return _fused.rerank(
            kernel.name, queries.vectors, queries.mask, gallery.rows, gallery.scales,
            gallery.mask, candidates, lambda fn, n: run_blocks(fn, n, n_workers), n_workers,
        )  # fmt: skip
    k, d = gallery.k, gallery.dim
    flat = gallery.flat()
    q, qscale = kernel.queries(queries.vectors)
    qt = q.transpose(1, 2)  # (Nq, D, Kq)
    if kernel.integer:
        qt = qt.contiguous()  # row-major per query, the layout _int_mm was measured with here
    kq = q.shape[1]
    bias = gallery.bias(kernel.bias_dtype())
    cand = candidates.to(torch.long)
    idx_all = cand.clamp(min=0)
    budget = kernel.rerank_block_bytes if block_bytes is None else block_bytes
    nblocks, bounds = rerank_blocks(nq, s, k * d * flat.element_size(), budget)
    mx = torch.empty(nq, s, kq)

    def block(b: int) -> None:
        q0, q1, c0, c1 = bounds(b)
        m, c = q1 - q0, c1 - c0
        idx = idx_all[q0:q1, c0:c1].reshape(-1)
        g = thread_buffer("rr_rows", (m * c, k * d), flat.dtype)
        torch.index_select(flat, 0, idx, out=g)
        g = kernel.operand_rows(g, "rr_operand")
        sim = thread_buffer("rr_sim", (m, c * k, kq), kernel.sim)
        kernel.matmul(g.view(m, c * k, d), qt[q0:q1], sim)
        scales = None if gallery.scales is None else gallery.scales.index_select(0, idx)
        kernel.block_max(
            sim.view(m * c, k, kq),
            scales,
            None if bias is None else bias.index_select(0, idx),
            mx[q0:q1, c0:c1].view(m * c, kq),
        )

    run_blocks(block, nblocks, resolve_workers(workers))
    if qscale is not None:
        mx.mul_(qscale.unsqueeze(1))
    qmask = None if queries.mask is None else queries.mask.cpu().unsqueeze(1)
    return masked_mean(mx, qmask).masked_fill_(cand < 0, float("-inf"))


def score(
    kernel: Kernel,
    queries: Tokens,
    gallery: GalleryCodes,
    workers: int = 0,
    cache_bytes: int = CPU_CACHE_BYTES,
) -> torch.Tensor:
    """(Nq, Ng) exhaustive late interaction, tiled gallery-major for the cache.

    Gallery tiles are contiguous slices (no copy in the operand dtype); a tile's tokens are the
    rows of one matmul against a chunk of query tokens, and the (rows, columns) similarity block
    stays within ``cache_bytes``. Tiles are split between ``workers``.
    """
    q, qscale = kernel.queries(queries.vectors)
    nq, kq, d = q.shape
    ng, k = len(gallery), gallery.k
    out = torch.empty(nq, ng)
    if nq == 0 or ng == 0:
        return out
    qmask = None if queries.mask is None else queries.mask.cpu()
    bias = gallery.bias(kernel.bias_dtype())
    q_chunk, g_tile = exhaustive_tiles(nq, kq, k, cache_bytes)
    qt = q.reshape(nq * kq, d).T  # (D, Nq*Kq)

    def tile(t: int) -> None:
        g0, g1 = t * g_tile, min(ng, (t + 1) * g_tile)
        gt = g1 - g0
        gv = kernel.operand_rows(gallery.rows[g0:g1].reshape(gt * k, d), "sc_operand")
        scales = None if gallery.scales is None else gallery.scales[g0:g1]
        tile_bias = None if bias is None else bias[g0:g1]
        for q0 in range(0, nq, q_chunk):
            q1 = min(nq, q0 + q_chunk)
            cols = (q1 - q0) * kq
            sim = thread_buffer("sc_sim", (1, gt * k, cols), kernel.sim)
            kernel.matmul(gv.unsqueeze(0), qt[:, q0 * kq : q1 * kq].unsqueeze(0), sim)
            mx = thread_buffer("sc_max", (gt, cols), torch.float32)
            kernel.block_max(sim.view(gt, k, cols), scales, tile_bias, mx)
            mx3 = mx.view(gt, q1 - q0, kq)
            if qscale is not None:
                mx3.mul_(qscale[q0:q1])
            out[q0:q1, g0:g1] = masked_mean(mx3, None if qmask is None else qmask[q0:q1]).T

    run_blocks(tile, (ng + g_tile - 1) // g_tile, resolve_workers(workers))
    return out
