"""Retrieval metrics under cluster-tolerant relevance (the CraterBench-R protocol).

A query q carries a set I(q) of co-visible crater ids; a gallery image is relevant to q when
its crater id is in I(q). From ranked gallery positions (best first) this module computes

- ``R@k``: the share of queries with a relevant image among the first k results;
- ``mAP``: mean over queries of average precision. AP is normalized by the TOTAL number of
  relevant gallery images of the query, not by the number found in the (possibly truncated)
  ranked list, so a list shorter than the gallery can only lower AP, never inflate it;
- ``R@S``: for two-stage retrieval, the share of queries whose stage-1 shortlist holds a
  relevant image (an upper bound on what reranking can recover).

Queries with no relevant gallery image at all are reported in ``EvalResult.excluded`` and left
out of every metric (they are never counted as a miss or a hit silently).

Everything is vectorized with numpy: 5,000 queries x depth 1,000 take milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from craterlab.errors import DataError

__all__ = ["EvalResult", "bootstrap_ci", "evaluate", "rank_scores", "relevance_hits"]


@dataclass
class EvalResult:
    """Metrics of one ranking: aggregate values, per-query AP and the excluded queries.

    ``metrics`` keys: ``R@1``, ``R@5``, ``R@10`` (one per requested k), ``mAP``, ``R@S`` (only
    when a shortlist was given), ``queries`` (evaluated count) and ``excluded`` (count).
    ``per_query_ap`` is aligned with ``evaluated`` (query indices that were evaluated);
    ``excluded`` holds the indices of queries with no relevant gallery image.
    """

    metrics: dict[str, float]
    per_query_ap: np.ndarray
    excluded: np.ndarray
    evaluated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    num_relevant: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _as_numpy(x: Any, name: str, ndim: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def relevance_hits(
    indices: Any, gallery_crater_ids: Any, relevant: Sequence[Iterable[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """``hits`` (Nq, L) bool: is ranked item j of query q relevant; and ``num_relevant`` (Nq,).

    Negative indices (padding, e.g. FAISS's -1) are never hits. Membership is computed for all
    queries at once by encoding (query, crater) pairs as single integers.
    """
    idx = _as_numpy(indices, "indices", 2)
    gal = _as_numpy(gallery_crater_ids, "gallery_crater_ids", 1)
    nq = idx.shape[0]
    if len(relevant) != nq:
        raise ValueError(f"relevant has {len(relevant)} entries but indices has {nq} rows")
    if idx.size and idx.max() >= len(gal):
        raise ValueError(f"indices hold position {idx.max()} but the gallery has {len(gal)} images")
    # Dense crater codes 0..C-1 of the gallery; relevant ids absent from the gallery drop out.
    uniq, gal_code, counts = np.unique(gal, return_inverse=True, return_counts=True)
    n_codes = max(len(uniq), 1)
    q_of, code_of = [], []
    for q, ids in enumerate(relevant):
        ids_arr = np.fromiter((int(i) for i in ids), dtype=np.int64)
        if ids_arr.size == 0 or uniq.size == 0:
            continue
        pos = np.minimum(np.searchsorted(uniq, ids_arr), uniq.size - 1)
        found = np.unique(pos[uniq[pos] == ids_arr])
        q_of.append(np.full(found.size, q, dtype=np.int64))
        code_of.append(found)
    q_arr = np.concatenate(q_of) if q_of else np.zeros(0, np.int64)
    c_arr = np.concatenate(code_of) if code_of else np.zeros(0, np.int64)
    num_relevant = np.bincount(q_arr, weights=counts[c_arr], minlength=nq).astype(np.int64)
    rel_keys = np.sort(q_arr * n_codes + c_arr)
    valid = idx >= 0
    ranked_code = np.where(valid, gal_code[np.where(valid, idx, 0)], 0)
    keys = np.arange(nq, dtype=np.int64)[:, None] * n_codes + ranked_code
    if rel_keys.size:
        pos = np.minimum(np.searchsorted(rel_keys, keys), rel_keys.size - 1)
        hits = (rel_keys[pos] == keys) & valid
    else:
        hits = np.zeros(keys.shape, dtype=bool)
    return hits, num_relevant


def evaluate(
    indices: Any,
    gallery_crater_ids: Any,
    relevant: Sequence[Iterable[int]],
    *,
    ks: Sequence[int] = (1, 5, 10),
    shortlist: Any = None,
) -> EvalResult:
    """R@k, mAP (and R@S with a shortlist) of ranked gallery positions.

    ``indices``: (Nq, L) ranked gallery positions, best first (L may be < gallery size; -1 is
    padding). ``gallery_crater_ids``: (Ng,) crater id of each gallery image. ``relevant``: Nq
    sets of relevant crater ids I(q). ``shortlist``: optional (Nq, S) stage-1 candidates.
    Queries whose I(q) matches no gallery image are excluded and listed in ``excluded``.
    """
    hits, num_relevant = relevance_hits(indices, gallery_crater_ids, relevant)
    nq, depth = hits.shape
    excluded = np.flatnonzero(num_relevant == 0)
    evaluated = np.flatnonzero(num_relevant > 0)
    if nq and evaluated.size == 0:
        raise DataError(
            f"None of the {nq} queries has a relevant gallery image (no query's relevant "
            "crater ids occur among the gallery crater ids), so nothing can be evaluated. Check "
            "that query relevant_ids and gallery crater_id use the same id scheme."
        )
    h = hits[evaluated]
    n_rel = num_relevant[evaluated].astype(np.float64)
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"R@{k}"] = float(h[:, :k].any(axis=1).mean()) if evaluated.size else 0.0
    if depth:
        cum = np.cumsum(h, axis=1, dtype=np.float64)
        precision = cum / np.arange(1, depth + 1, dtype=np.float64)
        ap = (precision * h).sum(axis=1) / n_rel
    else:
        ap = np.zeros(len(evaluated))
    metrics["mAP"] = float(ap.mean()) if ap.size else 0.0
    if shortlist is not None:
        s_hits, _ = relevance_hits(shortlist, gallery_crater_ids, relevant)
        if s_hits.shape[0] != nq:
            raise ValueError(f"shortlist has {s_hits.shape[0]} rows but indices has {nq}")
        metrics["R@S"] = float(s_hits[evaluated].any(axis=1).mean()) if evaluated.size else 0.0
    metrics["queries"] = float(evaluated.size)
    metrics["excluded"] = float(excluded.size)
    return EvalResult(
        metrics=metrics,
        per_query_ap=ap,
        excluded=excluded,
        evaluated=evaluated,
        num_relevant=num_relevant,
    )


def bootstrap_ci(
    per_query_ap: Any, n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) confidence interval of the mean of per-query AP.

    Queries are resampled with replacement ``n_resamples`` times (deterministic from ``seed``).
    """
    ap = np.asarray(per_query_ap, dtype=np.float64).ravel()
    if ap.size == 0:
        raise ValueError("bootstrap_ci needs at least one per-query value")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples, dtype=np.float64)
    chunk = max(1, 2_000_000 // ap.size)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        draws = rng.integers(0, ap.size, size=(stop - start, ap.size))
        means[start:stop] = ap[draws].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def rank_scores(scores: Any, depth: int | None = None) -> torch.Tensor:
    """(Nq, depth) gallery positions by descending score; ties go to the lower gallery index.

    A stable, deterministic tie rule, so a tie can never be resolved in a query's favour by
    accident of the sort algorithm.
    """
    s = scores if isinstance(scores, torch.Tensor) else torch.as_tensor(np.asarray(scores))
    depth = s.shape[1] if depth is None else min(depth, s.shape[1])
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    return order[:, :depth]
