"""Token selectors against loop-based readings of their definitions."""

from __future__ import annotations

import pytest
import torch

from craterlab.errors import ConfigError
from craterlab.plugins import get_registry
from craterlab.testing import random_features
from craterlab.tokens import selection
from craterlab.types import Features


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def ref_score(f: Features, n: int, i: int, name: str) -> float:
    """The score of token i of image n, one token at a time."""
    tok = f.tokens[n, i].double()
    cos = float(unit(tok) @ unit(f.cls[n].double()))
    if name == "attention":
        return float(f.attn[n, i])
    if name == "norm":
        return float(tok.norm())
    if name == "norm_attention":
        return float(tok.norm()) * float(f.attn[n, i])
    if name == "cls_similarity":
        return cos
    if name == "cls_distance":
        return 1.0 - cos
    raise AssertionError(name)


SCORED = ["attention", "norm", "norm_attention", "cls_similarity", "cls_distance"]


def build(name: str, k: int | None = None, **extra: object) -> object:
    cfg = {"name": name, **({} if k is None else {"k": k}), **extra}
    return get_registry().build("selector", cfg)


@pytest.mark.parametrize("name", SCORED)
@pytest.mark.parametrize("k", [1, 5, 16])
def test_scored_selectors_match_loop_reference(name: str, k: int) -> None:
    f = random_features(3, (4, 4), 8, seed=k)
    got = build(name, k)(f).vectors
    for n in range(len(f)):
        scores = [ref_score(f, n, i, name) for i in range(16)]
        order = sorted(range(16), key=lambda i: -scores[i])[:k]
        expected = torch.stack([unit(f.tokens[n, i]) for i in order])
        torch.testing.assert_close(got[n], expected)


@pytest.mark.parametrize("name", SCORED + ["random", "grid"])
def test_unit_norm_shape_and_distinct_tokens(name: str) -> None:
    f = random_features(4, (5, 5), 8, seed=1)
    sel = build(name, 7)
    out = sel(f).vectors
    assert out.shape == (4, 7, 8)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4, 7))
    gram = out @ out.transpose(1, 2)
    off = gram - torch.eye(7)
    assert bool((off < 1 - 1e-5).all()), "a token was selected twice"


@pytest.mark.parametrize("name", SCORED)
def test_permuting_tokens_keeps_the_selected_tokens(name: str) -> None:
    f = random_features(2, (4, 4), 8, seed=2)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    g = Features(cls=f.cls, tokens=f.tokens[:, perm], attn=f.attn[:, perm], grid=f.grid)
    torch.testing.assert_close(build(name, 6)(f).vectors, build(name, 6)(g).vectors)


@pytest.mark.parametrize("name", SCORED + ["random", "grid", "all"])
def test_batch_equals_one_at_a_time(name: str) -> None:
    f = random_features(5, (4, 4), 8, seed=3)
    k = None if name == "all" else 6
    sel = build(name, k)
    batch = sel(f).vectors
    single = torch.cat([sel(f[i : i + 1]).vectors for i in range(len(f))])
    torch.testing.assert_close(batch, single)


def test_random_is_seeded_per_image_and_repeatable() -> None:
    f = random_features(3, (4, 4), 8, seed=4)
    sel = build("random", 8, seed=0)
    a = sel.indices(f)
    assert torch.equal(a, sel.indices(f)), "the same images must get the same draw again"
    assert torch.equal(a, build("random", 8, seed=0).indices(f))
    assert torch.equal(a[[2, 0]], sel.indices(f[torch.tensor([2, 0])]))
    assert not torch.equal(a[0], a[1]), "two images drew the same random tokens"
    assert not torch.equal(a, build("random", 8, seed=1).indices(f))
    assert all(len(set(row.tolist())) == 8 for row in a)


def test_random_is_roughly_uniform_over_positions() -> None:
    f = random_features(2000, (4, 4), 2, seed=5)
    idx = build("random", 4, seed=3).indices(f)
    counts = torch.bincount(idx.flatten(), minlength=16).float()
    expected = 2000 * 4 / 16
    assert bool(((counts - expected).abs() < 0.15 * expected).all()), counts


def test_grid_positions_are_spread_uniformly() -> None:
    assert selection.grid_positions((4, 4), 4).tolist() == [5, 7, 13, 15]
    assert selection.grid_positions((4, 4), 16).tolist() == list(range(16))
    for k in (1, 5, 16, 32, 64, 100, 196):
        pos = selection.grid_positions((14, 14), k)
        assert len(set(pos.tolist())) == k
        assert pos.tolist() == sorted(pos.tolist())
        rows, cols = pos // 14, pos % 14
        if k >= 16:  # every quarter of the grid gets about a quarter of the tokens
            quarter = ((rows < 7).long() * 2 + (cols < 7).long()).bincount(minlength=4)
            assert bool((quarter >= k // 4 - k // 8 - 1).all()), (k, quarter)


def test_grid_selector_takes_the_grid_tokens() -> None:
    f = random_features(2, (4, 4), 8, seed=6)
    got = build("grid", 4)(f).vectors
    expected = torch.nn.functional.normalize(f.tokens[:, [5, 7, 13, 15]], dim=-1)
    torch.testing.assert_close(got, expected)


def test_all_returns_every_token_in_raster_order() -> None:
    f = random_features(2, (3, 3), 8, seed=7)
    got = build("all")(f).vectors
    torch.testing.assert_close(got, torch.nn.functional.normalize(f.tokens, dim=-1))


def test_attention_selectors_without_attention_name_the_alternatives() -> None:
    f = random_features(2, (4, 4), 8, attention=False)
    for name in ("attention", "norm_attention"):
        with pytest.raises(ConfigError, match="without attention: selector=norm"):
            build(name, 3)(f)
    assert build("norm", 3)(f).vectors.shape == (2, 3, 8)


def test_k_larger_than_token_count_is_an_error_that_says_so() -> None:
    f = random_features(2, (4, 4), 8)
    for name in SCORED + ["random", "grid"]:
        with pytest.raises(ConfigError, match="k=17 is larger than the number of patch tokens"):
            build(name, 17)(f)
    with pytest.raises(ConfigError, match="at least 1"):
        build("norm", 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", SCORED + ["random", "grid", "all"])
def test_cpu_and_cuda_agree(name: str) -> None:
    f = random_features(8, (14, 14), 64, seed=8)
    k = None if name == "all" else 16
    cpu = build(name, k)(f).vectors
    gpu = build(name, k)(f.to("cuda")).vectors.cpu()
    torch.testing.assert_close(cpu, gpu, atol=1e-5, rtol=1e-5)
