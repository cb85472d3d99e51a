"""Quantizers: round-trip error bounds, byte accounting against the serialized size, and
scores computed from the codes against an independent computation."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from craterlab.errors import ConfigError, DataError
from craterlab.matching import LateInteraction, late_interaction_rerank, late_interaction_score
from craterlab.plugins import get_registry
from craterlab.quantization import (
    CodeStore,
    Int8Quantizer,
    Int8Store,
    PQQuantizer,
    quantize_int8,
)
from craterlab.testing import random_tokens
from craterlab.types import Tokens

# The study's bytes per image at K=32, D=384.
STUDY_BYTES = {"fp32": 49152, "fp16": 24576, "int8": 12416, "pq96": 3072, "pq48": 1536}
CONFIGS = {
    "fp32": {"name": "fp32"},
    "fp16": {"name": "fp16"},
    "int8": {"name": "int8"},
    "pq96": {"name": "pq", "m": 96},
    "pq48": {"name": "pq", "m": 48},
}


def build(key: str):  # noqa: ANN201
    return get_registry().build("quantizer", CONFIGS[key])


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


def test_fp32_exact_fp16_close() -> None:
    t = random_tokens(6, 4, 32, seed=4)
    assert torch.equal(build("fp32").encode(t).decode().vectors, t.vectors)
    err = (build("fp16").encode(t).decode().vectors - t.vectors).abs().max()
    assert err <= 2**-11  # half precision on values in [-1, 1]


def test_int8_error_within_half_a_step() -> None:
    t = random_tokens(6, 4, 32, seed=5)
    store = build("int8").encode(t)
    scale = t.vectors.abs().amax(-1, keepdim=True) / 127
    err = (store.decode().vectors - t.vectors).abs()
    assert (err <= scale / 2 + 1e-7).all()
    codes, s = quantize_int8(torch.zeros(1, 3))
    assert codes.abs().sum() == 0 and s.item() == 0


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


def test_pq_errors_name_the_fix() -> None:
    with pytest.raises(DataError, match="divisible"):
        PQQuantizer(m=5).fit(random_tokens(40, 8, 16))
    with pytest.raises(DataError, match="at least 256"):
        PQQuantizer(m=4).fit(random_tokens(3, 8, 16))
    with pytest.raises(ConfigError, match="nbits"):
        get_registry().build("quantizer", {"name": "pq", "nbits": 4})


def dequantized_queries(q: Tokens) -> Tokens:
    codes, scale = quantize_int8(q.vectors)
    return Tokens(codes.float() * scale.unsqueeze(-1), q.mask)


@pytest.mark.parametrize("threads", [1, 2])
def test_int8_direct_scores_equal_decoded_scoring(threads: int) -> None:
    """Integer matmul scoring == fp scoring of the dequantized queries and gallery."""
    g = random_tokens(30, 6, 32, seed=7)
    gmask = torch.ones(30, 6, dtype=torch.bool)
    gmask[:, 4:] = torch.rand(30, 2, generator=torch.Generator().manual_seed(8)) > 0.5
    q = random_tokens(5, 4, 32, seed=9)
    q = Tokens(q.vectors, torch.tensor([[1, 1, 1, 0]] * 5).bool())
    store = (
        get_registry()
        .build("quantizer", {"name": "int8", "threads": threads})
        .encode(Tokens(g.vectors, gmask))
    )
    assert isinstance(store, Int8Store)
    dq, dg = dequantized_queries(q), store.decode()
    ref = late_interaction_score(dq, dg)
    torch.testing.assert_close(store.li_score(q, device="cpu"), ref, atol=1e-5, rtol=0)
    cand = torch.stack(
        [torch.randperm(30, generator=torch.Generator().manual_seed(i))[:9] for i in range(5)]
    )
    cand[0, 3] = -1
    got = store.li_rerank(q, cand, device="cpu")
    want = late_interaction_rerank(dq, cand, dg)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert got[0, 3] == float("-inf")


def test_int8_direct_close_to_fp32_ranking() -> None:
    g, q = random_tokens(200, 8, 64, seed=10), random_tokens(10, 8, 64, seed=11)
    exact = late_interaction_score(q, g)
    approx = build("int8").encode(g).li_score(q, device="cpu")
    assert (approx - exact).abs().max() < 0.02
    assert (approx.argmax(1) == exact.argmax(1)).float().mean() >= 0.9


def test_store_to_device_keeps_results() -> None:
    t = random_tokens(4, 3, 8, seed=12)
    s = build("int8").encode(t)
    torch.testing.assert_close(s.to("cpu").decode().vectors, s.decode().vectors)
    assert isinstance(np.asarray(s.payload["codes"]), np.ndarray)


def int8_reference(q: Tokens, store: Int8Store) -> torch.Tensor:
    """(Nq, Ng) int8 scoring by loops: exact integer dot products of the codes, then
    mean_i qscale_i * max_j gscale_j * dot_ij over real tokens, in float64."""
    qc, qs = quantize_int8(q.vectors)
    gc, gs = store.payload["codes"].long(), store.payload["scales"].double()
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
def test_int8_direct_equals_integer_reference_in_small_blocks(threads: int) -> None:
    """Blocked/threaded integer scoring == the int8 semantics computed by loops."""
    g = random_tokens(11, 5, 16, seed=20)
    gmask = torch.rand(11, 5, generator=torch.Generator().manual_seed(21)) > 0.3
    gmask[:, 0] = True
    gmask[4] = False  # an empty gallery item scores -inf
    qv = random_tokens(4, 3, 16, seed=22).vectors.clone()
    qv[1, 2] = 0  # an all-zero query token (scale 0) must not turn -inf into NaN
    q = Tokens(qv, torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 1], [1, 1, 0]]).bool())
    store = Int8Quantizer(threads=threads).encode(Tokens(g.vectors, gmask))
    ref = int8_reference(q, store)
    fin = torch.isfinite(ref)
    for tile in (1, 1 << 20):  # one gallery image per tile, then one tile
        got = store.li_score(q, device="cpu", tile_bytes=tile)
        assert torch.equal(torch.isinf(got), ~fin) and not got.isnan().any()
        torch.testing.assert_close(got[fin].double(), ref[fin], atol=1e-6, rtol=1e-6)
    cand = torch.tensor([[4, 0, 10, -1, 3], [1, 1, 2, 4, 9], [5, 6, 7, 8, 0], [10, 9, 8, 7, 6]])
    want = ref.gather(1, cand.clamp(min=0)).masked_fill(cand < 0, float("-inf"))
    # one candidate per block, two candidates (a slice of one query), all queries in one block
    for block in (1, 2 * 5 * 16, 1 << 20):
        got = store.li_rerank(q, cand, device="cpu", block_bytes=block)
        assert torch.equal(torch.isinf(got), torch.isinf(want)) and not got.isnan().any()
        fin2 = torch.isfinite(want)
        torch.testing.assert_close(got[fin2].double(), want[fin2], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("key", ["fp32", "fp16"])
def test_plain_float_stores_score_in_place(key: str) -> None:
    """The matcher scores FP32/FP16 codes in place; results equal scoring the decoded store."""
    g = random_tokens(12, 4, 16, seed=23)
    gmask = torch.ones(12, 4, dtype=torch.bool)
    gmask[3, 2:] = False
    q = random_tokens(3, 4, 16, seed=24)
    store = build(key).encode(Tokens(g.vectors, gmask))
    assert store.plain_tokens() is not None
    li = LateInteraction("cpu", threads=2)
    dec = store.decode()
    torch.testing.assert_close(li.score_store(q, store), late_interaction_score(q, dec))
    cand = torch.tensor([[3, 0, -1], [11, 3, 5], [2, 2, 7]])
    want = late_interaction_rerank(q, cand, dec)
    torch.testing.assert_close(li.rerank_store(q, store, cand), want)
