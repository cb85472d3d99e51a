"""Retrieval stages: single-vector search, exhaustive late interaction, two-stage rerank.

Each stage turns :class:`RetrievalInputs` into a :class:`Ranking` (best first) that carries
its own :class:`StageReport`: bytes per gallery image of a deployment of this mode (stage-1
index and/or token store), per-query latencies in milliseconds of each part (``stage1``,
``rerank``, ``exhaustive``, ``total``), batched (a block's time divided by its size) and for
``timing_queries`` queries searched one at a time, and its role for ``mAP_recovered``. The run
logs the report as it is. ``Ranking.extra`` holds the storage figures behind the bytes:
``index_bytes`` (serialized stage-1 index), ``store_bytes``, ``store_overhead_bytes`` (PQ
codebook) and ``shortlist`` (S).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from craterlab.retrieval.stores import CodeStore
from craterlab.retrieval.timing import single_query_latencies, timed_blocks
from craterlab.retrieval.vector_index import SingleVectorIndex, Stage1Settings
from craterlab.types import (
    Matcher,
    Ranking,
    RetrievalInputs,
    StageReport,
    StoreMatcher,
    Tokens,
    TokenStore,
)


def stage1_key(settings: Stage1Settings) -> str:
    """The ``RetrievalInputs.prepared`` key of a stage-1 index with these settings."""
    s = settings.as_dict()
    return "stage1:" + ",".join(f"{k}={s[k]}" for k in sorted(s))


def check_common(timing_queries: int, block: int) -> None:
    if timing_queries < 0:
        raise ValueError(f"timing_queries must be >= 0, got {timing_queries}")
    if block < 1:
        raise ValueError(f"block must be >= 1 query, got {block}")


def score_store(matcher: Matcher, queries: Tokens, store: TokenStore) -> torch.Tensor:
    """(Nq, Ng) scores: the matcher's store-aware path, else the decoded store."""
    if isinstance(matcher, StoreMatcher):
        return matcher.score_store(queries, store)
    return matcher.score(queries, store.decode())


def rerank_store(
    matcher: Matcher, queries: Tokens, store: TokenStore, candidates: torch.Tensor
) -> torch.Tensor:
    """(Nq, S) rerank scores: the matcher's store-aware path, else the decoded store."""
    if isinstance(matcher, StoreMatcher):
        return matcher.rerank_store(queries, store, candidates)
    return matcher.rerank(queries, store.decode(), candidates)


def _matcher_device(matcher: Matcher) -> torch.device:
    device = getattr(matcher, "device", None)  # Matcher has no device in its protocol
    return torch.device(device) if device is not None else torch.device("cpu")


def on_matcher_device(store: TokenStore, matcher: Matcher) -> TokenStore:
    """Keep the codes resident on the matcher's GPU (one copy), so tiles need no transfers."""
    if _matcher_device(matcher).type == "cuda" and isinstance(store, CodeStore):
        return store.to(_matcher_device(matcher))
    return store


def matcher_sync(matcher: Matcher) -> Callable[[], None] | None:
    device = _matcher_device(matcher)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def store_extra(store: TokenStore) -> dict[str, float]:
    out = {"store_bytes": float(store.nbytes)}
    if isinstance(store, CodeStore):
        out["store_overhead_bytes"] = float(store.overhead_bytes)
    return out


class SingleStage:
    """Stage 1 only: top-L by inner product of the single vectors (FAISS or torch).

    ``index``, ``nprobe``, ``ef_search``, ``device``: the :class:`Stage1Settings`.
    ``block``: queries per timed block. ``timing_queries``: queries also timed one at a time.
    """

    def __init__(
        self,
        index: str = "Flat",
        nprobe: int | None = None,
        ef_search: int | None = None,
        device: str = "auto",
        block: int = 1000,
        timing_queries: int = 16,
    ) -> None:
        check_common(timing_queries, block)
        self.settings = Stage1Settings(index, nprobe, ef_search, device)
        self.settings.make()  # a bad device fails at build time
        self.block = block
        self.timing_queries = timing_queries

    @property
    def index_spec(self) -> str:
        return self.settings.index

    def make_index(self, inputs: RetrievalInputs) -> SingleVectorIndex:
        """The stage-1 index over the gallery vectors: the one ``inputs.prepared`` holds for
        these settings (a loaded index's), else built now and added there."""
        key = stage1_key(self.settings)
        index = inputs.prepared.get(key)
        if index is None or index.ntotal != len(inputs.gallery_vectors):
            index = self.settings.make(self.block).build(inputs.gallery_vectors)
            inputs.prepared[key] = index
        return index

    def search(self, inputs: RetrievalInputs) -> Ranking:
        index = self.make_index(inputs)
        depth = min(inputs.depth, len(inputs.gallery_vectors))
        scores, ids, lat = index.search(inputs.query_vectors, depth)
        single = single_query_latencies(
            lambda i: index.search(inputs.query_vectors[i : i + 1], depth),
            len(inputs.query_vectors),
            self.timing_queries,
        )
        report = StageReport(
            bytes_per_image=index.nbytes / max(1, len(inputs.gallery_vectors)),
            latency_ms={"stage1": lat, "total": list(lat)},
            single_latency_ms={"stage1": single},
            stage1=self.settings.as_dict(),
        )
        return Ranking(
            indices=ids,
            scores=scores,
            timings_ms=report.timings_ms(),
            extra={"index_bytes": float(index.nbytes)},
            report=report,
        )


