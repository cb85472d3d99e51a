"""Quantizers and stores: round-trip error bounds, bytes against the serialized size, INT8
scoring against an integer reference, and the PQ codebook trained once per sweep."""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from craterlab.errors import ConfigError, DataError
from craterlab.plugins import get_registry
from craterlab.retrieval.late_interaction import late_interaction
from craterlab.retrieval.matchers import LateInteraction
from craterlab.retrieval.quantizers import (
    CODEBOOK_DIR,
    Int8Quantizer,
    PQQuantizer,
    forget_codebooks,
    quantize_int8,
)
from craterlab.retrieval.stores import CodeStore, Int8Store
from craterlab.testing import random_tokens
from craterlab.types import Tokens

# The study's bytes per image at K=32, D=384 (int8_image: one scale per image).
STUDY_BYTES = {
    "fp32": 49152,
    "fp16": 24576,
    "bf16": 24576,
    "int8": 12416,
    "int8_image": 12292,
    "pq96": 3072,
    "pq48": 1536,
}
CONFIGS = {
    "fp32": {"name": "fp32"},
    "fp16": {"name": "fp16"},
    "bf16": {"name": "bf16"},
    "int8": {"name": "int8"},
    "int8_image": {"name": "int8", "scale": "image"},
    "pq96": {"name": "pq", "m": 96},
    "pq48": {"name": "pq", "m": 48},
}


def build(key: str, **extra):  # noqa: ANN003, ANN201
    return get_registry().build("quantizer", {**CONFIGS[key], **extra})


def payload_size(directory: Path) -> tuple[int, int]:
    """(per-image payload bytes, codebook bytes) from the files on disk."""
    files = {p.name: p.stat().st_size for p in directory.glob("*.bin")}
    overhead = files.pop("codebook.bin", 0)
    return sum(files.values()), overhead


@pytest.mark.parametrize("key", list(CONFIGS))
def test_bytes_match_study_and_serialized_size(key: str, tmp_path: Path) -> None:
    tokens = random_tokens(12, 32, 384, seed=1)  # 384 tokens >= 256 PQ centroids
    q = build(key)
    q.fit(tokens)
    store = q.encode(tokens)
    assert store.bytes_per_image() == STUDY_BYTES[key]
    written = store.save(tmp_path)
    payload, overhead = payload_size(tmp_path)
    assert payload == written == store.nbytes == STUDY_BYTES[key] * 12
    assert overhead == store.overhead_bytes
    loaded = CodeStore.load(tmp_path)
    assert loaded.nbytes == store.nbytes and len(loaded) == 12
    torch.testing.assert_close(loaded.decode().vectors, store.decode().vectors)


def test_mask_is_stored_packed_and_counted(tmp_path: Path) -> None:
    t = random_tokens(5, 10, 8, seed=2)
    mask = torch.rand(5, 10, generator=torch.Generator().manual_seed(3)) > 0.4
    store = build("int8").encode(Tokens(t.vectors, mask))
    assert store.nbytes == 5 * (10 * 8 + 10 * 4 + 2)  # codes + scales + ceil(10/8) mask bytes
    assert store.save(tmp_path) == store.nbytes == payload_size(tmp_path)[0]
    loaded = CodeStore.load(tmp_path)
    assert torch.equal(loaded.decode().mask, mask)


def test_truncated_or_missing_store_file_is_named(tmp_path: Path) -> None:
    build("int8").encode(random_tokens(5, 4, 8, seed=2)).save(tmp_path)
    codes = tmp_path / "codes.bin"
    codes.write_bytes(codes.read_bytes()[:-3])
    with pytest.raises(DataError, match="codes.bin has 157 bytes"):
        CodeStore.load(tmp_path)
    codes.unlink()
    with pytest.raises(DataError, match="codes.bin is missing"):
        CodeStore.load(tmp_path)


def test_fp32_exact_fp16_bf16_close() -> None:
    t = random_tokens(6, 4, 32, seed=4)
    assert torch.equal(build("fp32").encode(t).decode().vectors, t.vectors)
    err = (build("fp16").encode(t).decode().vectors - t.vectors).abs().max()
    assert err <= 2**-11  # half precision on values in [-1, 1]
    err = (build("bf16").encode(t).decode().vectors - t.vectors).abs().max()
    assert err <= 2**-8  # 8 significant bits


@pytest.mark.parametrize("key", ["int8", "int8_image"])
def test_int8_error_within_half_a_step(key: str) -> None:
    t = random_tokens(6, 4, 32, seed=5)
    store = build(key).encode(t)
    axes = (-1,) if key == "int8" else (-2, -1)
    scale = t.vectors.abs().amax(dim=axes, keepdim=True) / 127
    err = (store.decode().vectors - t.vectors).abs()
    assert (err <= scale / 2 + 1e-7).all()
    codes, s = quantize_int8(torch.zeros(1, 3))
    assert codes.abs().sum() == 0 and s.item() == 0


