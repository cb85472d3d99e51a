"""The fused C rerank kernel against the reference late interaction (and the blocked engine)
on random and adversarial inputs: ties, zeros, extreme scales, padding, odd shapes."""

from __future__ import annotations

import pytest
import torch

from craterlab.retrieval import cpu_engine as E
from craterlab.retrieval import fused
from craterlab.retrieval.late_interaction import late_interaction_pairs
from craterlab.retrieval.quantizers import quantize_int8, quantize_int8_per_image
from craterlab.types import Tokens

KINDS = ("int8_image", "int8", "bf16")


def need(kind: str) -> None:
    if not fused.available(kind):
        pytest.skip(f"fused {kind} kernel not available here (compiler or CPU flags)")


def gallery_of(kind: str, g: torch.Tensor, mask: torch.Tensor | None):
    """The engine's operand for ``kind`` and the float tokens it represents exactly."""
    if kind == "int8_image":
        codes, scales = quantize_int8_per_image(g)
        return E.GalleryCodes(codes, scales, mask), codes.double() * scales.double().unsqueeze(-1)
    if kind == "int8":
        codes, scales = quantize_int8(g)
        return E.GalleryCodes(codes, scales, mask), codes.double() * scales.double().unsqueeze(-1)
    rows = g.to(torch.bfloat16)
    return E.GalleryCodes(rows, None, mask), rows.double()


def query_as_scored(kind: str, q: torch.Tensor) -> torch.Tensor:
    """The query tokens the kernel actually multiplies (quantized for int8, bf16 for bf16)."""
    if kind == "bf16":
        return q.to(torch.bfloat16).double()
    codes, scales = quantize_int8(q)
    return codes.double() * scales.double().unsqueeze(-1)


def check(kind: str, q, qmask, g, gmask, cand, workers: int = 2) -> torch.Tensor:
    need(kind)
    codes, g_exact = gallery_of(kind, g, gmask)
    queries = Tokens(q, qmask)
    got = E.rerank(E.KERNELS[kind], queries, codes, cand, workers=workers, fused=True)
    want = late_interaction_pairs(
        Tokens(query_as_scored(kind, q), qmask), Tokens(g_exact, gmask), cand
    )
    assert torch.equal(torch.isneginf(got), torch.isneginf(want.float()))
    finite = torch.isfinite(want)
    scale = want[finite].abs().max().clamp(min=1e-30) if finite.any() else 1.0
    err = (got.double()[finite] - want[finite]).abs().max() if finite.any() else 0.0
    assert err <= 1e-5 * scale, (kind, err, scale)
    blocked = E.rerank(E.KERNELS[kind], queries, codes, cand, workers=workers, fused=False)
    if kind != "bf16":  # the blocked bf16 path rounds similarities to bf16; the fused one not
        torch.testing.assert_close(got, blocked, rtol=1e-5, atol=1e-6 * float(scale))
    return got


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("k", "kq", "d"), [(32, 32, 384), (11, 5, 64), (3, 17, 68), (9, 33, 8), (1, 1, 4)]
)
def test_matches_the_reference_on_random_inputs(kind, k, kq, d) -> None:
    n, nq, s = 40, 6, 13
    g, q = unit(n, k, d, seed=1), unit(nq, kq, d, seed=2)
    gmask = torch.rand(n, k, generator=torch.Generator().manual_seed(3)) > 0.25
    qmask = torch.rand(nq, kq, generator=torch.Generator().manual_seed(4)) > 0.25
    cand = torch.randint(-1, n, (nq, s), generator=torch.Generator().manual_seed(5))
    check(kind, q, qmask, g, gmask, cand)
    check(kind, q, None, g, None, cand, workers=1)


@pytest.mark.parametrize("kind", KINDS)
def test_ties_zeros_padding_and_missing_candidates(kind) -> None:
    n, k, d = 6, 8, 32
    g = unit(n, k, d, seed=7)
    g[1] = g[0]  # an exact tie: two identical items
    g[2] = 0.0  # an all-zero item (scale 0)
    gmask = torch.ones(n, k, dtype=torch.bool)
    gmask[3] = False  # an item with no real token: -inf
    gmask[4, 1:] = False  # one real token
    q = unit(3, 4, d, seed=8)
    q[1, 2] = 0.0  # a zero query token
    qmask = torch.ones(3, 4, dtype=torch.bool)
    qmask[2] = False  # a query with no real token: 0 everywhere (but -1 stays -inf)
    cand = torch.tensor([[0, 1, 2, 3, 4, -1], [1, 0, 5, 2, 3, 4], [0, 3, -1, 2, 1, 4]])
    got = check(kind, q, qmask, g, gmask, cand)
    assert got[0, 0] == got[0, 1] and got[1, 0] == got[1, 1]  # ties stay exactly tied
    assert got[0, 2] == 0.0 and torch.isneginf(got[0, 3]) and torch.isneginf(got[0, 5])
    assert torch.equal(got[2, [0, 1, 3, 4, 5]], torch.zeros(5)) and torch.isneginf(got[2, 2])


