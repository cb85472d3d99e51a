"""Retrieval stages and the saved gallery index, against brute-force computations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from craterlab.errors import ConfigError, DataError
from craterlab.plugins import get_registry
from craterlab.retrieval import (
    EncodedGallery,
    Fp32Quantizer,
    Int8Quantizer,
    LateInteraction,
    SingleVectorIndex,
    Stage1Settings,
)
from craterlab.retrieval.late_interaction import late_interaction
from craterlab.retrieval.timing import single_query_latencies, timed_blocks
from craterlab.testing import random_tokens
from craterlab.types import Ranking, RetrievalInputs, StageReport, Tokens

CONF = Path(__file__).resolve().parents[1] / "conf" / "retrieval"


def data(
    ng: int = 60, nq: int = 8, seed: int = 0
) -> tuple[Tokens, Tokens, torch.Tensor, torch.Tensor]:
    g, q = random_tokens(ng, 5, 16, seed=seed), random_tokens(nq, 4, 16, seed=seed + 1)
    gv = torch.nn.functional.normalize(g.vectors.mean(1), dim=-1)
    qv = torch.nn.functional.normalize(q.vectors.mean(1), dim=-1)
    return g, q, gv, qv


def inputs(depth: int = 10, quantizer=None) -> RetrievalInputs:  # noqa: ANN001
    g, q, gv, qv = data()
    store = (quantizer or Fp32Quantizer()).encode(g)
    return RetrievalInputs(qv, gv, q, store, LateInteraction("cpu"), depth)


def build(cfg: dict):  # noqa: ANN201
    return get_registry().build("stage", cfg)


@pytest.mark.parametrize("index", ["Flat", "torch"])
def test_single_equals_brute_force(index: str) -> None:
    inp = inputs()
    r = build({"name": "single", "index": index}).search(inp)
    ref = (inp.query_vectors @ inp.gallery_vectors.T).topk(10, dim=1)
    assert torch.equal(r.indices, ref.indices)
    torch.testing.assert_close(r.scores, ref.values)
    assert len(r.timings_ms["stage1"]) == 8 and r.extra["index_bytes"] > 0
    assert r.report.bytes_per_image == r.extra["index_bytes"] / 60
    assert r.report.stage1 == {"index": index, "nprobe": None, "ef_search": None, "device": "auto"}


def test_exhaustive_equals_brute_force_in_small_blocks() -> None:
    inp = inputs()
    ref = late_interaction(inp.query_tokens, inp.gallery_store.decode()).topk(10, dim=1)
    r = build({"name": "exhaustive", "block": 3}).search(inp)
    assert torch.equal(r.indices, ref.indices)
    assert len(r.timings_ms["exhaustive"]) == 8 and r.report.bytes_per_image == 5 * 16 * 4
    assert r.report.reference and not r.report.recovers_reference and r.report.stage1 is None


@pytest.mark.parametrize(
    "quantizer", [Fp32Quantizer(), Int8Quantizer(), Int8Quantizer(scale="image")]
)
def test_two_stage_with_full_shortlist_equals_exhaustive(quantizer) -> None:  # noqa: ANN001
    inp = inputs(depth=20, quantizer=quantizer)
    two = build({"name": "two_stage", "shortlist": 60, "block": 5}).search(inp)
    exh = build({"name": "exhaustive"}).search(inp)
    assert torch.equal(two.indices, exh.indices)
    torch.testing.assert_close(two.scores, exh.scores)
    assert two.shortlist.shape == (8, 60)
    store_bytes = inp.gallery_store.bytes_per_image()
    assert two.report.bytes_per_image == two.extra["index_bytes"] / 60 + store_bytes
    assert two.report.recovers_reference and not two.report.reference


def test_two_stage_reranks_the_shortlist_and_keeps_stage1_tail() -> None:
    inp = inputs(depth=15)
    r = build({"name": "two_stage", "shortlist": 5}).search(inp)
    s1 = (inp.query_vectors @ inp.gallery_vectors.T).topk(15, dim=1).indices
    assert torch.equal(r.shortlist, s1[:, :5])
    assert torch.equal(r.indices[:, :5].sort(1).values, s1[:, :5].sort(1).values)
    assert torch.equal(r.indices[:, 5:], s1[:, 5:])
    assert (r.scores[:, 1:] <= r.scores[:, :-1]).all()  # best first throughout
    assert set(r.timings_ms) >= {"stage1", "rerank", "total", "rerank_single"}
    rep = r.report
    assert set(rep.latency_ms) == {"stage1", "rerank", "total"}
    assert rep.latency_ms["total"] == [
        a + b for a, b in zip(rep.latency_ms["stage1"], rep.latency_ms["rerank"], strict=True)
    ]
    metrics = rep.metrics()
    assert metrics["ms_per_query"] == pytest.approx(sum(rep.latency_ms["total"]) / 8)
    assert {"latency_rerank_single_p50_ms", "latency_total_p95_ms", "bytes_per_image"} <= set(
        metrics
    )


def test_report_of_a_stage_that_only_fills_timings() -> None:
    """Third-party stages that set only ``timings_ms`` still get a report (sum of part means)."""
    r = Ranking(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1))
    r.timings_ms = {"a": [1.0, 3.0], "b": [2.0, 2.0], "a_single": [5.0]}
    rep = r.stage_report(default_bytes=12.0)
    assert rep.latency_ms["total"] == [4.0, 4.0] and rep.single_latency_ms == {"a": [5.0]}
    assert rep.metrics()["bytes_per_image"] == 12.0
    assert rep.metrics()["latency_a_single_p50_ms"] == 5.0
    assert StageReport(1.0).metrics()["ms_per_query"] != StageReport(1.0).metrics()["ms_per_query"]


def test_timed_blocks_charge_each_query_its_blocks_share() -> None:
    calls: list[tuple[int, int]] = []
    lat = timed_blocks(7, 3, lambda q0, q1: calls.append((q0, q1)))
    assert calls == [(0, 3), (3, 6), (6, 7)] and len(lat) == 7
    assert lat[0] == lat[1] == lat[2] and all(x >= 0 for x in lat)
    seen: list[int] = []
    assert len(single_query_latencies(seen.append, 5, 3)) == 3 and seen == [0, 1, 2]


def test_approximate_indexes_and_their_knobs() -> None:
    g = torch.nn.functional.normalize(torch.randn(400, 16), dim=-1)
    q = g[:10]
    for spec, knobs in [("IVF4,Flat", {"nprobe": 4}), ("HNSW16", {"ef_search": 64})]:
        idx = SingleVectorIndex(spec, **knobs).build(g)
        _, ids, _ = idx.search(q, 1)
        assert torch.equal(ids[:, 0], torch.arange(10))  # each vector finds itself
    with pytest.raises(ConfigError, match="IVF lists"):
        SingleVectorIndex("IVF1024,Flat").build(g)
    with pytest.raises(ConfigError, match="nprobe"):
        SingleVectorIndex("Flat", nprobe=3).build(g)
    with pytest.raises(ConfigError, match="index_factory"):
        SingleVectorIndex("NotAnIndex").build(g)
    with pytest.raises(DataError, match="16-dimensional"):
        SingleVectorIndex("Flat").build(g).search(torch.randn(2, 8), 1)
    settings = Stage1Settings("HNSW16", ef_search=64, device="cpu")
    assert settings.make().settings == settings
    assert Stage1Settings.from_dict({**settings.as_dict(), "other": 1}) == settings


def test_gallery_index_save_load_round_trip(tmp_path: Path) -> None:
    g, q, gv, qv = data()
    ids = [f"crater-{i:03d}" for i in range(60)]
    built_by = {"backbone": "vit_small_patch16_224.dino", "tokens": "instance", "k": 5}
    index = EncodedGallery(
        ids, gv, Int8Quantizer().encode(g), index="HNSW16", ef_search=48, device="cpu",
        metadata=built_by,
    )  # fmt: skip
    before = {
        m: index.search(qv, q, mode=m, shortlist=10, depth=5)
        for m in ("single", "two_stage", "exhaustive")
    }
    index.save(tmp_path / "idx")
    loaded = EncodedGallery.load(tmp_path / "idx")
    assert loaded.stage1 == Stage1Settings("HNSW16", None, 48, "cpu")
    assert loaded.vindex.faiss_index.hnsw.efSearch == 48  # the knob is applied after loading
    assert loaded.metadata == built_by
    for mode, res in before.items():
        after = loaded.search(qv, q, mode=mode, shortlist=10, depth=5)
        assert after.ids == res.ids
        assert torch.equal(after.ranking.scores, res.ranking.scores)
    assert before["single"].ids[0][0] == ids[before["single"].ranking.indices[0, 0]]
    with pytest.raises(DataError, match="meta.json"):
        EncodedGallery.load(tmp_path / "missing")
    with pytest.raises(ConfigError, match="tokens"):
        EncodedGallery(ids, gv).search(qv, mode="exhaustive")


def test_gallery_index_memory_maps_its_token_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mmap=True pages the codes from disk and answers exactly as the in-memory load does."""
    import numpy as np

    g, q, gv, qv = data()
    index = EncodedGallery([str(i) for i in range(60)], gv, Int8Quantizer().encode(g))
    index.save(tmp_path / "idx")
    in_memory = EncodedGallery.load(tmp_path / "idx")
    fromfile = np.fromfile

    def no_store_reads(file, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        assert "store" not in Path(file).parts, f"{file} was read into memory, not mapped"
        return fromfile(file, *args, **kwargs)

    monkeypatch.setattr(np, "fromfile", no_store_reads)
    mapped = EncodedGallery.load(tmp_path / "idx", mmap=True, verify=False)
    monkeypatch.undo()
    codes = mapped.store.payload["codes"]
    for mode in ("two_stage", "exhaustive"):
        a = in_memory.search(qv, q, mode=mode, shortlist=10, depth=5)
        b = mapped.search(qv, q, mode=mode, shortlist=10, depth=5)
        assert a.ids == b.ids
        assert torch.equal(a.ranking.scores, b.ranking.scores)
    before = (tmp_path / "idx" / "store" / "codes.bin").read_bytes()
    codes.zero_()  # copy-on-write: the file on disk is never written through the map
    assert (tmp_path / "idx" / "store" / "codes.bin").read_bytes() == before


def test_gallery_index_names_a_query_dimension_mismatch() -> None:
    g, q, gv, qv = data()
    index = EncodedGallery(
        [str(i) for i in range(60)], gv, Fp32Quantizer().encode(g), metadata={"backbone": "b"}
    )
    with pytest.raises(DataError, match=r"16-dimensional vectors \(built by backbone=b\)"):
        index.search(torch.randn(3, 8), mode="single")
    with pytest.raises(DataError, match="16-dimensional tokens"):
        index.search(qv, Tokens(torch.randn(8, 4, 12)), mode="two_stage")
    with pytest.raises(DataError, match="one token set per query"):
        index.search(qv, q[:3], mode="exhaustive")


def test_retrieval_configs_have_the_run_shape() -> None:
    all_cfg = OmegaConf.load(CONF / "all.yaml")
    assert list(all_cfg.stages) == ["single", "exhaustive", "two_stage"]
    root = OmegaConf.create({"shortlist": 7})
    for name in ("all", "single", "exhaustive", "two_stage"):
        cfg = OmegaConf.merge(root, OmegaConf.load(CONF / f"{name}.yaml"))
        for key, node in cfg.stages.items():
            stage = build(node)
            if key == "two_stage":
                assert stage.shortlist == 7
    with pytest.raises(ConfigError, match="shortlist"):
        build({"name": "two_stage", "shortlist": 0})


# --------------------------------------------------------------------------- index=auto


def test_auto_index_picks_by_gallery_size_and_searches_few_queries_on_one_thread(
    monkeypatch,
) -> None:
    import faiss

    from craterlab.retrieval import vector_index as V

    assert V.auto_index(49_999) == ("Flat", None, None)
    assert V.auto_index(50_000) == ("HNSW32", None, 32)
    assert V.auto_index(1_000_000) == ("PQ96x4fs", None, None)
    g = torch.nn.functional.normalize(
        torch.randn(300, 16, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    small = V.SingleVectorIndex("auto").build(g)
    assert small.spec == "Flat"
    _, ids, _ = small.search(g[:5], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]  # exact
    monkeypatch.setattr(V, "AUTO_HNSW_FROM", 200)
    graph = V.SingleVectorIndex("auto").build(g)
    assert graph.spec == "HNSW32" and graph.settings.index == "HNSW32"
    assert graph.ef_search == 32 and faiss.downcast_index(graph.faiss_index).hnsw.efSearch == 32
    assert V.SingleVectorIndex("auto", ef_search=80).build(g).ef_search == 80  # given: kept
    _, ids, _ = graph.search(g[:20], 1)
    assert (ids[:, 0] == torch.arange(20)).float().mean() >= 0.95
    monkeypatch.setattr(V, "AUTO_PQ_FROM", 600)  # the 1M choice: 4-bit fast-scan PQ, exhaustive
    wide = torch.nn.functional.normalize(
        torch.randn(640, 96, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # 96 tiny k-means: OpenMP teams cost more than they give
    try:
        pq = V.SingleVectorIndex("auto").build(wide)
    finally:
        faiss.omp_set_num_threads(threads)
    assert pq.spec == "PQ96x4fs" and isinstance(pq.faiss_index, faiss.IndexPQFastScan)
    _, ids, _ = pq.search(wide[:20], 5)
    assert (ids == torch.arange(20).unsqueeze(1)).any(1).float().mean() >= 0.9
    seen = []
    real = faiss.omp_set_num_threads
    monkeypatch.setattr(faiss, "omp_set_num_threads", lambda n: (seen.append(n), real(n)))
    before = faiss.omp_get_max_threads()
    small.search(g[:1], 3)
    small.search(g[:50], 3)
    assert seen == [1, before, before, before]  # one query: one thread; a batch: all; restored
    assert V.search_threads(1) == 1 and V.search_threads(V.FEW_QUERIES + 1) == before
