"""Multi-vector candidate generators (MUVERA FDE, token IVF) and the residual codec, against
brute-force computations of the same definitions and exhaustive late interaction."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from craterlab.errors import ConfigError, DataError
from craterlab.plugins import get_registry
from craterlab.retrieval import list_score
from craterlab.retrieval.fde import FdeEncoder, FdeSettings
from craterlab.retrieval.generator_io import load_generator, save_generator
from craterlab.retrieval.late_interaction import late_interaction
from craterlab.retrieval.list_score import (
    child_probe,
    score_lists,
    score_lists_numpy,
    score_top_s,
    top_s,
)
from craterlab.retrieval.quantizers import quantize_int8
from craterlab.retrieval.residual import ResidualQuantizer, pack_bits, unpack_bits
from craterlab.retrieval.stores import CodeStore
from craterlab.retrieval.token_ivf import TokenIvf, TokenIvfSettings, sketch_store
from craterlab.retrieval.token_sketch import build_sketch, fit_projection
from craterlab.types import RetrievalInputs, Tokens


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def clustered(n: int, k: int = 6, d: int = 16, words: int = 24, seed: int = 0) -> Tokens:
    """Token sets drawn around shared 'visual words' (so centroids and partitions mean
    something), with a third of the images padded to K-2 real tokens."""
    g = torch.Generator().manual_seed(seed)
    centers = unit(torch.randn(words, d, generator=g))
    pick = torch.randint(0, words, (n, k), generator=g)
    v = unit(centers[pick] + 0.25 * torch.randn(n, k, d, generator=g))
    mask = torch.ones(n, k, dtype=torch.bool)
    mask[::3, k - 2 :] = False
    return Tokens(v, mask)


def noisy_queries(gallery: Tokens, rows: list[int], seed: int = 1) -> Tokens:
    g = torch.Generator().manual_seed(seed)
    v = gallery.vectors[rows]
    return Tokens(unit(v + 0.2 * torch.randn(v.shape, generator=g)), gallery.mask[rows])


def pooled(t: Tokens) -> torch.Tensor:
    m = t.mask.unsqueeze(-1).float()
    return unit((t.vectors * m).sum(1))


# --------------------------------------------------------------------------- FDE


def brute_fde(enc: FdeEncoder, tokens: torch.Tensor, mask: torch.Tensor, kind: str) -> np.ndarray:
    """The FDE of one token set, token by token, from the encoder's random draws."""
    s = enc.settings
    nb, real = 2**s.simhash_bits, [t for t, m in zip(tokens, mask, strict=True) if m]
    blocks = []
    for r in range(s.repetitions):
        proj = [t @ enc.projection[r] if enc.projection is not None else t.clone() for t in real]
        bits = [
            [float(t @ enc.hyperplanes[r][:, j]) > 0 for j in range(s.simhash_bits)] for t in real
        ]
        part = [sum(int(b) << j for j, b in enumerate(bb)) for bb in bits]
        for p in range(nb):
            members = [proj[i] for i in range(len(real)) if part[i] == p]
            if members:
                agg = torch.stack(members).sum(0)
                blocks.append(agg / len(members) if kind == "document" else agg)
            elif kind == "document" and s.fill_empty and real:
                want = [bool(p >> j & 1) for j in range(s.simhash_bits)]
                ham = [sum(a != b for a, b in zip(bb, want, strict=True)) for bb in bits]
                blocks.append(proj[int(np.argmin(ham))])
            else:
                blocks.append(torch.zeros(enc.block_dim))
    raw = torch.cat(blocks).numpy()
    if not s.final_dim:
        return raw
    out = np.zeros(s.final_dim, dtype=np.float64)
    for i, v in enumerate(raw):
        out[int(enc.sketch_index[i])] += float(enc.sketch_sign[i]) * float(v)
    return out


@pytest.mark.parametrize(
    "settings",
    [
        FdeSettings(simhash_bits=2, repetitions=3, projection_dim=4, seed=3),
        FdeSettings(simhash_bits=3, repetitions=2, projection_dim=0, fill_empty=False),
        FdeSettings(simhash_bits=2, repetitions=2, projection_dim=5, final_dim=7, seed=1),
    ],
)
def test_fde_equals_a_token_by_token_computation(settings: FdeSettings) -> None:
    t = clustered(5, k=6, d=8)
    enc = FdeEncoder(8, settings)
    for kind in ("query", "document"):
        fast = enc.encode(t, kind).numpy()
        for i in range(len(t)):
            want = brute_fde(enc, t.vectors[i], t.mask[i], kind)
            np.testing.assert_allclose(fast[i], want, atol=1e-5)
    q, d = enc.encode(t, "query"), enc.encode(t, "document")
    ip = float(q[0] @ d[1])
    want = float(
        brute_fde(enc, t.vectors[0], t.mask[0], "query")
        @ brute_fde(enc, t.vectors[1], t.mask[1], "document")
    )
    assert ip == pytest.approx(want, abs=1e-4)


def test_fde_with_one_partition_is_the_query_sum_against_the_document_mean() -> None:
    t = clustered(4, k=5, d=8)
    enc = FdeEncoder(8, FdeSettings(simhash_bits=0, repetitions=1, projection_dim=0))
    ip = enc.encode(t, "query") @ enc.encode(t, "document").T
    m = t.mask.unsqueeze(-1).float()
    want = (t.vectors * m).sum(1) @ ((t.vectors * m).sum(1) / m.sum(1)).T
    torch.testing.assert_close(ip, want, atol=1e-5, rtol=0)