@pytest.mark.parametrize("kind", ["int8_image", "int8"])
@pytest.mark.parametrize("magnitude", [1e-20, 1e20])
def test_extreme_scales_and_saturated_codes(kind, magnitude) -> None:
    n, k, d = 5, 8, 384
    g = unit(n, k, d, seed=9) * magnitude
    g[0] = magnitude  # every code +127 ...
    q = unit(2, 16, d, seed=10)
    q[0] = -1.0  # ... against every query code -127: the largest |int32| dot product
    cand = torch.arange(n).repeat(2, 1)
    got = check(kind, q, None, g, None, cand)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("d", [384, 20, 8])  # vector path, vector + scalar tail, scalar only
def test_query_packing_gives_the_quantizers_codes(d) -> None:
    need("int8")
    nq, kq = 3, 5
    q = unit(nq, kq, d, seed=13) * 3.0
    q[0, 0, : d // 2] = torch.arange(d // 2) * 0.5 - 2.0  # halves: round-half-even ties
    q[0, 0, d // 2] = 127.0  # ... exactly (scale 1), so x / scale lands on .5
    q[0, 1] = 0.0  # an all-zero token (scale 0)
    q[1, 2] *= 1e-30  # denormal-scale token
    q[2, 3] *= 1e30
    mask = torch.ones(nq, kq, dtype=torch.bool)
    mask[1, 4] = False
    qpack, qweight, nreal, kqp = fused.pack_queries(q, mask, "int8")
    codes, scales = quantize_int8(q)
    got = qpack.view(nq, d // 4, kqp, 4).permute(0, 2, 1, 3).reshape(nq, kqp, d).int() - 128
    assert torch.equal(got[:, :kq], codes.int())
    assert torch.equal(got[:, kq:], torch.zeros(nq, kqp - kq, d, dtype=torch.int32))
    assert torch.equal(nreal, mask.sum(1))
    want_w = scales.clamp(min=torch.finfo(torch.float32).tiny) / mask.sum(1, keepdim=True) * mask
    torch.testing.assert_close(qweight[:, :kq], want_w, rtol=1e-6, atol=0.0)
    assert torch.equal(qweight[:, kq:], torch.zeros(nq, kqp - kq))


def test_work_items_cover_every_pair_once() -> None:
    for nq, s, workers in [(1, 100, 2), (3, 7, 2), (50, 100, 2), (9, 1, 4), (2, 40, 1)]:
        seen = torch.zeros(nq, s, dtype=torch.int64)
        for a0, a1, s0, s1 in fused.blocks(nq, s, workers):
            seen[a0:a1, s0:s1] += 1
        assert torch.equal(seen, torch.ones(nq, s, dtype=torch.int64)), (nq, s, workers)


def test_without_a_compiler_the_engine_falls_back(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("CRATERLAB_KERNEL_CACHE", str(tmp_path / "kernels"))
    fused.library.cache_clear()
    fused.available.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="craterlab.retrieval.fused"):
            assert not fused.available("int8_image")
        assert "using the blocked torch path" in caplog.text
        g, q = unit(5, 4, 16, seed=11), unit(2, 3, 16, seed=12)
        codes, scales = quantize_int8_per_image(g)
        cand = torch.tensor([[0, 1, 2], [4, 3, -1]])
        got = E.rerank(E.KERNELS["int8_image"], Tokens(q), E.GalleryCodes(codes, scales), cand)
        want = E.rerank(
            E.KERNELS["int8_image"], Tokens(q), E.GalleryCodes(codes, scales), cand, fused=False
        )
        assert torch.equal(got, want)
    finally:
        fused.library.cache_clear()
        fused.available.cache_clear()


def test_a_kernel_is_compiled_from_the_source_read_at_import(tmp_path) -> None:
    """build() compiles the bytes it is given, not the file as it is now: a process keeps
    the library that matches its bindings when the file on disk changes under it."""
    import ctypes

    source_file = tmp_path / "kernel.c"
    source_file.write_text("int answer(void) { return 1; }\n")
    flags = ("-O2", "-fPIC", "-shared")
    first = ctypes.CDLL(str(fused.build(tmp_path, source_file, flags)))
    edited = b"int answer(void) { return 2; }\n"
    second = ctypes.CDLL(str(fused.build(tmp_path, source_file, flags, source=edited)))
    assert (first.answer(), second.answer()) == (1, 2)
    left = sorted(p.suffix for p in tmp_path.iterdir())
    assert left == [".c", ".so", ".so"]  # the two libraries; the compiled copies are gone
