"""Matchers against loop-based references of their definitions."""

from __future__ import annotations

import pytest
import torch

from craterlab.errors import ConfigError
from craterlab.matching import (
    Cosine,
    LateInteraction,
    late_interaction_rerank,
    late_interaction_score,
    rerank_cpu,
    run_blocks,
    score_cpu,
)
from craterlab.plugins import get_registry
from craterlab.testing import random_tokens
from craterlab.types import Tokens


def li_reference(q: Tokens, g: Tokens) -> torch.Tensor:
    """(1/Kq) sum_i max_j <q_i, g_j> over real tokens, by explicit loops in float64."""
    out = torch.empty(len(q), len(g), dtype=torch.float64)
    for a in range(len(q)):
        qi = [i for i in range(q.vectors.shape[1]) if q.mask is None or q.mask[a, i]]
        for b in range(len(g)):
            gj = [j for j in range(g.vectors.shape[1]) if g.mask is None or g.mask[b, j]]
            if not gj:
                out[a, b] = float("-inf")
                continue
            total = 0.0
            for i in qi:
                total += max(
                    float(torch.dot(q.vectors[a, i].double(), g.vectors[b, j].double())) for j in gj
                )
            out[a, b] = total / max(1, len(qi))
    return out


def masked(t: Tokens, seed: int) -> Tokens:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(t.vectors.shape[:2], generator=g) > 0.3
    mask[:, 0] = True
    return Tokens(t.vectors, mask)


def test_late_interaction_matches_loop_reference_with_masks() -> None:
    q = masked(random_tokens(5, 4, 8, seed=1), seed=2)
    g = masked(random_tokens(7, 6, 8, seed=3), seed=4)
    g.mask[3] = False  # an empty gallery item scores -inf
    got = LateInteraction("cpu").score(q, g)
    ref = li_reference(q, g)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin].double(), ref[fin], atol=1e-5, rtol=0)


def test_no_mask_equals_all_true_mask() -> None:
    q, g = random_tokens(3, 4, 8, seed=5), random_tokens(6, 5, 8, seed=6)
    full = LateInteraction("cpu").score(q, g)
    q2 = Tokens(q.vectors, torch.ones(3, 4, dtype=torch.bool))
    g2 = Tokens(g.vectors, torch.ones(6, 5, dtype=torch.bool))
    torch.testing.assert_close(LateInteraction("cpu").score(q2, g2), full)
    torch.testing.assert_close(full.double(), li_reference(q, g), atol=1e-5, rtol=0)


def test_tiled_equals_untiled() -> None:
    q = masked(random_tokens(9, 4, 16, seed=7), seed=8)
    g = masked(random_tokens(50, 5, 16, seed=9), seed=10)
    big = late_interaction_score(q, g, tile_bytes=1 << 30)
    tiny = late_interaction_score(q, g, tile_bytes=64)  # one gallery image and query per tile
    torch.testing.assert_close(tiny, big)


def test_rerank_equals_exhaustive_restricted_to_candidates() -> None:
    q = masked(random_tokens(6, 4, 8, seed=11), seed=12)
    g = masked(random_tokens(20, 5, 8, seed=13), seed=14)
    full = late_interaction_score(q, g)
    cand = torch.stack(
        [torch.randperm(20, generator=torch.Generator().manual_seed(i))[:7] for i in range(6)]
    )
    got = late_interaction_rerank(q, cand, g, chunk_bytes=1)  # one query per chunk
    torch.testing.assert_close(got, full.gather(1, cand))
    torch.testing.assert_close(LateInteraction("cpu").rerank(q, g, cand), full.gather(1, cand))


def test_rerank_missing_candidate_scores_minus_inf() -> None:
    q, g = random_tokens(2, 3, 8, seed=15), random_tokens(5, 3, 8, seed=16)
    cand = torch.tensor([[0, -1], [4, 2]])
    got = late_interaction_rerank(q, cand, g)
    assert got[0, 1] == float("-inf") and torch.isfinite(got[1]).all()