def test_fde_refuses_tokens_of_another_dimension() -> None:
    enc = FdeEncoder(8)
    with pytest.raises(DataError, match="8-dimensional"):
        enc.encode(clustered(2, d=16), "query")


# --------------------------------------------------------------------------- stages


def stage_inputs(
    store_cfg: dict, n: int = 90, seed: int = 0
) -> tuple[RetrievalInputs, Tokens, Tokens]:
    g = clustered(n, seed=seed)
    q = noisy_queries(g, [0, 5, 17, n // 3, n - 1])
    quantizer = get_registry().build("quantizer", store_cfg, seed=0)
    quantizer.fit(g)
    store = quantizer.encode(g)
    matcher = get_registry().build("matcher", {"name": "late_interaction", "device": "cpu"})
    return RetrievalInputs(pooled(q), pooled(g), q, store, matcher, 10), g, q


STAGES = [
    {"name": "muvera", "simhash_bits": 2, "repetitions": 4, "projection_dim": 8},
    {"name": "muvera", "index": "HNSW16", "ef_search": 200, "final_dim": 64},
    {"name": "token_ivf", "lists": 16, "nprobe": 16},
    {"name": "token_ivf", "lists": 16, "nprobe": 16, "score": "centroids"},
    {"name": "token_ivf", "lists": 16, "nprobe": 16, "score": "counts"},
    {"name": "token_ivf", "lists": 16, "nprobe": 5, "fill": "zero", "shortlist": 90},
    {"name": "token_ivf", "lists": 16, "nprobe": 16, "refine": 60, "refine_dims": 8},
]


@pytest.mark.parametrize("cfg", STAGES, ids=lambda c: "-".join(map(str, c.values())))
def test_a_full_shortlist_reranks_to_exhaustive_late_interaction(cfg: dict) -> None:
    inp, g, q = stage_inputs({"name": "fp32"})
    stage = get_registry().build("stage", {**cfg, "shortlist": 90, "timing_queries": 2})
    r = stage.search(inp)
    ref = late_interaction(q, g).topk(10, dim=1)
    torch.testing.assert_close(r.scores, ref.values, atol=1e-5, rtol=0)
    assert r.report.recovers_reference and r.extra["generator_bytes"] > 0
    assert r.report.bytes_per_image == pytest.approx(
        r.extra["generator_bytes"] / 90 + inp.gallery_store.bytes_per_image()
    )


def test_muvera_flat_candidates_are_the_top_fde_inner_products() -> None:
    inp, g, q = stage_inputs({"name": "fp32"})
    stage = get_registry().build("stage", {"name": "muvera", "shortlist": 12, "timing_queries": 0})
    r = stage.search(inp)
    enc = inp.prepared["generator:muvera"].encoder
    ip = enc.encode(q, "query") @ enc.encode(g, "document").T
    want = ip.topk(12, dim=1).indices
    for got, ref in zip(r.shortlist, want, strict=True):
        assert set(got.tolist()) == set(ref.tolist())


def brute_ivf(codes: torch.Tensor, mask: torch.Tensor, cent: torch.Tensor, q: Tokens, nprobe: int):
    """Per query: the candidate set and each candidate's centroid-interaction score."""
    out = []
    for i in range(len(q)):
        real = q.vectors[i][q.mask[i]]
        sims = real @ cent.T
        probed = set(sims.topk(nprobe, dim=1).indices.reshape(-1).tolist())
        cands = {
            img
            for img, j in itertools.product(range(len(codes)), range(codes.shape[1]))
            if mask[img, j] and int(codes[img, j]) in probed
        }
        scores = {
            img: float(
                np.mean(
                    [
                        max(
                            float(sims[a, int(codes[img, j])])
                            for j in range(codes.shape[1])
                            if mask[img, j]
                        )
                        for a in range(len(real))
                    ]
                )
            )
            for img in cands
        }
        out.append(scores)
    return out


def test_token_ivf_candidates_and_prescores_equal_brute_force() -> None:
    g = clustered(40)
    q = noisy_queries(g, [1, 7, 22])
    cent = unit(torch.randn(10, 16, generator=torch.Generator().manual_seed(5)))
    codes = (g.vectors @ cent.T).argmax(-1).to(torch.int32)
    ivf = TokenIvf(cent, codes, g.mask, TokenIvfSettings(nprobe=2, score="centroids"))
    want = brute_ivf(codes, g.mask, cent, q, 2)
    got = ivf.candidates(q, 40)
    for row, scores in zip(got, want, strict=True):
        cands = [c for c in row.tolist() if c >= 0]
        assert set(cands) == set(scores)
        ordered = [scores[c] for c in cands]
        assert ordered == sorted(ordered, reverse=True)
    real = q.vectors[0][q.mask[0]]
    rows = torch.tensor(sorted(want[0]))
    pre = ivf.centroid_interaction(real @ cent.T, rows)
    np.testing.assert_allclose(pre.numpy(), [want[0][int(r)] for r in rows], atol=1e-6)


def brute_list_scores(
    codes: torch.Tensor,
    mask: torch.Tensor,
    cent: torch.Tensor,
    q: Tokens,
    i: int,
    nprobe: int,
    fill: str,
    cells: torch.Tensor | None = None,
    cell_probe: int = 0,
) -> dict[int, float]:
    """One query's list score by its definition: per real query token, the best probed
    centroid's score among those with a token of the image, else the fill; summed. With
    ``cells``, a token probes (and takes its fill from) only the children of its best
    ``cell_probe`` cells (child j of cell c is list c * per + j)."""
    real = q.vectors[i][q.mask[i]]
    sims = real @ cent.T
    if cells is not None:
        per = len(cent) // len(cells)
        allowed = torch.zeros_like(sims, dtype=torch.bool)
        for a, best in enumerate((real @ cells.T).topk(cell_probe, dim=1).indices):
            for c in best.tolist():
                allowed[a, c * per : (c + 1) * per] = True
        sims = sims.masked_fill(~allowed, float("-inf"))
    top = sims.topk(nprobe + 1, dim=1)
    probed = [set(top.indices[a, :nprobe].tolist()) for a in range(len(real))]
    fills = top.values[:, nprobe] if fill == "next" else torch.zeros(len(real))
    out = {}
    for img in range(len(codes)):
        own = {int(codes[img, j]) for j in range(codes.shape[1]) if mask[img, j]}
        found = [own & probed[a] for a in range(len(real))]
        if not any(found):
            continue
        out[img] = sum(
            max(float(sims[a, c]) for c in found[a]) if found[a] else float(fills[a])
            for a in range(len(real))
        )
    return out


@pytest.mark.parametrize("fill", ["next", "zero"])
def test_token_ivf_list_scores_rank_as_brute_force(fill: str) -> None:
    g = clustered(60)
    q = noisy_queries(g, [2, 9, 33, 59])
    cent = unit(torch.randn(12, 16, generator=torch.Generator().manual_seed(3)))
    codes = (g.vectors @ cent.T).argmax(-1).to(torch.int32)
    ivf = TokenIvf(cent, codes, g.mask, TokenIvfSettings(nprobe=3, fill=fill))
    assert ivf.codes is None  # the list score reads only the lists
    got = ivf.candidates(q, 60)
    for i, row in enumerate(got):
        want = brute_list_scores(codes, g.mask, cent, q, i, 3, fill)
        cands = [c for c in row.tolist() if c >= 0]
        assert set(cands) == set(want)
        ordered = [want[c] for c in cands]
        assert all(a >= b - 1e-5 for a, b in itertools.pairwise(ordered)), ordered


@pytest.mark.parametrize("kernel", ["1", "0"])
@pytest.mark.parametrize("cell_probe", [1, 2])
def test_probing_through_cells_scores_only_the_best_cells_lists(
    cell_probe: int, kernel: str, monkeypatch
) -> None:
    """The C child probe (kernel 1) and the torch gather (0) both match the definition."""
    monkeypatch.setenv("CRATERLAB_LIST_KERNEL", kernel)
    g = clustered(60)
    q = noisy_queries(g, [2, 9, 33, 59])
    cells = unit(torch.randn(4, 16, generator=torch.Generator().manual_seed(4)))
    kids = unit(cells.repeat_interleave(3, 0) + 0.5 * torch.randn(12, 16))  # 3 lists per cell
    codes8, scales = quantize_int8(kids)  # int8-exact rows: the probe reads the int8 rows
    kids = codes8.float() * scales.unsqueeze(1)
    codes = (g.vectors @ kids.T).argmax(-1).to(torch.int32)
    settings = TokenIvfSettings(nprobe=2, coarse=4, cell_probe=cell_probe)
    ivf = TokenIvf(kids, codes, g.mask, settings, cells=cells)
    got = ivf.candidates(q, 60)
    for i, row in enumerate(got):
        want = brute_list_scores(codes, g.mask, kids, q, i, 2, "next", cells, cell_probe)
        cands = [c for c in row.tolist() if c >= 0]
        assert set(cands) == set(want)
        ordered = [want[c] for c in cands]
        assert all(a >= b - 1e-5 for a, b in itertools.pairwise(ordered)), ordered
    # probing through every cell is probing every list
    every = TokenIvf(
        kids, codes, g.mask, TokenIvfSettings(nprobe=2, coarse=4, cell_probe=4), cells=cells
    )
    flat = TokenIvf(kids, codes, g.mask, TokenIvfSettings(nprobe=2))
    torch.testing.assert_close(every.candidates(q, 60), flat.candidates(q, 60))
    assert not torch.equal(got, flat.candidates(q, 60))  # fewer cells: other candidates


def test_probing_through_cells_needs_a_two_level_index_and_the_list_score() -> None:
    g = clustered(20)
    cent = unit(torch.randn(8, 16))
    codes = (g.vectors @ cent.T).argmax(-1).to(torch.int32)
    with pytest.raises(ConfigError, match="this index has none: build it with coarse set"):
        TokenIvf(cent, codes, g.mask, TokenIvfSettings(coarse=4, cell_probe=2))
    with pytest.raises(ConfigError, match="coarse=0 and score='lists'"):
        TokenIvfSettings(cell_probe=2).check()
    with pytest.raises(ConfigError, match="score='centroids'"):
        TokenIvfSettings(lists=8, coarse=4, cell_probe=2, score="centroids").check()


def random_lists(
    rng: np.random.Generator, n: int, c: int, pairs: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, offsets) of c inverted lists over n images: ``pairs`` random (list, image)
    draws, duplicates merged, each list's images ascending (as a built index holds them)."""
    key = np.unique(rng.integers(0, c, pairs) * n + rng.integers(0, n, pairs))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(key // n, minlength=c))])
    return (key % n).astype(np.int32), offsets


def test_child_probe_kernel_equals_scoring_every_child_in_torch() -> None:
    rng = torch.Generator().manual_seed(5)
    codes, scales = quantize_int8(unit(torch.randn(6 * 5, 40, generator=rng)))  # 6 cells x 5
    cent = codes.float() * scales.unsqueeze(1)
    codes, scales = codes.numpy(), scales.numpy()
    q = unit(torch.randn(9, 40, generator=rng))
    cells = torch.stack([torch.randperm(6, generator=rng)[:3] for _ in range(9)])
    got = child_probe(q.numpy(), cells.numpy(), codes, scales, 5, 4)
    assert got is not None
    kids = (cells.unsqueeze(-1) * 5 + torch.arange(5)).flatten(1)  # (9, 15)
    sims = (q.unsqueeze(1) * cent[kids]).sum(-1)
    top = sims.topk(4, dim=-1)
    torch.testing.assert_close(torch.from_numpy(got[0]), top.values, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[1], kids.gather(-1, top.indices).numpy())
    with pytest.raises(ValueError, match="k=16 of 3 cells x 5 children"):
        child_probe(q.numpy(), cells.numpy(), codes, scales, 5, 16)


def test_list_score_blocks_of_images_give_the_unblocked_result(monkeypatch) -> None:
    """Lists sorted by image are read block by block (cursor per probed list); any block
    size gives the single pass's images and sums."""
    rng = np.random.default_rng(2)
    n, c = 1000, 30
    ids, offsets = random_lists(rng, n, c, 6000)
    probes = np.stack([rng.permutation(c)[:4] for _ in range(5)]).astype(np.int32)
    vals = -np.sort(-rng.random((5, 4)), axis=1).astype(np.float32)
    one_ids, one_sc = score_lists(offsets, ids, n, probes, vals, sorted_lists=False)
    for block in (1, 7, 128, 999, 5000):
        monkeypatch.setattr(list_score, "BLOCK", block)
        b_ids, b_sc = score_lists(offsets, ids, n, probes, vals)
        o1, ob = np.argsort(one_ids), np.argsort(b_ids)
        np.testing.assert_array_equal(one_ids[o1], b_ids[ob])
        np.testing.assert_allclose(one_sc[o1], b_sc[ob], rtol=1e-6)
        np.testing.assert_array_equal(
            score_top_s(offsets, ids, n, probes, vals, 50),
            top_s(one_ids, one_sc, 50),
        )


@pytest.mark.parametrize("s", [1, 7, 60, 1000])
def test_list_score_top_s_in_c_equals_sorting_every_touched_image(s: int) -> None:
    """score_top_s (kernel + C heap) and the numpy top_s keep the first s of every touched
    image sorted: best first, ties (many here: values on a grid of 4) by the lower image."""
    rng = np.random.default_rng(1)
    n, c = 300, 20
    ids, offsets = random_lists(rng, n, c, 3000)
    probes = np.stack([rng.permutation(c)[:3] for _ in range(6)]).astype(np.int32)
    vals = -np.sort(-rng.integers(1, 5, (6, 3)), axis=1).astype(np.float32) / 4
    got = score_top_s(offsets, ids, n, probes, vals, s)
    images, scores = score_lists_numpy(offsets, ids, n, probes, vals)
    want = images[np.lexsort((images, -scores))][:s]  # every touched image sorted
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(top_s(images, scores, s), want)  # the numpy path
    assert got.dtype == np.int64 and len(got) == min(
        s, len(score_lists(offsets, ids, n, probes, vals)[0])
    )
    assert len(np.unique(vals)) < vals.size  # the grid makes ties


def test_list_score_kernel_equals_numpy_and_is_order_sensitive() -> None:
    rng = np.random.default_rng(0)
    n, c = 500, 40
    ids, offsets = random_lists(rng, n, c, 4000)
    probes = np.stack([rng.permutation(c)[:5] for _ in range(7)]).astype(np.int32)
    vals = -np.sort(-rng.random((7, 5)), axis=1).astype(np.float32)
    a_ids, a_sc = score_lists(offsets, ids, n, probes, vals)
    b_ids, b_sc = score_lists_numpy(offsets, ids, n, probes, vals)
    oa, ob = np.argsort(a_ids), np.argsort(b_ids)
    np.testing.assert_array_equal(a_ids[oa], b_ids[ob])
    np.testing.assert_allclose(a_sc[oa], b_sc[ob], rtol=1e-6)
    # by definition: per token, the value of the first probed list holding the image
    want = np.zeros(n)
    for t in range(7):
        seen = set()
        for p in range(5):
            lst = ids[offsets[probes[t, p]] : offsets[probes[t, p] + 1]]
            for img in set(lst.tolist()) - seen:
                want[img] += vals[t, p]
            seen |= set(lst.tolist())
    np.testing.assert_allclose(a_sc[oa], want[a_ids[oa]], rtol=1e-5)
    again_ids, again_sc = score_lists(offsets, ids, n, probes, vals)  # workspace was reset
    np.testing.assert_allclose(np.sort(again_sc), np.sort(a_sc))
    # capped: only each list's first 3 postings count, in C and numpy alike
    c_ids, c_sc = score_lists(offsets, ids, n, probes, vals, cap=3)
    d_ids, d_sc = score_lists_numpy(offsets, ids, n, probes, vals, cap=3)
    want = np.zeros(n)
    for t in range(7):
        seen = set()
        for p in range(5):
            lst = ids[offsets[probes[t, p]] : offsets[probes[t, p] + 1]][:3]
            for img in set(lst.tolist()) - seen:
                want[img] += vals[t, p]
            seen |= set(lst.tolist())
    for got_ids, got_sc in ((c_ids, c_sc), (d_ids, d_sc)):
        np.testing.assert_array_equal(np.sort(got_ids), np.flatnonzero(want != 0))
        np.testing.assert_allclose(got_sc, want[got_ids], rtol=1e-5)


def brute_sketch_scores(sketch, query: torch.Tensor, rows: list[int]) -> list[float]:  # noqa: ANN001
    """Approximate LI by its definition, token by token: the mean over the query's tokens of
    the best inner product of its projection with a real sketched (dequantized) token."""
    qp = query @ sketch.projection
    out = []
    for r in rows:
        g = [sketch.codes[r, j].float() * sketch.scales[r, j] for j in range(sketch.codes.shape[1])]
        real = [t for j, t in enumerate(g) if sketch.mask is None or sketch.mask[r, j]]
        out.append(float(np.mean([max(float(a @ t) for t in real) for a in qp])))
    return out


@pytest.mark.parametrize("dims", [8, 6])  # 8: the fused int8 kernel where it runs; 6: torch
def test_sketch_scores_equal_late_interaction_of_the_projected_tokens(dims: int) -> None:
    g = clustered(30)
    proj = fit_projection(g.vectors[g.mask].numpy(), dims)
    torch.testing.assert_close(proj.T @ proj, torch.eye(dims), atol=1e-5, rtol=0)
    sketch = build_sketch(lambda rows: Tokens(g.vectors[rows], g.mask[rows]), 30, proj, g.mask)
    assert sketch.nbytes == 30 * 6 * (dims + 4)
    query = noisy_queries(g, [4]).vectors[0]
    rows = [3, 4, 11, 29, 0]
    got = sketch.score(query, torch.tensor(rows))
    # int8 sketches (and, on the fused kernel, the int8 query): within a few hundredths
    np.testing.assert_allclose(got.numpy(), brute_sketch_scores(sketch, query, rows), atol=3e-2)
    # all dimensions: an orthonormal basis, so the score is exact LI up to int8 rounding
    full = build_sketch(
        lambda rows: Tokens(g.vectors[rows], g.mask[rows]),
        30,
        fit_projection(g.vectors[g.mask].numpy(), 16),
        g.mask,
    )
    exact = late_interaction(Tokens(query[None]), Tokens(g.vectors[rows], g.mask[rows]))[0]
    np.testing.assert_allclose(full.score(query, torch.tensor(rows)), exact, atol=3e-2)


def test_refine_reorders_the_list_scores_head_by_the_sketch() -> None:
    g = clustered(60)
    q = noisy_queries(g, [2, 9, 33, 59])
    cent = unit(torch.randn(12, 16, generator=torch.Generator().manual_seed(3)))
    codes = (g.vectors @ cent.T).argmax(-1).to(torch.int32)
    settings = TokenIvfSettings(nprobe=3, refine=25, refine_dims=8)
    sketch = sketch_store(
        lambda rows: Tokens(g.vectors[rows], g.mask[rows]), settings, 60, 6, g.mask
    )
    unrefined = TokenIvf(cent, codes, g.mask, TokenIvfSettings(nprobe=3))
    ivf = TokenIvf(cent, codes, g.mask, settings, sketch=sketch)
    assert ivf.nbytes == TokenIvf(cent, codes, g.mask, TokenIvfSettings()).nbytes + sketch.nbytes
    for s in (10, 40):
        got = ivf.candidates(q, s)
        plain = unrefined.candidates(q, max(s, 25))  # the list score's order it refines
        for i in range(len(q)):
            head = [c for c in plain[i, :25].tolist() if c >= 0]
            real = q.vectors[i][q.mask[i]]
            by_sketch = brute_sketch_scores(sketch, real, head)
            row = [c for c in got[i].tolist() if c >= 0]
            assert len(row) == min(s, len(plain[i][plain[i] >= 0]))
            scores = dict(zip(head, by_sketch, strict=True))
            ordered = [scores[c] for c in row[: len(head)]]  # the head in sketch order
            assert all(a >= b - 3e-2 for a, b in itertools.pairwise(ordered)), ordered
            if s >= len(head):  # the whole head, then list-score candidates outside it
                assert set(row[: len(head)]) == set(head)
                assert not set(row[len(head) :]) & set(head)
            else:  # the top s of the head by sketch score, up to near-ties at the cut
                assert min(ordered) >= sorted(by_sketch, reverse=True)[s - 1] - 3e-2


def test_refine_needs_sketches_of_its_dimensions() -> None:
    g = clustered(20)
    cent = unit(torch.randn(8, 16, generator=torch.Generator().manual_seed(3)))
    codes = (g.vectors @ cent.T).argmax(-1).to(torch.int32)
    with pytest.raises(ConfigError, match="needs token sketches of 8 dimensions.*holds none"):
        TokenIvf(cent, codes, g.mask, TokenIvfSettings(refine=10, refine_dims=8))
    with pytest.raises(ConfigError, match="refine_dims=40 does not fit 16-dimensional"):
        fit_projection(g.vectors[g.mask].numpy(), 40)
    with pytest.raises(ValueError, match="refine >= 0"):
        get_registry().build("stage", {"name": "token_ivf", "refine": -1})


def test_token_ivf_rejects_unknown_score_and_fill() -> None:
    with pytest.raises(ConfigError, match="score must be one of lists, centroids, counts"):
        TokenIvfSettings(score="plaid").check()
    with pytest.raises(ValueError, match="fill one of next, zero"):
        get_registry().build("stage", {"name": "token_ivf", "fill": "mean"})


@pytest.mark.parametrize("score", ["lists", "centroids"])
def test_token_ivf_uses_a_residual_stores_centroids(score: str) -> None:
    inp, g, q = stage_inputs({"name": "residual", "nbits": 2, "centroids": 16})
    stage = get_registry().build(
        "stage", {"name": "token_ivf", "shortlist": 30, "timing_queries": 0, "score": score}
    )
    stage.search(inp)
    ivf = inp.prepared["generator:token_ivf"]
    store = inp.gallery_store
    assert ivf.codes_shared and ivf.identity()["lists"] == 16
    if score == "centroids":
        assert torch.equal(ivf.codes, store.codes)
    for c in range(16):  # list c: the images with a real token coded c
        want = sorted(set(torch.where((store.codes == c) & store.mask)[0].tolist()))
        assert ivf.list_ids[ivf.offsets[c] : ivf.offsets[c + 1]].tolist() == want


# --------------------------------------------------------------------------- residual codec


def test_pack_bits_round_trip() -> None:
    for nbits in (1, 2):
        b = torch.randint(0, 2**nbits, (3, 4, 16))
        packed = pack_bits(b, nbits)
        assert packed.shape == (3, 4, 16 * nbits // 8) and packed.dtype == torch.uint8
        assert torch.equal(unpack_bits(packed, nbits), b)


def test_residual_decode_error_is_bounded_by_the_buckets_and_shrinks_with_bits() -> None:
    g = clustered(200, d=16)
    err = {}
    for nbits in (1, 2):
        rq = ResidualQuantizer(nbits=nbits, centroids=24, seed=0)
        rq.fit(g)
        store = rq.encode(g)
        assert store.bytes_per_image() == pytest.approx(6 * (4 + 16 * nbits / 8) + 1)
        dec = store.decode()
        real = g.mask
        cent = rq.centroids[store.codes.long()]
        resid = (g.vectors - cent)[real]
        approx = unit(cent[real] + rq.weights[torch.bucketize(resid, rq.cutoffs)])
        torch.testing.assert_close(dec.vectors[real], approx)  # decode = its definition
        # each coordinate is off by at most its bucket's width (outer buckets: to the data)
        edges = torch.cat([resid.min().view(1), rq.cutoffs, resid.max().view(1)])
        width = (edges[1:] - edges[:-1]).max()
        quant = rq.weights[torch.bucketize(resid, rq.cutoffs)]
        assert float((quant - resid).abs().max()) <= float(width) + 1e-6
        err[nbits] = float((dec.vectors[real] - g.vectors[real]).norm(dim=-1).mean())
        centroid_only = float((unit(cent[real]) - g.vectors[real]).norm(dim=-1).mean())
        assert err[nbits] < centroid_only
    assert err[2] < err[1]


def test_residual_rankings_follow_exhaustive_late_interaction(tmp_path) -> None:  # noqa: ANN001
    inp, g, q = stage_inputs({"name": "residual", "nbits": 2, "centroids": 24}, n=150)
    r = get_registry().build("stage", {"name": "exhaustive", "timing_queries": 0}).search(inp)
    ref = late_interaction(q, g).topk(10, dim=1).indices
    overlap = np.mean(
        [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(r.indices, ref, strict=True)]
    )
    assert overlap >= 0.6 and torch.equal(r.indices[:, 0], ref[:, 0])
    # |LI(q, decoded) - LI(q, g)| <= the largest token decode error (unit query tokens)
    dec = inp.gallery_store.decode()
    bound = float((dec.vectors - g.vectors)[g.mask].norm(dim=-1).max())
    diff = (late_interaction(q, dec) - late_interaction(q, g)).abs().max()
    assert float(diff) <= bound + 1e-5
    inp.gallery_store.save(tmp_path / "s")
    back = CodeStore.load(tmp_path / "s")
    torch.testing.assert_close(back.decode().vectors, inp.gallery_store.decode().vectors)


# --------------------------------------------------------------------------- bad input


def test_a_residual_codec_trained_on_other_features_is_named() -> None:
    rq = ResidualQuantizer(nbits=2, centroids=24)
    rq.fit(clustered(100, seed=0))
    other = Tokens(unit(torch.randn(20, 6, 16)))
    with pytest.raises(DataError, match="trained on other features"):
        rq.encode(other)
    with pytest.raises(DataError, match="16-dimensional"):
        rq.encode(clustered(5, d=8))


def test_lists_trained_on_fewer_points_are_named() -> None:
    with pytest.raises(ConfigError, match="only 52 training tokens"):
        ResidualQuantizer(centroids=64).fit(clustered(10, k=6))
    inp, _, _ = stage_inputs({"name": "fp32"}, n=30)
    with pytest.raises(ConfigError, match="lists"):
        get_registry().build("stage", {"name": "token_ivf", "lists": 500}).search(inp)
    with pytest.raises(ConfigError, match="IVF lists"):
        get_registry().build("stage", {"name": "muvera", "index": "IVF64,Flat"}).search(inp)


def test_token_sets_of_varying_k_are_named() -> None:
    inp, g, q = stage_inputs({"name": "fp32"}, n=30)
    inp.query_tokens = Tokens([torch.randn(3, 16), torch.randn(5, 16)])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="varying K"):
        get_registry().build("stage", {"name": "muvera"}).search(inp)


def test_a_kept_generator_searched_with_other_settings() -> None:
    inp, g, q = stage_inputs({"name": "fp32"}, n=30)
    reg = get_registry()
    reg.build("stage", {"name": "muvera", "repetitions": 2, "timing_queries": 0}).search(inp)
    first = inp.prepared["generator:muvera"]
    reg.build("stage", {"name": "muvera", "repetitions": 3, "timing_queries": 0}).search(inp)
    assert inp.prepared["generator:muvera"] is not first  # rebuilt, never reused
    inp.prepared["generator:muvera"].persisted = True  # as loaded with a saved index
    with pytest.raises(ConfigError, match="built with"):
        reg.build("stage", {"name": "muvera", "repetitions": 4}).search(inp)


def test_a_gallery_index_searches_with_a_generator_and_workflows_pick_it() -> None:
    from craterlab.retrieval import EncodedGallery
    from craterlab.workflows.api import search_stage

    _, g, q = stage_inputs({"name": "fp32"}, n=40)
    store = get_registry().build("quantizer", {"name": "fp32"}).encode(g)
    index = EncodedGallery([f"g{i}" for i in range(40)], pooled(g), store, device="cpu")
    res = index.search(pooled(q), q, mode="token_ivf", shortlist=40, depth=5, options={"lists": 8})
    torch.testing.assert_close(res.ranking.scores, late_interaction(q, g).topk(5, dim=1).values)
    assert "generator:token_ivf" in index.prepared
    muvera = {"retrieval": {"stages": {"muvera": {"name": "muvera", "shortlist": 9, "seed": 3}}}}
    assert search_stage(muvera) == ("muvera", {"seed": 3})
    every = {
        "retrieval": {
            "stages": {
                "single": {"name": "single"},
                "two_stage": {"name": "two_stage", "index": "Flat"},
            }
        }
    }
    assert search_stage(every) == ("two_stage", {})


@pytest.mark.parametrize(
    ("mode", "options", "other"),
    [
        ("token_ivf", {"lists": 8, "nprobe": 3}, {"lists": 8, "nprobe": 2}),
        ("token_ivf", {"lists": 8, "score": "centroids"}, {"lists": 8}),
        (
            "token_ivf",
            {"lists": 8, "refine": 20, "refine_dims": 8},
            {"lists": 8, "refine": 20, "refine_dims": 4},
        ),
        ("muvera", {"repetitions": 3, "index": "HNSW16"}, {"repetitions": 4}),
        (
            "token_ivf",
            {"lists": 16, "coarse": 4, "cell_probe": 2},
            {"lists": 16, "coarse": 4, "cell_probe": 3},
        ),
    ],
)
def test_a_saved_index_keeps_its_generator(tmp_path, mode: str, options: dict, other: dict) -> None:
    from craterlab.retrieval import EncodedGallery

    _, g, q = stage_inputs({"name": "fp32"}, n=40)
    store = get_registry().build("quantizer", {"name": "fp32"}).encode(g)
    index = EncodedGallery([f"g{i}" for i in range(40)], pooled(g), store, device="cpu")
    assert index.prepare_generator(mode, options)
    assert not index.prepare_generator("two_stage")
    before = index.search(pooled(q), q, mode=mode, shortlist=12, depth=5, options=options)
    index.save(tmp_path / "idx")
    assert (tmp_path / "idx" / "generators" / mode / "generator.json").is_file()
    loaded = EncodedGallery.load(tmp_path / "idx")
    gen = loaded.prepared[f"generator:{mode}"]
    assert gen.persisted and gen.identity() == index.prepared[f"generator:{mode}"].identity()
    after = loaded.search(pooled(q), q, mode=mode, shortlist=12, depth=5, options=options)
    assert loaded.prepared[f"generator:{mode}"] is gen  # searched with it, not rebuilt
    torch.testing.assert_close(after.ranking.shortlist, before.ranking.shortlist)
    assert after.ids == before.ids
    with pytest.raises(ConfigError, match="built with"):
        loaded.search(pooled(q), q, mode=mode, shortlist=12, depth=5, options=other)
    saved = tmp_path / "idx" / "generators" / mode
    (saved / "generator.json").write_text("{")
    with pytest.raises(DataError, match="generator.json has 1 bytes"):  # the manifest's check
        EncodedGallery.load(tmp_path / "idx")
    with pytest.raises(DataError, match="cannot be read"):
        load_generator(saved, store)
    with pytest.raises(DataError, match="covers 40 images but the gallery holds 39"):
        save_generator(gen, mode, saved)
        load_generator(saved, store.take(torch.arange(39)))


def test_int8_assignment_picks_the_nearest_centroid_of_the_decoded_tokens() -> None:
    from craterlab.retrieval.quantizers import quantize_int8
    from craterlab.retrieval.token_ivf import assign_int8

    g = clustered(50, k=6, d=32)
    codes, scales = quantize_int8(g.vectors)
    cent = unit(torch.randn(40, 32, generator=torch.Generator().manual_seed(2)))
    got = assign_int8(codes, cent.numpy()).long()
    decoded = codes.float() * scales.unsqueeze(-1)
    sims = decoded @ cent.T
    best = sims.max(-1).values
    chosen = sims.gather(-1, got.unsqueeze(-1)).squeeze(-1)
    assert float((best - chosen).max()) < 2e-2  # at worst a near-tie (centroid rounding)
    assert float((got == sims.argmax(-1)).float().mean()) > 0.95
    # built through the stage on an int8 store, the top S reranks to exhaustive LI
    inp, g2, q = stage_inputs({"name": "int8"})
    stage = get_registry().build(
        "stage",
        {"name": "token_ivf", "lists": 8, "nprobe": 8, "shortlist": 90, "timing_queries": 0},
    )
    r = stage.search(inp)
    ref = get_registry().build("stage", {"name": "exhaustive", "timing_queries": 0}).search(inp)
    torch.testing.assert_close(r.scores, ref.scores)


def test_a_token_ivf_saved_before_refine_existed_loads_as_unrefined(tmp_path) -> None:  # noqa: ANN001
    import json

    inp, g, q = stage_inputs({"name": "fp32"}, n=40)
    stage = get_registry().build("stage", {"name": "token_ivf", "lists": 8, "timing_queries": 0})
    stage.search(inp)
    gen = inp.prepared["generator:token_ivf"]
    save_generator(gen, "token_ivf", tmp_path)
    meta = json.loads((tmp_path / "generator.json").read_text())
    for key in ("refine", "refine_dims"):  # as an index saved before these settings existed
        del meta["identity"][key], meta["settings"][key]
    (tmp_path / "generator.json").write_text(json.dumps(meta))
    _, loaded = load_generator(tmp_path, inp.gallery_store)
    assert loaded.settings.refine == 0 and loaded.sketch is None
    torch.testing.assert_close(loaded.candidates(q, 10), gen.candidates(q, 10))


def test_capped_lists_read_each_lists_best_impacts_as_brute_force() -> None:
    from craterlab.retrieval.token_ivf import token_impacts

    g = clustered(60)
    q = noisy_queries(g, [2, 9, 33, 59])
    cent = unit(torch.randn(12, 16, generator=torch.Generator().manual_seed(3)))
    codes = (g.vectors @ cent.T).argmax(-1).to(torch.int32)
    impacts = token_impacts(lambda rows: Tokens(g.vectors[rows]), codes, cent, 60, chunk=7)
    torch.testing.assert_close(impacts, (g.vectors * cent[codes.long()]).sum(-1))
    cap = 6
    ivf = TokenIvf(
        cent, codes, g.mask, TokenIvfSettings(nprobe=3, max_postings=cap), impacts=impacts
    )
    kept = set()
    for c in range(12):  # each list: its images by their best real token's impact, descending
        best = {}
        for img, j in zip(*torch.where((codes == c) & g.mask), strict=True):
            best[int(img)] = max(best.get(int(img), -9.0), float(impacts[img, j]))
        got = ivf.list_ids[ivf.offsets[c] : ivf.offsets[c + 1]].tolist()
        assert got == sorted(best, key=lambda i: -best[i])
        kept |= {(c, i) for i in got[:cap]}
    # the list score by its definition over the kept postings only
    capped = codes.clone()
    capped_mask = g.mask.clone()
    for img in range(60):
        for j in range(6):
            if (int(codes[img, j]), img) not in kept:
                capped_mask[img, j] = False
    rows = ivf.candidates(q, 60)
    for i, row in enumerate(rows):
        want = brute_list_scores(capped, capped_mask, cent, q, i, 3, "next")
        cands = [c for c in row.tolist() if c >= 0]
        assert set(cands) == set(want)
        ordered = [want[c] for c in cands]
        assert all(a >= b - 1e-5 for a, b in itertools.pairwise(ordered)), ordered
    assert len(set().union(*[set(r.tolist()) for r in rows])) < 60  # the cap cut images


def test_capped_lists_need_impact_ordered_lists_and_the_list_score() -> None:
    g = clustered(20)
    cent = unit(torch.randn(8, 16, generator=torch.Generator().manual_seed(3)))
    codes = (g.vectors @ cent.T).argmax(-1).to(torch.int32)
    with pytest.raises(ConfigError, match="not ordered by impact"):
        TokenIvf(cent, codes, g.mask, TokenIvfSettings(max_postings=5))
    with pytest.raises(ConfigError, match="score='counts' reads whole lists"):
        TokenIvfSettings(max_postings=5, score="counts").check()
    # built through the stage: ordered by impact, searched, saved and loaded as such
    inp, _, q = stage_inputs({"name": "int8"})
    stage = get_registry().build(
        "stage", {"name": "token_ivf", "lists": 8, "max_postings": 30, "timing_queries": 0}
    )
    stage.search(inp)
    assert inp.prepared["generator:token_ivf"].impact_ordered


def test_two_level_lists_assign_each_token_to_the_nearest_child_of_its_nearest_cell() -> None:
    from craterlab.retrieval.quantizers import quantize_int8
    from craterlab.retrieval.token_ivf import assign_children, train_two_level

    g = clustered(80, d=16)
    sample = g.vectors[g.mask].numpy()
    cent, top = train_two_level(sample, 24, 6, 5, 0)
    assert cent.shape == (24, 16) and top.shape == (6, 16)
    flat = g.vectors.reshape(-1, 16)
    parent = torch.from_numpy(top).matmul(flat.T).argmax(0)
    got = assign_children(flat, parent, torch.from_numpy(cent), 4)
    for t in range(len(flat)):  # by definition: best cell, then the best of its 4 lists
        c = int(parent[t])
        kids = torch.from_numpy(cent[4 * c : 4 * c + 4]) @ flat[t]
        assert int(got[t]) == 4 * c + int(kids.argmax())
    # int8 codes pick the same children up to rounding ties
    codes, _ = quantize_int8(flat)
    agree = (assign_children(codes, parent, torch.from_numpy(cent), 4) == got).float().mean()
    assert float(agree) > 0.95
    # built through the stage (int8 store): lists are the two-level codes; full probes rerank
    # to exhaustive LI
    inp, g2, q = stage_inputs({"name": "int8"})
    cfg = {"name": "token_ivf", "lists": 16, "coarse": 4, "nprobe": 16, "shortlist": 90}
    r = get_registry().build("stage", {**cfg, "timing_queries": 0}).search(inp)
    assert inp.prepared["generator:token_ivf"].identity()["coarse"] == 4
    ref = get_registry().build("stage", {"name": "exhaustive", "timing_queries": 0}).search(inp)
    torch.testing.assert_close(r.scores, ref.scores)
    with pytest.raises(ValueError, match="lists=12: set lists to a multiple of coarse"):
        get_registry().build("stage", {"name": "token_ivf", "lists": 12, "coarse": 8})
