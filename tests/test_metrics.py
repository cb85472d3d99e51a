"""Metrics against an independent brute-force (Python loop) computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import craterlab.metrics as metrics_module
from craterlab.errors import ConfigError, DataError
from craterlab.metrics import (
    bootstrap_ci,
    confidence_intervals,
    evaluate,
    rank_scores,
    resolve_depth,
)


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
    out.update(brute_force_alternatives(indices, gallery_ids, relevant, ks))
    return out, aps, excluded


def brute_force_alternatives(indices, gallery_ids, relevant, ks):
    """recall@k, identity-level AP and AP over retrieved relevant images, one query at a time."""
    recall = {k: [] for k in ks}
    ap_identity, ap_retrieved = [], []
    for q, rel in enumerate(relevant):
        n_rel = sum(1 for g in gallery_ids if g in rel)
        if n_rel == 0:
            continue
        ranked = [int(i) for i in indices[q] if i >= 0]
        flags = [gallery_ids[i] in rel for i in ranked]
        for k in ks:
            recall[k].append(sum(flags[:k]) / n_rel)
        # AP over the relevant images that the list retrieved
        found, total = 0, 0.0
        for rank, flag in enumerate(flags, start=1):
            if flag:
                found += 1
                total += found / rank
        ap_retrieved.append(total / found if found else 0.0)
        # identity level: the list of distinct craters in order of first appearance
        craters = []
        for i in ranked:
            if gallery_ids[i] not in craters:
                craters.append(gallery_ids[i])
        n_ids = len({g for g in gallery_ids if g in rel})
        found, total = 0, 0.0
        for rank, crater in enumerate(craters, start=1):
            if crater in rel:
                found += 1
                total += found / rank
        ap_identity.append(total / n_ids)
    out = {f"recall@{k}": sum(v) / len(v) for k, v in recall.items()}
    out["mAP_identity"] = sum(ap_identity) / len(ap_identity)
    out["mAP_retrieved"] = sum(ap_retrieved) / len(ap_retrieved)
    return out


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
    assert set(res.metrics) == {
        *("R@1", "R@5", "R@10", "mAP", "R@S", "queries", "excluded"),
        *("recall@1", "recall@5", "recall@10", "mAP_identity", "mAP_retrieved"),
    }


@pytest.mark.parametrize("seed", range(3))
def test_chunked_evaluation_equals_one_chunk(seed, monkeypatch):
    indices, gallery_ids, relevant, _ = random_case(seed, depth=60)
    whole = evaluate(indices, gallery_ids, relevant, shortlist=indices[:, :5])
    monkeypatch.setattr(metrics_module, "_CHUNK_CELLS", 7 * 60)  # 7 queries per chunk
    chunked = evaluate(indices, gallery_ids, relevant, shortlist=indices[:, :5])
    assert chunked.metrics == whole.metrics
    for key, values in whole.per_query.items():
        np.testing.assert_array_equal(chunked.per_query[key], values, err_msg=key)


def test_alternative_definitions_on_a_worked_example():
    # gallery: craters 0, 0, 1, 2, 1 ; the query is relevant to craters 0 and 2 (3 images)
    gallery_ids = np.array([0, 0, 1, 2, 1])
    ranked = np.array([[2, 0, 4, 1, 3]])  # crater order 1, 0, 1, 0, 2
    res = evaluate(ranked, gallery_ids, [{0, 2}], ks=(1, 2))
    # standard AP: hits at ranks 2, 4, 5 over 3 relevant images
    assert res.metrics["mAP"] == pytest.approx((1 / 2 + 2 / 4 + 3 / 5) / 3)
    # retrieved-only AP of the top 4: hits at 2, 4 over the 2 found (not the 3 relevant)
    top4 = evaluate(ranked[:, :4], gallery_ids, [{0, 2}])
    assert top4.metrics["mAP_retrieved"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    # identity level: crater list 1, 0, 2 -> hits at 2 and 3 over 2 relevant craters
    assert res.metrics["mAP_identity"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert res.metrics["recall@2"] == pytest.approx(1 / 3)
    assert res.metrics["R@2"] == 1.0


def test_resolve_depth():
    assert resolve_depth("all", 500) == 500
    assert resolve_depth(None, 500) == 500
    assert resolve_depth(100, 500) == 100
    assert resolve_depth("1000", 500) == 500
    for bad in ("most", 0, -3, 2.5):
        with pytest.raises(ConfigError, match=r"depth=.* is not a ranked-list length"):
            resolve_depth(bad, 500)


def test_confidence_intervals_of_map_and_r_at_1():
    indices, gallery_ids, relevant, _ = random_case(0, nq=200)
    res = evaluate(indices, gallery_ids, relevant)
    ci = confidence_intervals(res, n_resamples=300, seed=0)
    assert ci["mAP_ci_low"] <= res.metrics["mAP"] <= ci["mAP_ci_high"]
    assert ci["R@1_ci_low"] <= res.metrics["R@1"] <= ci["R@1_ci_high"]
    # the R@1 interval is the bootstrap of the per-query hits, computed independently here
    hits = np.array(
        [1.0 if gallery_ids[indices[q, 0]] in relevant[q] else 0.0 for q in res.evaluated]
    )
    assert (ci["R@1_ci_low"], ci["R@1_ci_high"]) == bootstrap_ci(hits, n_resamples=300, seed=0)


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
