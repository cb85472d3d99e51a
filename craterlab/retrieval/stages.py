"""Retrieval stages: single-vector search, exhaustive late interaction, two-stage rerank.

Each stage turns :class:`RetrievalInputs` into a :class:`Ranking` (best first) and records
per-query latencies in milliseconds: batched latencies (the time of each block of queries
divided by its size) under ``stage1`` / ``rerank`` / ``exhaustive`` / ``total``, and
single-query latencies (``timing_queries`` queries searched one at a time) under the same names
with a ``_single`` suffix. ``extra`` holds storage figures: ``index_bytes`` (serialized stage-1
index), ``store_bytes``, ``bytes_per_image``, ``store_overhead_bytes``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from craterlab.devices import resolve_device
from craterlab.matching import rerank_store, score_store
from craterlab.retrieval.vector_index import VectorIndex
from craterlab.types import Ranking, RetrievalInputs


def _check_common(timing_queries: int, block: int) -> None:
    if timing_queries < 0:
        raise ValueError(f"timing_queries must be >= 0, got {timing_queries}")
    if block < 1:
        raise ValueError(f"block must be >= 1 query, got {block}")


def _store_extra(store: Any) -> dict[str, float]:
    out = {"store_bytes": float(store.nbytes), "bytes_per_image": float(store.bytes_per_image())}
    overhead = getattr(store, "overhead_bytes", None)
    if overhead is not None:
        out["store_overhead_bytes"] = float(overhead)
    return out


def _on_matcher_device(store: Any, matcher: Any) -> Any:
    """Keep the codes resident on the matcher's GPU (one copy), so tiles need no transfers."""
    device = getattr(matcher, "device", None)
    if device is not None and torch.device(device).type == "cuda" and hasattr(store, "to"):
        return store.to(device)
    return store


def _sync(matcher: Any) -> None:
    device = getattr(matcher, "device", None)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class SingleStage:
    """Stage 1 only: top-L by inner product of the single vectors (FAISS or torch)."""

    def __init__(
        self,
        index: str = "Flat",
        nprobe: int | None = None,
        ef_search: int | None = None,
        device: str = "auto",
        block: int = 1000,
        timing_queries: int = 16,
    ) -> None:
        _check_common(timing_queries, block)
        self.index_spec = index
        self.nprobe, self.ef_search = nprobe, ef_search
        self.device = resolve_device(device)
        self.block = block
        self.timing_queries = timing_queries
        self.prebuilt: VectorIndex | None = None
        """A built stage-1 index over exactly these gallery vectors (a loaded GalleryIndex)."""

    def make_index(self, gallery_vectors: torch.Tensor) -> VectorIndex:
        if self.prebuilt is not None and self.prebuilt.ntotal == len(gallery_vectors):
            return self.prebuilt
        return VectorIndex(
            self.index_spec, self.nprobe, self.ef_search, self.device, self.block
        ).build(gallery_vectors)

    def search(self, inputs: RetrievalInputs) -> Ranking:
        index = self.make_index(inputs.gallery_vectors)
        depth = min(inputs.depth, len(inputs.gallery_vectors))
        scores, ids, lat = index.search(inputs.query_vectors, depth)
        single = _single_timings(
            lambda i: index.search(inputs.query_vectors[i : i + 1], depth),
            len(inputs.query_vectors),
            self.timing_queries,
        )
        return Ranking(
            indices=ids,
            scores=scores,
            timings_ms={"stage1": lat, "total": list(lat), "stage1_single": single},
            extra={"index_bytes": float(index.nbytes)},
        )