def test_quantize_int8_is_chunk_independent() -> None:
    x = torch.randn(130, 5, 16, generator=torch.Generator().manual_seed(6))
    a, sa = quantize_int8(x, chunk=7)
    b, sb = quantize_int8(x, chunk=1000)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert torch.equal(a, torch.round(x / (x.abs().amax(-1, keepdim=True) / 127)).to(torch.int8))


def int8_reference(q: Tokens, store: Int8Store) -> torch.Tensor:
    """(Nq, Ng) int8 scoring by loops: exact integer dot products of the codes, then
    mean_i qscale_i * max_j gscale_j * dot_ij over real tokens, in float64."""
    qc, qs = quantize_int8(q.vectors)
    gc = store.payload["codes"].long()
    gs = store.payload["scales"].double().expand(len(store), store.k)
    out = torch.empty(len(q), len(store), dtype=torch.float64)
    for a in range(len(q)):
        qi = [i for i in range(qc.shape[1]) if q.mask is None or q.mask[a, i]]
        for b in range(len(store)):
            gj = [j for j in range(gc.shape[1]) if store.mask is None or store.mask[b, j]]
            if not gj:
                out[a, b] = float("-inf")
                continue
            dots = qc[a].long() @ gc[b].T  # exact integers
            total = sum(float(qs[a, i]) * max(float(gs[b, j] * dots[i, j]) for j in gj) for i in qi)
            out[a, b] = total / max(1, len(qi))
    return out


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("scale", ["token", "image"])
def test_int8_kernels_equal_integer_reference_in_small_blocks(threads: int, scale: str) -> None:
    """Blocked/threaded integer scoring (per-token scales, and per-image scales with the max
    taken in int32) == the int8 semantics computed by loops."""
    g = random_tokens(11, 5, 16, seed=20)
    gmask = torch.rand(11, 5, generator=torch.Generator().manual_seed(21)) > 0.3
    gmask[:, 0] = True
    gmask[4] = False  # an empty gallery item scores -inf
    qv = random_tokens(4, 3, 16, seed=22).vectors.clone()
    qv[1, 2] = 0  # an all-zero query token (scale 0) must not turn -inf into NaN
    q = Tokens(qv, torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 1], [1, 1, 0]]).bool())
    store = Int8Quantizer(scale=scale).encode(Tokens(g.vectors, gmask))
    assert store.per_image_scale == (scale == "image")
    ref = int8_reference(q, store)
    fin = torch.isfinite(ref)
    for tile_mb in (1, 64):
        li = LateInteraction("cpu", tile_mb=tile_mb, threads=threads)
        got = li.score_store(q, store)
        assert torch.equal(torch.isinf(got), ~fin) and not got.isnan().any()
        torch.testing.assert_close(got[fin].double(), ref[fin], atol=1e-6, rtol=1e-6)
    cand = torch.tensor([[4, 0, 10, -1, 3], [1, 1, 2, 4, 9], [5, 6, 7, 8, 0], [10, 9, 8, 7, 6]])
    want = ref.gather(1, cand.clamp(min=0)).masked_fill(cand < 0, float("-inf"))
    got = LateInteraction("cpu", threads=threads).rerank_store(q, store, cand)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and not got.isnan().any()
    fin2 = torch.isfinite(want)
    torch.testing.assert_close(got[fin2].double(), want[fin2], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scale", ["token", "image"])
def test_int8_scoring_close_to_fp32_and_decode_path_agrees(scale: str) -> None:
    g, q = random_tokens(200, 8, 64, seed=10), random_tokens(10, 8, 64, seed=11)
    exact = late_interaction(q, g)
    store = build("int8", scale=scale).encode(g)
    approx = LateInteraction("cpu").score_store(q, store)
    assert (approx - exact).abs().max() < 0.03
    assert (approx.argmax(1) == exact.argmax(1)).float().mean() >= 0.9
    decoded = LateInteraction("cpu").score_store(q, build("int8", direct=False).encode(g))
    assert (decoded - exact).abs().max() < 0.02  # fp32 queries against decoded codes


@pytest.mark.parametrize("key", ["fp32", "fp16", "bf16"])
def test_plain_float_stores_score_in_place(key: str) -> None:
    """FP32/FP16 codes are scored in place; results equal scoring the decoded tokens."""
    g = random_tokens(12, 4, 16, seed=23)
    gmask = torch.ones(12, 4, dtype=torch.bool)
    gmask[3, 2:] = False
    q = random_tokens(3, 4, 16, seed=24)
    store = build(key).encode(Tokens(g.vectors, gmask))
    li = LateInteraction("cpu", threads=2)
    kernel = li.plan(store).kernel  # the CPU engine, no decoding
    assert kernel is not None and kernel.name == ("bf16" if key == "bf16" else "fp32")
    dec = store.decode()  # bf16 values are exact in fp32: the same kernel gives the same scores
    same = LateInteraction("cpu", threads=2, kernel="bf16" if key == "bf16" else "fp32")
    torch.testing.assert_close(li.score_store(q, store), same.score(q, dec))
    cand = torch.tensor([[3, 0, -1], [11, 3, 5], [2, 2, 7]])
    # A BF16 store reranks through the fused kernel where it is available, which accumulates
    # in fp32, while decoded fp32 rows take the blocked bf16 path, which rounds similarities to
    # bf16: equal within that rounding (both are checked against the fp64 reference in
    # test_fused_rerank.py).
    tol = {"rtol": 0, "atol": 4e-3} if key == "bf16" else {}
    torch.testing.assert_close(li.rerank_store(q, store, cand), same.rerank(q, dec, cand), **tol)


def test_pq_decode_matches_faiss_and_beats_a_mean_codebook() -> None:
    t = random_tokens(40, 8, 16, seed=6)
    q = PQQuantizer(m=4, seed=0)
    q.fit(t)
    store = q.encode(t)
    flat = t.vectors.reshape(-1, 16).numpy()
    ref = q.pq.decode(q.pq.compute_codes(flat)).reshape(40, 8, 16)
    torch.testing.assert_close(store.decode().vectors, torch.from_numpy(ref))
    err = (store.decode().vectors - t.vectors).pow(2).sum(-1).mean()
    assert err < 0.5 * t.vectors.pow(2).sum(-1).mean()  # far better than predicting zero
    assert faiss.ProductQuantizer(16, 4, 8).code_size == store.bytes_per_token()


def test_pq_codebook_is_trained_once_per_tokens_and_settings(tmp_path: Path, caplog) -> None:
    """A sweep's jobs share a codebook: from memory in one process, from the cache dir in a
    new one; other tokens or settings train a new one. FAISS's per-sub-quantizer warnings are
    one log line."""
    t = random_tokens(40, 8, 16, seed=30)
    first = PQQuantizer(m=4, seed=0, cache_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="craterlab"):
        first.fit(t)
    assert first.codebook_source == "trained"
    assert sum("FAISS recommends" in r.message for r in caplog.records) == 1
    files = list((tmp_path / CODEBOOK_DIR).glob("*.npy"))
    assert len(files) == 1
    again = PQQuantizer(m=4, seed=0, cache_dir=str(tmp_path))
    again.fit(t)
    assert again.codebook_source == "memory"
    forget_codebooks()  # a new process: only the disk copy is left
    third = PQQuantizer(m=4, seed=0, cache_dir=str(tmp_path))
    third.fit(t)
    assert third.codebook_source == "disk"
    assert torch.equal(third.encode(t).payload["codes"], first.encode(t).payload["codes"])
    other_seed = PQQuantizer(m=4, seed=1, cache_dir=str(tmp_path))
    other_seed.fit(t)
    other_tokens = PQQuantizer(m=4, seed=0, cache_dir=str(tmp_path))
    other_tokens.fit(random_tokens(40, 8, 16, seed=31))
    assert other_seed.codebook_source == other_tokens.codebook_source == "trained"
    assert len(list((tmp_path / CODEBOOK_DIR).glob("*.npy"))) == 3


def test_pq_warning_threshold_does_not_change_training() -> None:
    """Raising FAISS's min_points_per_centroid (to silence its m warnings) keeps centroids."""
    x = np.ascontiguousarray(random_tokens(40, 8, 16, seed=32).vectors.reshape(-1, 16).numpy())
    plain = faiss.ProductQuantizer(16, 4, 8)
    plain.cp.seed = 0
    plain.train(x)
    quiet = PQQuantizer(m=4, seed=0)
    quiet.fit(Tokens(torch.from_numpy(x).view(40, 8, 16)))
    np.testing.assert_array_equal(
        faiss.vector_to_array(plain.centroids), faiss.vector_to_array(quiet.pq.centroids)
    )


def test_pq_errors_name_the_fix() -> None:
    with pytest.raises(DataError, match="divisible"):
        PQQuantizer(m=5).fit(random_tokens(40, 8, 16))
    with pytest.raises(DataError, match="at least 256"):
        PQQuantizer(m=4).fit(random_tokens(3, 8, 16))
    with pytest.raises(ConfigError, match="nbits"):
        get_registry().build("quantizer", {"name": "pq", "nbits": 4})
    with pytest.raises(ConfigError, match="scale"):
        get_registry().build("quantizer", {"name": "int8", "scale": "row"})


def test_store_to_device_keeps_results() -> None:
    t = random_tokens(4, 3, 8, seed=12)
    s = build("int8").encode(t)
    torch.testing.assert_close(s.to("cpu").decode().vectors, s.decode().vectors)
