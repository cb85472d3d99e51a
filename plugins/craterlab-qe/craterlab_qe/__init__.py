"""craterlab-qe: a retrieval stage that reranks the two-stage ranking by alpha query expansion.

Each query q is expanded with its top-n gallery items x_i, weighted w_i = max(s(q, x_i), 0)^alpha,
and every item g of its ranked list is re-scored by late interaction s (the run's matcher):
s'(q, g) = (s(q, g) + sum_i w_i s(x_i, g)) / (1 + sum_i w_i).
"""

from __future__ import annotations

import dataclasses
import time

import torch

import craterlab
from craterlab import Ranking, RetrievalInputs, StoreMatcher, Tokens, hookimpl


def rerank(inputs: RetrievalInputs, queries: Tokens, candidates: torch.Tensor) -> torch.Tensor:
    """(Nq, L) late-interaction scores of each query against its candidate gallery items."""
    if isinstance(inputs.matcher, StoreMatcher):
        return inputs.matcher.rerank_store(queries, inputs.gallery_store, candidates)
    return inputs.matcher.rerank(queries, inputs.gallery_store.decode(), candidates)


class AlphaQE:
    """Two-stage search, then alpha query expansion (alpha-QE) over late-interaction scores."""

    def __init__(self, n: int = 3, alpha: float = 3.0, shortlist: int = 100, index: str = "Flat"):
        if n < 1 or alpha < 0:
            raise ValueError(f"need n >= 1 and alpha >= 0, got n={n}, alpha={alpha}")
        self.n, self.alpha = n, alpha
        config = {"name": "two_stage", "shortlist": shortlist, "index": index}
        self.base = craterlab.build("stage", config)

    def search(self, inputs: RetrievalInputs) -> Ranking:
        base = self.base.search(inputs)
        start = time.perf_counter()
        ids, nq = base.indices, len(base.indices)
        n = min(self.n, ids.shape[1], base.shortlist.shape[1])  # neighbours from the reranked head
        weights = base.scores[:, :n].clamp(min=0) ** self.alpha  # (Nq, n)
        expansion = inputs.gallery_store.decode(ids[:, :n].reshape(-1))  # (Nq * n) token sets
        s_x = rerank(inputs, expansion, ids.repeat_interleave(n, dim=0)).view(nq, n, -1)
        s_q = rerank(inputs, inputs.query_tokens, ids)
        scores = (s_q + (weights[..., None] * s_x).sum(1)) / (1 + weights.sum(1, keepdim=True))
        order = scores.argsort(dim=1, descending=True, stable=True)
        ms = [(time.perf_counter() - start) * 1e3 / max(nq, 1)] * nq
        # Batched latencies only: the expansion is not timed one query at a time.
        timings = {k: v for k, v in base.timings_ms.items() if not k.endswith("_single")}
        timings.update(qe=ms, total=[a + b for a, b in zip(timings["total"], ms, strict=True)])
        report = base.report and dataclasses.replace(
            base.report, latency_ms=timings, single_latency_ms={}
        )
        return Ranking(
            indices=ids.gather(1, order),
            scores=scores.gather(1, order),
            shortlist=base.shortlist,
            timings_ms=timings,
            extra=dict(base.extra),
            report=report,
        )


@hookimpl
def register_stages(register):
    register("qe", AlphaQE, "two-stage search, then alpha query expansion over late interaction")