class ExhaustiveStage:
    """Late interaction of every query against every gallery item (tiled, bounded memory)."""

    def __init__(self, block: int = 1000, timing_queries: int = 4, max_block_mb: int = 256) -> None:
        _check_common(timing_queries, block)
        self.block = block
        self.timing_queries = timing_queries
        self.max_block_bytes = max_block_mb * 2**20

    def search(self, inputs: RetrievalInputs) -> Ranking:
        store = _on_matcher_device(inputs.gallery_store, inputs.matcher)
        q = inputs.query_tokens
        nq, ng = len(q), len(store)
        depth = min(inputs.depth, ng)
        # The (block, Ng) score block is the only thing that grows with the gallery.
        block = max(1, min(self.block, self.max_block_bytes // max(1, 4 * ng)))
        scores = torch.empty(nq, depth)
        ids = torch.empty(nq, depth, dtype=torch.long)
        lat: list[float] = []
        for q0 in range(0, nq, block):
            q1 = min(q0 + block, nq)
            t0 = time.perf_counter()
            s = score_store(inputs.matcher, q[q0:q1], store)
            top = s.topk(depth, dim=1)
            _sync(inputs.matcher)
            lat.extend([(time.perf_counter() - t0) * 1e3 / (q1 - q0)] * (q1 - q0))
            scores[q0:q1], ids[q0:q1] = top.values, top.indices
        single = _single_timings(
            lambda i: score_store(inputs.matcher, q[i : i + 1], store).topk(depth, dim=1),
            nq,
            self.timing_queries,
        )
        return Ranking(
            indices=ids,
            scores=scores,
            timings_ms={"exhaustive": lat, "total": list(lat), "exhaustive_single": single},
            extra=_store_extra(inputs.gallery_store),
        )


class TwoStage(SingleStage):
    """Stage 1 top-S shortlist by single vectors, then late-interaction rerank of the S.

    Ranks beyond S (when depth > S) keep their stage-1 order, below every reranked item.
    """

    def __init__(
        self,
        shortlist: int = 100,
        index: str = "Flat",
        nprobe: int | None = None,
        ef_search: int | None = None,
        device: str = "auto",
        block: int = 1000,
        timing_queries: int = 16,
    ) -> None:
        if shortlist < 1:
            raise ValueError(f"shortlist must be >= 1, got {shortlist}")
        super().__init__(index, nprobe, ef_search, device, block, timing_queries)
        self.shortlist = shortlist

    def search(self, inputs: RetrievalInputs) -> Ranking:
        store = _on_matcher_device(inputs.gallery_store, inputs.matcher)
        ng = len(inputs.gallery_vectors)
        s = min(self.shortlist, ng)
        depth = min(inputs.depth, ng)
        index = self.make_index(inputs.gallery_vectors)
        s1_scores, s1_ids, lat1 = index.search(inputs.query_vectors, max(s, depth))
        short = s1_ids[:, :s]
        q = inputs.query_tokens
        nq = len(q)
        rr = torch.empty(nq, s)
        lat2: list[float] = []
        for q0 in range(0, nq, self.block):
            q1 = min(q0 + self.block, nq)
            t0 = time.perf_counter()
            rr[q0:q1] = rerank_store(inputs.matcher, q[q0:q1], store, short[q0:q1])
            _sync(inputs.matcher)
            lat2.extend([(time.perf_counter() - t0) * 1e3 / (q1 - q0)] * (q1 - q0))
        order = rr.argsort(dim=1, descending=True, stable=True)
        ids = short.gather(1, order)
        scores = rr.gather(1, order)
        if depth > s:  # the tail keeps stage-1 order, strictly below the reranked head
            tail_ids = s1_ids[:, s:depth]
            tail = s1_scores[:, s:depth]
            floor = torch.nan_to_num(scores.min(dim=1, keepdim=True).values, neginf=0.0)
            tail = floor - 1.0 - (tail[:, :1] - tail)
            ids = torch.cat([ids, tail_ids], dim=1)
            scores = torch.cat([scores, tail], dim=1)
        ids, scores = ids[:, :depth], scores[:, :depth]
        single1 = _single_timings(
            lambda i: index.search(inputs.query_vectors[i : i + 1], s), nq, self.timing_queries
        )
        single2 = _single_timings(
            lambda i: rerank_store(inputs.matcher, q[i : i + 1], store, short[i : i + 1]),
            nq,
            self.timing_queries,
        )
        extra = {"index_bytes": float(index.nbytes), "shortlist": float(s)}
        extra.update(_store_extra(inputs.gallery_store))
        return Ranking(
            indices=ids,
            scores=scores,
            shortlist=short,
            timings_ms={
                "stage1": lat1,
                "rerank": lat2,
                "total": [a + b for a, b in zip(lat1, lat2, strict=True)],
                "stage1_single": single1,
                "rerank_single": single2,
                "total_single": [a + b for a, b in zip(single1, single2, strict=True)],
            },
            extra=extra,
        )


def _single_timings(fn: Any, nq: int, count: int) -> list[float]:
    """Latency (ms) of ``fn(i)`` for the first ``count`` queries, one query at a time."""
    out = []
    for i in range(min(count, nq)):
        t0 = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t0) * 1e3)
    return out
