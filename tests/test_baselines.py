"""Baselines (per-image K-means, medoids, VLAD) against loop-based readings of their definitions."""

from __future__ import annotations

import pytest
import torch

from craterlab.errors import ConfigError
from craterlab.plugins import get_registry
from craterlab.testing import random_features
from craterlab.tokens.baselines import (
    KMeansAggregator,
    MedoidAggregator,
    VLADAggregator,
    global_kmeans,
    sample_tokens,
)
from craterlab.tokens.common import random_keys
from craterlab.types import Features


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def ref_lloyd(points: list[torch.Tensor], init: list[int], iters: int) -> list[torch.Tensor]:
    """Lloyd's algorithm on one image, one point at a time."""
    cents = [points[i].clone() for i in init]
    for _ in range(iters):
        groups: list[list[torch.Tensor]] = [[] for _ in cents]
        for x in points:
            d = [float((x - c).pow(2).sum()) for c in cents]
            groups[d.index(min(d))].append(x)
        cents = [sum(g) / len(g) if g else c for g, c in zip(groups, cents, strict=True)]
    return cents


def image_points(f: Features, n: int) -> list[torch.Tensor]:
    return [unit(f.tokens[n, i].double()) for i in range(f.tokens.shape[1])]


def initial_tokens(seed: int, f: Features, k: int) -> torch.Tensor:
    """The seeded init: K distinct tokens per image (the draw itself is tested separately)."""
    return torch.topk(random_keys(seed, f.cls, f.tokens.shape[1]), k, dim=1).indices


@pytest.mark.parametrize("k", [1, 4, 9])
def test_kmeans_matches_loop_lloyd(k: int) -> None:
    f = random_features(3, (3, 3), 4, seed=k)
    got = KMeansAggregator(k=k, iters=20, seed=5)(f).vectors
    init = initial_tokens(5, f, k)
    for n in range(3):
        cents = ref_lloyd(image_points(f, n), init[n].tolist(), 20)
        expected = torch.stack([unit(c) for c in cents]).float()
        torch.testing.assert_close(got[n], expected, atol=1e-5, rtol=1e-5)


def test_kmeans_init_draws_distinct_tokens_and_depends_on_seed() -> None:
    f = random_features(50, (4, 4), 4, seed=1)
    a = initial_tokens(0, f, 8)
    assert all(len(set(row.tolist())) == 8 for row in a)
    assert not torch.equal(a, initial_tokens(1, f, 8))
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("cls", [KMeansAggregator, MedoidAggregator])
def test_batch_equals_one_at_a_time_and_is_seeded(cls: type) -> None:
    f = random_features(5, (4, 4), 8, seed=2)
    agg = cls(k=5, seed=3)
    batch = agg(f).vectors
    single = torch.cat([agg(f[i : i + 1]).vectors for i in range(5)])
    torch.testing.assert_close(cls(k=5, seed=3)(f).vectors, batch)
    torch.testing.assert_close(batch, single)
    torch.testing.assert_close(batch.norm(dim=-1), torch.ones(5, 5))


def test_medoids_are_the_real_tokens_nearest_each_centroid() -> None:
    f = random_features(3, (4, 4), 8, seed=4)
    km = KMeansAggregator(k=4, seed=1)
    _, cents = km.centroids(f)
    got = MedoidAggregator(k=4, seed=1)(f).vectors
    for n in range(3):
        points = image_points(f, n)
        for j in range(4):
            d = [float((x - cents[n, j].double()).pow(2).sum()) for x in points]
            # a real token of the image (a two-token cluster's centroid ties; either is fine)
            chosen = [i for i, x in enumerate(points) if torch.allclose(got[n, j].double(), x)]
            assert len(chosen) == 1
            assert d[chosen[0]] <= min(d) + 1e-6


def test_kmeans_with_k_equal_to_token_count_returns_every_token() -> None:
    f = random_features(2, (2, 2), 8, seed=5)
    got = KMeansAggregator(k=4)(f).vectors
    x = torch.nn.functional.normalize(f.tokens, dim=-1)
    # each centroid is one token (its own cluster); compare as sets
    for n in range(2):
        assert torch.allclose((got[n] @ x[n].T).max(dim=1).values, torch.ones(4), atol=1e-6)


