"""Metrics against an independent brute-force (Python loop) computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from craterlab.errors import DataError
from craterlab.metrics import bootstrap_ci, evaluate, rank_scores


def brute_force(indices, gallery_ids, relevant, ks=(1, 5, 10), shortlist=None):
    """Textbook definitions, one query at a time."""
    recalls = {k: [] for k in ks}
    aps, excluded, rs = [], [], []
    for q, rel in enumerate(relevant):
        n_rel = sum(1 for g in gallery_ids if g in rel)
        if n_rel == 0:
            excluded.append(q)
            continue
        ranked = [int(i) for i in indices[q] if i >= 0]
        flags = [gallery_ids[i] in rel for i in ranked]
        for k in ks:
            recalls[k].append(1.0 if any(flags[:k]) else 0.0)
        found, total = 0, 0.0
        for rank, flag in enumerate(flags, start=1):
            if flag:
                found += 1
                total += found / rank
        aps.append(total / n_rel)
        if shortlist is not None:
            rs.append(1.0 if any(gallery_ids[int(i)] in rel for i in shortlist[q]) else 0.0)
    out = {f"R@{k}": sum(v) / len(v) for k, v in recalls.items()}
    out["mAP"] = sum(aps) / len(aps)
    if shortlist is not None:
        out["R@S"] = sum(rs) / len(rs)
    return out, aps, excluded


def random_case(seed, nq=40, ng=60, n_ids=15, depth=20):
    rng = np.random.default_rng(seed)
    gallery_ids = rng.integers(0, n_ids, ng)
    # Scores with many ties (few distinct values), ranked with the stable tie rule.
    scores = torch.as_tensor(rng.integers(0, 4, (nq, ng)).astype(np.float32))
    indices = rank_scores(scores, depth).numpy()
    relevant = []
    for _ in range(nq):
        size = int(rng.integers(0, 4))  # 0..3 relevant ids, some not in the gallery
        relevant.append({int(x) for x in rng.integers(0, n_ids + 5, size)})
    return indices, gallery_ids, relevant, scores


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force(seed):
    indices, gallery_ids, relevant, _ = random_case(seed)
    shortlist = indices[:, :7]
    res = evaluate(indices, gallery_ids, relevant, shortlist=shortlist)
    expected, aps, excluded = brute_force(indices, list(gallery_ids), relevant, shortlist=shortlist)
    for key, value in expected.items():
        assert res.metrics[key] == pytest.approx(value, abs=1e-12), key
    np.testing.assert_allclose(res.per_query_ap, aps, atol=1e-12)
    assert res.excluded.tolist() == excluded
    assert res.metrics["excluded"] == len(excluded)
    assert res.metrics["queries"] == len(relevant) - len(excluded)
    assert set(res.metrics) == {"R@1", "R@5", "R@10", "mAP", "R@S", "queries", "excluded"}


def test_rank_scores_breaks_ties_by_gallery_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    assert rank_scores(scores).tolist() == [[1, 2, 4, 0, 3]]
    # independent: Python's sort is stable
    expected = sorted(range(5), key=lambda i: -scores[0, i].item())
    assert rank_scores(scores, 3).tolist() == [expected[:3]]


def test_truncated_list_can_only_lower_ap():
    gallery_ids = np.array([0, 1, 0, 2, 0])
    relevant = [{0}]
    full = evaluate(np.array([[0, 1, 2, 3, 4]]), gallery_ids, relevant)
    short = evaluate(np.array([[0, 1]]), gallery_ids, relevant)
    # full: hits at ranks 1, 3, 5 -> (1 + 2/3 + 3/5) / 3 ; truncated: only rank 1 -> 1/3
    assert full.metrics["mAP"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert short.metrics["mAP"] == pytest.approx(1 / 3)
    assert short.metrics["R@1"] == 1.0


def test_several_relevant_ids_and_padding():
    gallery_ids = torch.tensor([5, 6, 7, 8])
    indices = torch.tensor([[3, 1, -1, -1], [2, 0, 1, 3]])
    relevant = [{6, 8}, {9, 7}]
    res = evaluate(indices, gallery_ids, relevant, ks=(1, 2))
    assert res.metrics["R@1"] == 1.0
    assert res.per_query_ap.tolist() == pytest.approx([1.0, 1.0])


def test_excluded_queries_are_reported_not_counted():
    gallery_ids = np.array([0, 1, 2])
    indices = np.array([[0, 1, 2], [2, 1, 0], [1, 0, 2]])
    relevant = [{0}, {42}, {2}]
    res = evaluate(indices, gallery_ids, relevant)
    assert res.excluded.tolist() == [1]
    assert res.evaluated.tolist() == [0, 2]
    assert res.metrics["R@1"] == 0.5  # query 0 hit, query 2 miss; query 1 not counted
    assert res.metrics["excluded"] == 1


def test_all_excluded_is_an_error():
    with pytest.raises(DataError, match="relevant gallery image"):
        evaluate(np.array([[0]]), np.array([1]), [{2}])


def test_shape_errors():
    with pytest.raises(ValueError, match="relevant has"):
        evaluate(np.zeros((2, 3), dtype=int), np.arange(3), [{0}])
    with pytest.raises(ValueError, match="gallery has"):
        evaluate(np.array([[5]]), np.arange(3), [{0}])


def test_bootstrap_ci_brackets_the_mean_and_is_deterministic():
    ap = np.random.default_rng(0).uniform(size=200)
    lo, hi = bootstrap_ci(ap, n_resamples=500, seed=1)
    assert lo < ap.mean() < hi
    assert (lo, hi) == bootstrap_ci(ap, n_resamples=500, seed=1)
    # independent estimate of the standard error: the interval is about +-1.96 SE wide
    se = ap.std(ddof=1) / np.sqrt(ap.size)
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
