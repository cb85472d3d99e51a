"""Poolings against loop-based readings of their definitions."""

from __future__ import annotations

import pytest
import torch

from craterlab.errors import ConfigError
from craterlab.plugins import get_registry
from craterlab.testing import random_features
from craterlab.tokens.aggregation import InstanceAggregator
from craterlab.tokens.baselines import NetVLADPooling
from craterlab.types import Features


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def build(name: str, **cfg: object) -> object:
    return get_registry().build("pooling", {"name": name, **cfg})


def ref_pool(f: Features, name: str, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Per image, per dimension, one token at a time."""
    n, t, d = f.tokens.shape
    out = torch.zeros(n, d, dtype=torch.float64)
    for i in range(n):
        if name == "cls":
            out[i] = f.cls[i].double()
            continue
        for j in range(d):
            col = [float(f.tokens[i, s, j]) for s in range(t)]
            if name == "mean":
                out[i, j] = sum(col) / t
            elif name == "max":
                out[i, j] = max(col)
            elif name == "gem":
                out[i, j] = (sum(max(x, eps) ** p for x in col) / t) ** (1.0 / p)
        out[i] = unit(out[i])
    return torch.nn.functional.normalize(out, dim=-1).float()


@pytest.mark.parametrize("name", ["cls", "mean", "max", "gem"])
def test_matches_loop_reference(name: str) -> None:
    f = random_features(3, (3, 3), 6, seed=1)
    torch.testing.assert_close(build(name)(f), ref_pool(f, name), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [1.0, 2.0, 4.5])
def test_gem_p_is_configurable(p: float) -> None:
    f = random_features(2, (3, 3), 6, seed=2)
    torch.testing.assert_close(build("gem", p=p)(f), ref_pool(f, "gem", p=p), atol=1e-5, rtol=1e-5)


def test_gem_large_p_tends_to_max_of_clamped_tokens() -> None:
    f = random_features(2, (3, 3), 6, seed=3)
    f.tokens = f.tokens.abs() + 0.1
    torch.testing.assert_close(build("gem", p=200.0)(f), build("max")(f), atol=2e-2, rtol=0)


@pytest.mark.parametrize("name", ["cls", "mean", "max", "gem", "instance"])
def test_unit_norm_permutation_invariance_and_batching(name: str) -> None:
    f = random_features(4, (4, 4), 8, seed=4)
    pool = build(name, k=4) if name == "instance" else build(name)
    v = pool(f)
    assert v.shape == (4, 8)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(4))
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    g = Features(cls=f.cls, tokens=f.tokens[:, perm], attn=f.attn[:, perm], grid=f.grid)
    torch.testing.assert_close(pool(g), v)
    torch.testing.assert_close(torch.cat([pool(f[i : i + 1]) for i in range(4)]), v)


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_instance_pooling_reduces_the_instance_tokens(reduce: str) -> None:
    f = random_features(3, (4, 4), 8, seed=5)
    z = InstanceAggregator(k=5, seeds="fps")(f).vectors
    got = build("instance", k=5, reduce=reduce, seeds="fps")(f)
    for n in range(3):
        if reduce == "mean":
            expected = unit(sum(z[n, j] for j in range(5)))
        else:
            expected = unit(
                torch.tensor([max(float(z[n, j, d]) for j in range(5)) for d in range(8)])
            )
        torch.testing.assert_close(got[n], expected, atol=1e-6, rtol=1e-5)


def ref_soft_vlad(f: Features, centers: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft VLAD of each image by loops over tokens and clusters."""
    out = []
    k, d = centers.shape
    for n in range(len(f)):
        res = [torch.zeros(d, dtype=torch.float64) for _ in range(k)]
        for i in range(f.tokens.shape[1]):
            x = unit(f.tokens[n, i].double())
            logits = torch.tensor(
                [-float((x - centers[j].double()).pow(2).sum()) / temperature for j in range(k)]
            )
            a = torch.softmax(logits, 0)
            for j in range(k):
                res[j] = res[j] + a[j] * (x - centers[j].double())
        out.append(unit(torch.cat([unit(r) for r in res])))
    return torch.stack(out).float()


def test_netvlad_soft_vlad_matches_loop_reference() -> None:
    gallery = random_features(30, (3, 3), 6, seed=6)
    pool = NetVLADPooling(clusters=3, temperature=0.2)
    pool.fit(gallery)
    f = random_features(3, (3, 3), 6, seed=7)
    torch.testing.assert_close(
        pool.soft_vlad(f), ref_soft_vlad(f, pool.centers, 0.2), atol=1e-5, rtol=1e-5
    )


def test_netvlad_whitening_decorrelates_the_gallery() -> None:
    gallery = random_features(200, (3, 3), 4, seed=8)  # 200 samples, 3 * 4 = 12 VLAD dims
    pool = NetVLADPooling(clusters=3, temperature=0.2)
    pool.fit(gallery)
    v = pool.soft_vlad(gallery).double()
    y = (v - pool.mean.double()) @ pool.projection.double().T  # before the final L2 norm
    cov = y.T @ y / (len(y) - 1)
    torch.testing.assert_close(cov, torch.eye(4, dtype=torch.float64), atol=1e-3, rtol=0)
    out = pool(gallery)
    assert out.shape == (200, 4)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(200))


def test_netvlad_tiny_gallery_pads_missing_components_with_zeros() -> None:
    gallery = random_features(5, (4, 4), 8, seed=9)  # rank <= 4 < D = 8
    pool = NetVLADPooling(clusters=4)
    pool.fit(gallery)
    out = pool(random_features(3, (4, 4), 8, seed=10))
    assert out.shape == (3, 8)
    assert bool((out[:, 4:] == 0).all())
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


def test_netvlad_fits_on_fp16_features_and_needs_fit() -> None:
    gallery = random_features(20, (3, 3), 6, seed=11)
    gallery.tokens = gallery.tokens.half()
    pool = build("netvlad", clusters=2)
    with pytest.raises(RuntimeError, match="fit"):
        pool(gallery)
    pool.fit(gallery)
    assert pool(gallery).dtype == torch.float32


def test_invalid_values_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="p must be positive"):
        build("gem", p=0.0)
    with pytest.raises(ConfigError):
        build("instance", reduce="median")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["cls", "mean", "max", "gem", "instance", "netvlad"])
def test_cpu_and_cuda_agree(name: str) -> None:
    f = random_features(16, (14, 14), 64, seed=12)
    pool = build(name, k=8) if name == "instance" else build(name)
    if name == "netvlad":
        pool.fit(f)
    torch.testing.assert_close(pool(f), pool(f.to("cuda")).cpu(), atol=1e-4, rtol=1e-4)