def test_cosine_single_vectors_and_pooled_tokens() -> None:
    q, g = random_tokens(3, 1, 8, seed=17), random_tokens(4, 1, 8, seed=18)
    ref = q.vectors[:, 0] @ g.vectors[:, 0].T
    torch.testing.assert_close(Cosine("cpu").score(q, g), ref)
    cand = torch.tensor([[3, 1], [0, 0], [2, 3]])
    torch.testing.assert_close(Cosine("cpu").rerank(q, g, cand), ref.gather(1, cand))
    gk = Tokens(random_tokens(4, 3, 8, seed=19).vectors, torch.tensor([[1, 1, 0]] * 4).bool())
    pooled = torch.nn.functional.normalize(gk.vectors[:, :2].mean(1), dim=-1)
    torch.testing.assert_close(Cosine("cpu").score(q, gk), q.vectors[:, 0] @ pooled.T)


def test_registry_builds_matchers_and_rejects_bad_values() -> None:
    reg = get_registry()
    assert isinstance(reg.build("matcher", {"name": "late_interaction"}), LateInteraction)
    assert isinstance(reg.build("matcher", {"name": "cosine", "device": "cpu"}), Cosine)
    with pytest.raises(ConfigError, match="tile_mb"):
        reg.build("matcher", {"name": "late_interaction", "tile_mb": 0})
    with pytest.raises(ConfigError, match="device"):
        reg.build("matcher", {"name": "late_interaction", "device": "tpu"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    q, g = random_tokens(8, 4, 32, seed=20), random_tokens(40, 6, 32, seed=21)
    cpu = LateInteraction("cpu").score(q, g)
    gpu = LateInteraction("cuda").score(q, g)
    torch.testing.assert_close(gpu, cpu, atol=2e-3, rtol=0)


@pytest.mark.parametrize("workers", [1, 2])
def test_cpu_fast_paths_match_loop_reference(workers: int) -> None:
    """Threaded, buffer-reusing CPU paths (tiny blocks/tiles) == the loop definition."""
    q = masked(random_tokens(5, 4, 8, seed=30), seed=31)
    g = masked(random_tokens(9, 6, 8, seed=32), seed=33)
    g.mask[2] = False  # empty gallery item: -inf
    ref = li_reference(q, g)
    for cache in (64, 1 << 20):  # one gallery image per tile, then one tile
        got = score_cpu(q, g.vectors, g.mask, workers=workers, cache_bytes=cache)
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        fin = torch.isfinite(ref)
        torch.testing.assert_close(got[fin].double(), ref[fin], atol=1e-5, rtol=0)
    cand = torch.tensor([[0, 2, 8, -1], [3, 3, 1, 0], [7, 6, 5, 4], [1, 0, 2, 8], [8, 7, 6, -1]])
    want = ref.gather(1, cand.clamp(min=0)).masked_fill(cand < 0, float("-inf"))
    for block in (1, 1 << 20):  # one query per block, then all queries in one block
        got = rerank_cpu(q, g.vectors, cand, g.mask, workers=workers, block_bytes=block)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        fin = torch.isfinite(want)
        torch.testing.assert_close(got[fin].double(), want[fin], atol=1e-5, rtol=0)
    half = rerank_cpu(q, g.vectors.half(), cand, g.mask, workers=workers)
    want_half = li_reference(q, Tokens(g.vectors.half().float(), g.mask))
    want_half = want_half.gather(1, cand.clamp(min=0)).masked_fill(cand < 0, float("-inf"))
    fin = torch.isfinite(want_half)
    torch.testing.assert_close(half[fin].double(), want_half[fin], atol=1e-5, rtol=0)


def test_run_blocks_runs_every_block_and_restores_threads() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    run_blocks(seen.append, 7, workers=2)
    assert sorted(seen) == list(range(7))
    assert torch.get_num_threads() == before
    with pytest.raises(ZeroDivisionError):  # a worker's error reaches the caller
        run_blocks(lambda b: 1 // (b - 3), 5, workers=2)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(("nq", "s", "block_bytes"), [(7, 5, 64), (3, 50, 64), (4, 9, 10**6)])
def test_rerank_blocks_cover_every_pair_once_within_budget(nq, s, block_bytes) -> None:
    from craterlab.matching import rerank_blocks

    candidate_bytes = 8
    nblocks, bounds = rerank_blocks(nq, s, candidate_bytes, block_bytes)
    seen = torch.zeros(nq, s, dtype=torch.int64)
    for b in range(nblocks):
        q0, q1, c0, c1 = bounds(b)
        seen[q0:q1, c0:c1] += 1
        assert (q1 - q0) * (c1 - c0) * candidate_bytes <= max(block_bytes, candidate_bytes)
    assert (seen == 1).all()