class ExhaustiveStage:
    """Late interaction of every query against every gallery item (tiled, bounded memory);
    the reference that two-stage retrieval's ``mAP_recovered`` is measured against."""

    def __init__(self, block: int = 1000, timing_queries: int = 4, max_block_mb: int = 256) -> None:
        check_common(timing_queries, block)
        self.block = block
        self.timing_queries = timing_queries
        self.max_block_bytes = max_block_mb * 2**20

    def search(self, inputs: RetrievalInputs) -> Ranking:
        store = on_matcher_device(inputs.gallery_store, inputs.matcher)
        q = inputs.query_tokens
        nq, ng = len(q), len(store)
        depth = min(inputs.depth, ng)
        # The (block, Ng) score block is the only thing that grows with the gallery.
        block = max(1, min(self.block, self.max_block_bytes // max(1, 4 * ng)))
        scores = torch.empty(nq, depth)
        ids = torch.empty(nq, depth, dtype=torch.long)

        def search_block(q0: int, q1: int) -> None:
            top = score_store(inputs.matcher, q[q0:q1], store).topk(depth, dim=1)
            scores[q0:q1], ids[q0:q1] = top.values, top.indices

        sync = matcher_sync(inputs.matcher)
        lat = timed_blocks(nq, block, search_block, sync)
        single = single_query_latencies(
            lambda i: score_store(inputs.matcher, q[i : i + 1], store).topk(depth, dim=1),
            nq,
            self.timing_queries,
            sync,
        )
        report = StageReport(
            bytes_per_image=inputs.gallery_store.bytes_per_image(),
            latency_ms={"exhaustive": lat, "total": list(lat)},
            single_latency_ms={"exhaustive": single},
            reference=True,
        )
        return Ranking(
            indices=ids,
            scores=scores,
            timings_ms=report.timings_ms(),
            extra=store_extra(inputs.gallery_store),
            report=report,
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
        store = on_matcher_device(inputs.gallery_store, inputs.matcher)
        ng = len(inputs.gallery_vectors)
        s = min(self.shortlist, ng)
        depth = min(inputs.depth, ng)
        index = self.make_index(inputs)
        s1_scores, s1_ids, lat1 = index.search(inputs.query_vectors, max(s, depth))
        short = s1_ids[:, :s]
        q = inputs.query_tokens
        nq = len(q)
        rr = torch.empty(nq, s)

        def rerank_block(q0: int, q1: int) -> None:
            rr[q0:q1] = rerank_store(inputs.matcher, q[q0:q1], store, short[q0:q1])

        sync = matcher_sync(inputs.matcher)
        lat2 = timed_blocks(nq, self.block, rerank_block, sync)
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
        single1 = single_query_latencies(
            lambda i: index.search(inputs.query_vectors[i : i + 1], s), nq, self.timing_queries
        )
        single2 = single_query_latencies(
            lambda i: rerank_store(inputs.matcher, q[i : i + 1], store, short[i : i + 1]),
            nq,
            self.timing_queries,
            sync,
        )
        report = shortlist_rerank_report(
            index.nbytes / max(1, ng) + inputs.gallery_store.bytes_per_image(),
            (lat1, lat2),
            (single1, single2),
            stage1=self.settings.as_dict(),
        )
        extra = {"index_bytes": float(index.nbytes), "shortlist": float(s)}
        extra.update(store_extra(inputs.gallery_store))
        return Ranking(
            indices=ids,
            scores=scores,
            shortlist=short,
            timings_ms=report.timings_ms(),
            extra=extra,
            report=report,
        )


def shortlist_rerank_report(
    bytes_per_image: float,
    latencies: tuple[list[float], list[float]],
    single_latencies: tuple[list[float], list[float]],
    **fields: Any,
) -> StageReport:
    """The report of a stage that shortlists and then reranks with late interaction: stage-1,
    rerank and total latencies (batched and single query), marked as recovering the exhaustive
    reference (so ``mAP_recovered`` is computed for it)."""

    def split(pair: tuple[list[float], list[float]]) -> dict[str, list[float]]:
        first, second = pair
        total = [a + b for a, b in zip(first, second, strict=True)]
        return {"stage1": first, "rerank": second, "total": total}

    return StageReport(
        bytes_per_image=bytes_per_image,
        latency_ms=split(latencies),
        single_latency_ms=split(single_latencies),
        recovers_reference=True,
        **fields,
    )