def ref_vlad(f: Features, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k, d = centers.shape
    vecs = torch.zeros(len(f), k, d)
    mask = torch.zeros(len(f), k, dtype=torch.bool)
    for n in range(len(f)):
        res = [torch.zeros(d, dtype=torch.float64) for _ in range(k)]
        for x in image_points(f, n):
            dist = [float((x - centers[j].double()).pow(2).sum()) for j in range(k)]
            j = dist.index(min(dist))
            res[j] = res[j] + (x - centers[j].double())
            mask[n, j] = True
        for j in range(k):
            vecs[n, j] = unit(res[j] if mask[n, j] else centers[j].double()).float()
    return vecs, mask


def test_vlad_matches_loop_reference_and_masks_empty_centroids() -> None:
    gallery = random_features(40, (3, 3), 4, seed=6)
    vlad = VLADAggregator(k=6, seed=2)
    vlad.fit(gallery)
    f = random_features(4, (3, 3), 4, seed=7)
    out = vlad(f)
    vecs, mask = ref_vlad(f, vlad.centers)
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.vectors, vecs, atol=1e-5, rtol=1e-5)
    assert not bool(mask.all()), "the test should cover centroids an image has no token in"
    torch.testing.assert_close(out.vectors.norm(dim=-1), torch.ones(4, 6))
    single = torch.cat([vlad(f[i : i + 1]).vectors for i in range(4)])
    torch.testing.assert_close(single, out.vectors)


def test_vlad_needs_fit_and_a_large_enough_gallery() -> None:
    f = random_features(2, (3, 3), 4)
    with pytest.raises(RuntimeError, match=r"fit\(gallery_features\)"):
        VLADAggregator(k=2)(f)
    with pytest.raises(ValueError, match="cannot learn 30 centroids from 18 gallery tokens"):
        VLADAggregator(k=30, fit_tokens=1000).fit(f)


def test_global_kmeans_matches_loop_lloyd() -> None:
    points = torch.nn.functional.normalize(
        torch.randn(60, 5, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    got = global_kmeans(points, 4, 20, seed=3)
    init = torch.randperm(60, generator=torch.Generator().manual_seed(3))[:4].tolist()
    expected = ref_lloyd([p.double() for p in points], init, 20)
    torch.testing.assert_close(got, torch.stack(expected).float(), atol=1e-5, rtol=1e-5)


def test_sample_tokens_reads_a_bounded_sample_of_real_tokens_from_fp16() -> None:
    f = random_features(300, (4, 4), 8, seed=8)
    f.tokens = f.tokens.half()
    sample = sample_tokens(f, max_tokens=500, seed=0, chunk=64)
    assert sample.dtype == torch.float32 and sample.shape == (500, 8)
    x = torch.nn.functional.normalize(f.tokens.float().reshape(-1, 8), dim=-1)
    assert bool(((sample @ x.T).max(dim=1).values > 1 - 1e-5).all())
    assert torch.equal(sample, sample_tokens(f, max_tokens=500, seed=0, chunk=64))
    everything = sample_tokens(f, max_tokens=10_000, seed=0)
    assert everything.shape == (300 * 16, 8)


def test_registry_builds_every_baseline_and_rejects_bad_values() -> None:
    registry = get_registry()
    for name in ("kmeans", "medoids", "vlad"):
        assert registry.build("aggregator", {"name": name, "k": 3, "seed": 1}) is not None
    with pytest.raises(ConfigError, match="iters must be at least 1"):
        registry.build("aggregator", {"name": "kmeans", "k": 3, "iters": 0})
    f = random_features(2, (3, 3), 4)
    with pytest.raises(ConfigError, match="larger than the number of patch tokens"):
        KMeansAggregator(k=10)(f)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["kmeans", "medoids", "vlad"])
def test_cpu_and_cuda_agree(name: str) -> None:
    f = random_features(8, (14, 14), 64, seed=9)
    registry = get_registry()
    cpu_agg = registry.build("aggregator", {"name": name, "k": 16, "seed": 0})
    gpu_agg = registry.build("aggregator", {"name": name, "k": 16, "seed": 0})
    if name == "vlad":
        cpu_agg.fit(f)
        gpu_agg.fit(f)
    cpu = cpu_agg(f)
    gpu = gpu_agg(f.to("cuda"))
    torch.testing.assert_close(cpu.vectors, gpu.vectors.cpu(), atol=1e-4, rtol=1e-4)
