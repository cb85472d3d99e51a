"""Instance-token aggregation against a loop-based reading of its definition."""

from __future__ import annotations

import math

import pytest
import torch

from craterlab.errors import ConfigError
from craterlab.plugins import get_registry
from craterlab.testing import random_features
from craterlab.tokens.aggregation import InstanceAggregator, cosine_gram, fps_seeds, inverse_norms
from craterlab.types import Features

TEMP = 0.05


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def ref_seeds(tokens: list[torch.Tensor], attn: list[float] | None, k: int, method: str) -> list:
    """Seeds of one image, by loops: attention order, or farthest-point sampling."""
    t = len(tokens)
    if method == "attention":
        return sorted(range(t), key=lambda i: -attn[i])[:k]
    if attn is not None:
        first = max(range(t), key=lambda i: attn[i])
    else:
        mean = unit(sum(tokens) / t)
        first = max(range(t), key=lambda i: float(tokens[i] @ mean))
    seeds = [first]
    while len(seeds) < k:
        best, best_d = None, -math.inf
        for i in range(t):
            if i in seeds:
                continue
            d = min(1.0 - float(tokens[i] @ tokens[s]) for s in seeds)
            if d > best_d:
                best, best_d = i, d
        seeds.append(best)
    return seeds


def ref_instance(features: Features, k: int, seeds_method: str, assign: str) -> torch.Tensor:
    """Loop reference: seeds, per-token weights, z_k = unit(seed + weighted mean)."""
    out = []
    for n in range(len(features)):
        tokens = [unit(features.tokens[n, i].double()) for i in range(features.tokens.shape[1])]
        attn = None if features.attn is None else [float(a) for a in features.attn[n]]
        seeds = ref_seeds(tokens, attn, k, seeds_method)
        sums = [torch.zeros_like(tokens[0]) for _ in seeds]
        mass = [0.0 for _ in seeds]
        for i, tok in enumerate(tokens):
            if i in seeds:
                continue
            cos = [float(tok @ tokens[s]) for s in seeds]
            order = sorted(range(k), key=lambda j: -cos[j])
            if assign == "hard":
                weights = {order[0]: 1.0}
            else:
                m = {"soft2": 2, "soft4": 4, "dense": k}[assign]
                top = order[: min(m, k)]
                exps = [math.exp(cos[j] / TEMP) for j in top]
                weights = {j: e / sum(exps) for j, e in zip(top, exps, strict=True)}
            for j, w in weights.items():
                sums[j] = sums[j] + w * tok
                mass[j] += w
        z = []
        for j, s in enumerate(seeds):
            mean = sums[j] / mass[j] if mass[j] > 0 else torch.zeros_like(tokens[0])
            z.append(unit(tokens[s] + mean))
        out.append(torch.stack(z))
    return torch.stack(out).float()


@pytest.mark.parametrize("seeds", ["attention", "fps"])
@pytest.mark.parametrize("assign", ["hard", "soft2", "soft4", "dense"])
@pytest.mark.parametrize("k", [1, 3, 7, 16])
def test_matches_loop_reference(seeds: str, assign: str, k: int) -> None:
    f = random_features(3, (4, 4), 8, seed=k)
    got = InstanceAggregator(k=k, seeds=seeds, assign=assign, temperature=TEMP)(f).vectors
    torch.testing.assert_close(got, ref_instance(f, k, seeds, assign), atol=1e-5, rtol=1e-5)


