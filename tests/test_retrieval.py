"""Retrieval stages and the saved gallery index, against brute-force computations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from craterlab.errors import ConfigError, DataError
from craterlab.matching import LateInteraction, late_interaction_score
from craterlab.plugins import get_registry
from craterlab.quantization import Fp32Quantizer, Int8Quantizer
from craterlab.retrieval import GalleryIndex, VectorIndex
from craterlab.testing import random_tokens
from craterlab.types import RetrievalInputs, Tokens

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


def test_exhaustive_equals_brute_force_in_small_blocks() -> None:
    inp = inputs()
    ref = late_interaction_score(inp.query_tokens, inp.gallery_store.decode()).topk(10, dim=1)
    r = build({"name": "exhaustive", "block": 3}).search(inp)
    assert torch.equal(r.indices, ref.indices)
    assert len(r.timings_ms["exhaustive"]) == 8 and r.extra["bytes_per_image"] == 5 * 16 * 4


@pytest.mark.parametrize("quantizer", [Fp32Quantizer(), Int8Quantizer()])
def test_two_stage_with_full_shortlist_equals_exhaustive(quantizer) -> None:  # noqa: ANN001
    inp = inputs(depth=20, quantizer=quantizer)
    two = build({"name": "two_stage", "shortlist": 60, "block": 5}).search(inp)
    exh = build({"name": "exhaustive"}).search(inp)
    assert torch.equal(two.indices, exh.indices)
    torch.testing.assert_close(two.scores, exh.scores)
    assert two.shortlist.shape == (8, 60)


def test_two_stage_reranks_the_shortlist_and_keeps_stage1_tail() -> None:
    inp = inputs(depth=15)
    r = build({"name": "two_stage", "shortlist": 5}).search(inp)
    s1 = (inp.query_vectors @ inp.gallery_vectors.T).topk(15, dim=1).indices
    assert torch.equal(r.shortlist, s1[:, :5])
    assert torch.equal(r.indices[:, :5].sort(1).values, s1[:, :5].sort(1).values)
    assert torch.equal(r.indices[:, 5:], s1[:, 5:])
    assert (r.scores[:, 1:] <= r.scores[:, :-1]).all()  # best first throughout
    assert set(r.timings_ms) >= {"stage1", "rerank", "total", "rerank_single"}


def test_approximate_indexes_and_their_knobs() -> None:
    g = torch.nn.functional.normalize(torch.randn(400, 16), dim=-1)
    q = g[:10]
    for spec, knobs in [("IVF4,Flat", {"nprobe": 4}), ("HNSW16", {"ef_search": 64})]:
        idx = VectorIndex(spec, **knobs).build(g)
        _, ids, _ = idx.search(q, 1)
        assert torch.equal(ids[:, 0], torch.arange(10))  # each vector finds itself
    with pytest.raises(ConfigError, match="IVF lists"):
        VectorIndex("IVF1024,Flat").build(g)
    with pytest.raises(ConfigError, match="nprobe"):
        VectorIndex("Flat", nprobe=3).build(g)
    with pytest.raises(ConfigError, match="index_factory"):
        VectorIndex("NotAnIndex").build(g)


def test_gallery_index_save_load_round_trip(tmp_path: Path) -> None:
    g, q, gv, qv = data()
    ids = [f"crater-{i:03d}" for i in range(60)]
    index = GalleryIndex(ids, gv, Int8Quantizer().encode(g), index="HNSW16", device="cpu")
    before = {
        m: index.search(qv, q, mode=m, shortlist=10, depth=5)
        for m in ("single", "two_stage", "exhaustive")
    }
    index.save(tmp_path / "idx")
    loaded = GalleryIndex.load(tmp_path / "idx")
    for mode, res in before.items():
        after = loaded.search(qv, q, mode=mode, shortlist=10, depth=5)
        assert after.ids == res.ids
        assert torch.equal(after.ranking.scores, res.ranking.scores)
    assert before["single"].ids[0][0] == ids[before["single"].ranking.indices[0, 0]]
    with pytest.raises(DataError, match="meta.json"):
        GalleryIndex.load(tmp_path / "missing")
    with pytest.raises(ConfigError, match="tokens"):
        GalleryIndex(ids, gv).search(qv, mode="exhaustive")


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
