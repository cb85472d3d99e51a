"""Token stores own their rows (take / concat) and describe their scoring operand; a gallery
index searches through stages built by the registry (18.3)."""

from __future__ import annotations

import pytest
import torch

from craterlab.errors import DataError
from craterlab.plugins import get_registry
from craterlab.retrieval import EncodedGallery, LateInteraction, PQQuantizer
from craterlab.retrieval.late_interaction import late_interaction
from craterlab.retrieval.stores import ScoringOperand
from craterlab.testing import random_tokens
from craterlab.types import Tokens

QUANTIZERS = [
    {"name": "fp32"},
    {"name": "fp16"},
    {"name": "bf16"},
    {"name": "int8"},
    {"name": "int8", "scale": "image"},
    {"name": "pq", "m": 4, "nbits": 8},
]


def masked_tokens(n: int, seed: int) -> Tokens:
    t = random_tokens(n, 6, 16, seed=seed)
    mask = torch.ones(n, 6, dtype=torch.bool)
    mask[::3, 4:] = False
    return Tokens(t.vectors, mask)


@pytest.mark.parametrize("cfg", QUANTIZERS, ids=lambda c: "-".join(map(str, c.values())))
def test_take_and_concat_equal_the_rows_encoded_alone(cfg: dict) -> None:
    tokens = masked_tokens(60, 0)
    quantizer = get_registry().build("quantizer", cfg, seed=0)
    quantizer.fit(tokens)
    store = quantizer.encode(tokens)
    rows = torch.tensor([7, 3, 59, 0])
    taken = store.take(rows)
    assert len(taken) == 4 and taken.overhead is store.overhead
    torch.testing.assert_close(taken.decode().vectors, store.decode(rows).vectors)
    assert torch.equal(taken.decode().mask, tokens.mask[rows])
    joined = store.take(torch.arange(20)).concat(store.take(torch.arange(20, 60)))
    torch.testing.assert_close(joined.decode().vectors, store.decode().vectors)
    assert torch.equal(joined.decode().mask, tokens.mask) and joined.nbytes == store.nbytes


def test_concat_refuses_rows_of_another_codebook_or_shape() -> None:
    tokens = masked_tokens(64, 0)
    a, b = PQQuantizer(m=4, nbits=8, seed=0), PQQuantizer(m=4, nbits=8, seed=1)
    a.fit(tokens)
    b.fit(masked_tokens(64, 5))
    with pytest.raises(DataError, match="different codebooks"):
        a.encode(tokens).concat(b.encode(tokens))
    fp32 = get_registry().build("quantizer", {"name": "fp32"})
    with pytest.raises(DataError, match="formats differ"):
        fp32.encode(tokens).concat(a.encode(tokens))
    with pytest.raises(DataError, match="K or D differ"):
        fp32.encode(tokens).concat(fp32.encode(random_tokens(3, 5, 16, seed=1)))


class ForeignStore:
    """A third party's store: no craterlab base class, only the operand protocol."""

    format = "foreign"

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return self.tokens.vectors.numel() * 4

    def bytes_per_image(self) -> float:
        return self.nbytes / len(self)

    def decode(self, index: torch.Tensor | None = None) -> Tokens:
        return self.tokens if index is None else self.tokens[index]

    def gather(self, index: torch.Tensor) -> Tokens:
        return self.tokens[index]

    def scoring_operand(self) -> ScoringOperand:
        return ScoringOperand("float", self.tokens.vectors, None, self.tokens.mask, "fp32")


def test_matcher_asks_the_store_for_its_operand_not_its_class() -> None:
    g, q = masked_tokens(30, 1), random_tokens(5, 4, 16, seed=2)
    matcher = LateInteraction("cpu")
    plan = matcher.plan(ForeignStore(g))
    assert plan.kernel is not None and plan.kernel.name == "fp32"
    torch.testing.assert_close(
        matcher.score_store(q, ForeignStore(g)), late_interaction(q, g), atol=1e-5, rtol=0
    )
    pq = PQQuantizer(m=4, nbits=8, seed=0)
    pq.fit(masked_tokens(64, 3))
    assert matcher.plan(pq.encode(g)).kernel is None  # decode: the gather engine


def test_gallery_index_builds_its_stages_through_the_registry(monkeypatch) -> None:  # noqa: ANN001
    g, q = masked_tokens(30, 1), random_tokens(5, 4, 16, seed=2)
    gv = torch.nn.functional.normalize(g.vectors.mean(1), dim=-1)
    qv = torch.nn.functional.normalize(q.vectors.mean(1), dim=-1)
    store = get_registry().build("quantizer", {"name": "fp32"}).encode(g)
    index = EncodedGallery([f"g{i}" for i in range(30)], gv, store, device="cpu")
    built: list[dict] = []
    registry = get_registry()
    original = registry.build

    def spy(kind: str, config: dict, **kw):  # noqa: ANN202
        if kind == "stage":
            built.append(dict(config))
        return original(kind, config, **kw)

    monkeypatch.setattr(registry, "build", spy)
    res = index.search(qv, q, mode="two_stage", shortlist=30, depth=5)
    assert built[-1]["name"] == "two_stage" and built[-1]["shortlist"] == 30
    ref = late_interaction(q, g).topk(5, dim=1).indices
    assert torch.equal(res.ranking.indices, ref)
    assert any(k.startswith("stage1:") for k in index.prepared)