def test_fps_without_attention_matches_reference() -> None:
    f = random_features(3, (4, 4), 8, attention=False, seed=3)
    got = InstanceAggregator(k=5, seeds="fps")(f).vectors
    torch.testing.assert_close(got, ref_instance(f, 5, "fps", "hard"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seeds", ["attention", "fps"])
def test_seeds_returned_in_order(seeds: str) -> None:
    f = random_features(4, (5, 5), 8, seed=1)
    idx = InstanceAggregator(k=6, seeds=seeds).seed_indices(f)
    for n in range(len(f)):
        tokens = [unit(t.double()) for t in f.tokens[n]]
        ref = ref_seeds(tokens, [float(a) for a in f.attn[n]], 6, seeds)
        assert idx[n].tolist() == ref
    if seeds == "attention":
        a = torch.gather(f.attn, 1, idx)
        assert bool((a[:, :-1] >= a[:, 1:]).all())


def test_unit_norm_and_shape() -> None:
    f = random_features(5, (6, 6), 16, seed=2)
    z = InstanceAggregator(k=9, seeds="fps", assign="soft2")(f).vectors
    assert z.shape == (5, 9, 16)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(5, 9))


def test_empty_cluster_keeps_its_seed() -> None:
    # Tokens 0 and 1 have the highest attention (the seeds); tokens 2 and 3 lie near token 0,
    # so under hard assignment seed 1 gets no token and z_1 must be token 1 itself.
    e = torch.eye(4)
    tokens = torch.stack([e[0], e[1] * 3.0, e[0] + 0.1 * e[2], e[0] + 0.1 * e[3]]).unsqueeze(0)
    attn = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    f = Features(cls=torch.zeros(1, 4), tokens=tokens, attn=attn, grid=(2, 2))
    z = InstanceAggregator(k=2, seeds="attention", assign="hard")(f).vectors[0]
    torch.testing.assert_close(z[1], e[1])
    expected = unit(e[0] + (unit(tokens[0, 2]) + unit(tokens[0, 3])) / 2)
    torch.testing.assert_close(z[0], expected)


def test_k_equal_to_token_count_returns_the_tokens_in_seed_order() -> None:
    f = random_features(2, (3, 3), 8, seed=4)
    agg = InstanceAggregator(k=9, seeds="attention")
    idx = agg.seed_indices(f)
    expected = torch.nn.functional.normalize(
        torch.gather(f.tokens, 1, idx[..., None].expand(-1, -1, 8)), dim=-1
    )
    torch.testing.assert_close(agg(f).vectors, expected)


@pytest.mark.parametrize("seeds", ["attention", "fps"])
def test_permuting_tokens_does_not_change_instance_tokens(seeds: str) -> None:
    f = random_features(3, (4, 4), 8, seed=5)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    g = Features(cls=f.cls, tokens=f.tokens[:, perm], attn=f.attn[:, perm], grid=f.grid)
    agg = InstanceAggregator(k=5, seeds=seeds, assign="soft4")
    torch.testing.assert_close(agg(f).vectors, agg(g).vectors)


@pytest.mark.parametrize("seeds", ["attention", "fps"])
def test_batch_equals_one_at_a_time(seeds: str) -> None:
    f = random_features(6, (4, 4), 8, seed=6)
    agg = InstanceAggregator(k=4, seeds=seeds, assign="dense")
    batch = agg(f).vectors
    single = torch.cat([agg(f[i : i + 1]).vectors for i in range(len(f))])
    torch.testing.assert_close(batch, single)


def test_cosine_gram_and_fps_seeds_on_it() -> None:
    f = random_features(2, (4, 4), 8, seed=7)
    gram = cosine_gram(f.tokens, inverse_norms(f.tokens))
    for n in range(2):
        for a in range(16):
            for b in range(16):
                ref = float(unit(f.tokens[n, a]) @ unit(f.tokens[n, b]))
                assert abs(float(gram[n, a, b]) - ref) < 1e-5
    seeds = fps_seeds(gram, 5, f.attn.argmax(dim=1))
    assert torch.equal(seeds, InstanceAggregator(k=5, seeds="fps").seed_indices(f))


def test_errors_say_what_to_do() -> None:
    f = random_features(2, (4, 4), 8)
    with pytest.raises(ConfigError, match="larger than the number of patch tokens"):
        InstanceAggregator(k=17)(f)
    no_attn = random_features(2, (4, 4), 8, attention=False)
    with pytest.raises(ConfigError, match="seeds=fps"):
        InstanceAggregator(k=3, seeds="attention")(no_attn)
    registry = get_registry()
    with pytest.raises(ConfigError, match="at least 1"):
        registry.build("aggregator", {"name": "instance", "k": 0})
    with pytest.raises(ConfigError):
        registry.build("aggregator", {"name": "instance", "k": 3, "assign": "soft3"})


def test_none_aggregator_is_registered_and_builds_none() -> None:
    registry = get_registry()
    component = registry.get("aggregator", "none")
    assert "selector's tokens unchanged" in component.description
    assert registry.build("aggregator", {"name": "none"}) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seeds", ["attention", "fps"])
@pytest.mark.parametrize("assign", ["hard", "soft2", "dense"])
def test_cpu_and_cuda_agree(seeds: str, assign: str) -> None:
    f = random_features(8, (14, 14), 64, seed=8)
    agg = InstanceAggregator(k=16, seeds=seeds, assign=assign)
    cpu = agg(f).vectors
    gpu = agg(f.to("cuda")).vectors.cpu()
    torch.testing.assert_close(cpu, gpu, atol=1e-4, rtol=1e-4)
