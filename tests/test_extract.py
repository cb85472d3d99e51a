"""extract_features with a real (random-weight) tiny timm ViT: batched output equals
image-by-image encoding, in record order, the same with and without cache and with DataLoader
workers; the cache keeps features of different precisions apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from craterlab.backbones import timm_vit
from craterlab.backbones.extract import ExtractInfo, extract_features
from craterlab.types import ImageRecord


class Crops:
    name = "crops"

    def __init__(self, n: int = 5) -> None:
        self.n = n

    def records(self, split: str) -> list[ImageRecord]:
        return [] if split == "train" else [ImageRecord(f"c{i}", i) for i in range(self.n)]

    def load_image(self, record: ImageRecord) -> Image.Image:
        rng = np.random.default_rng(record.crater_id)
        size = 40 + 7 * record.crater_id  # varied sizes: the transform resizes
        return Image.fromarray(rng.integers(0, 255, (size, size + 3, 3), dtype=np.uint8))

    def identity(self) -> str:
        return f"crops-{self.n}"


@pytest.fixture(scope="module")
def vit():
    # fp32: batched and one-by-one bf16 matmuls are blocked differently (not bit-comparable)
    return timm_vit("test_vit", "r160_in1k", weights="random", precision="fp32")


def test_batched_matches_one_by_one(vit) -> None:
    data = Crops()
    feats, info = extract_features(vit, data, "gallery", device="cpu", batch_size=2, progress=False)
    assert isinstance(info, ExtractInfo) and info.images == 5 and not info.cache_hit
    assert feats.tokens.shape == (5, 100, 64) and feats.tokens.dtype == torch.float16
    assert feats.cls.dtype == torch.float32 and feats.attn.shape == (5, 100)
    for i, record in enumerate(data.records("gallery")):
        one = vit.encode(vit.transform(data.load_image(record)).unsqueeze(0))
        assert torch.allclose(feats.cls[i], one.cls[0], atol=1e-4)
        assert torch.allclose(feats.tokens[i].float(), one.tokens[0], atol=1e-2, rtol=1e-3)
        assert torch.allclose(feats.attn[i], one.attn[0], atol=1e-5)


def test_cache_and_workers_give_identical_features(vit, tmp_path) -> None:
    data = Crops(4)
    plain, _ = extract_features(vit, data, "query", device="cpu", batch_size=3, progress=False)
    cached, info = extract_features(
        vit,
        data,
        "query",
        device="cpu",
        batch_size=3,
        cache_dir=tmp_path,
        num_workers=2,
        progress=False,
    )
    assert info.path and info.computed == 4
    hit, info2 = extract_features(
        vit, data, "query", device="cpu", cache_dir=tmp_path, progress=False
    )
    assert info2.cache_hit
    for other in (cached, hit):
        assert torch.equal(plain.tokens, other.tokens)
        assert torch.allclose(plain.cls, other.cls, atol=1e-5)
        assert torch.allclose(plain.attn, other.attn, atol=1e-6)


def test_empty_split(vit, tmp_path) -> None:
    feats, info = extract_features(
        vit, Crops(), "train", device="cpu", cache_dir=tmp_path, progress=False
    )
    assert len(feats) == 0 and info.images == 0 and feats.cls.shape == (0, 64)


def test_cache_keeps_precisions_apart(vit, tmp_path) -> None:
    """bf16 features are cached under their own key: an fp32 run never reads them."""
    data = Crops(3)
    bf16 = timm_vit("test_vit", "r160_in1k", weights="random", precision="bf16")
    low, info = extract_features(
        bf16, data, "query", device="cpu", cache_dir=tmp_path, progress=False
    )
    full, info2 = extract_features(
        vit, data, "query", device="cpu", cache_dir=tmp_path, progress=False
    )
    assert info.computed == 3 and info2.computed == 3 and not info2.cache_hit
    assert info.path != info2.path
    assert not torch.equal(low.cls, full.cls)
    again, info3 = extract_features(
        bf16, data, "query", device="cpu", cache_dir=tmp_path, progress=False
    )
    assert info3.cache_hit and info3.path == info.path and torch.equal(again.cls, low.cls)


# --------------------------------------------------------------------------- prefetch


def test_prefetch_keeps_order_and_overlaps_the_consumer() -> None:
    import threading

    from craterlab.backbones.extract import prefetch

    producers: set[str] = set()

    def items():
        for i in range(7):
            producers.add(threading.current_thread().name)
            yield i

    assert list(prefetch(items(), depth=2)) == list(range(7))
    assert producers == {"craterlab-prefetch"}  # produced off the consumer's thread


def test_prefetch_raises_the_producers_error_where_it_happened() -> None:
    from craterlab.backbones.extract import prefetch

    def items():
        yield 1
        raise ValueError("image 2 is broken")

    got = []
    with pytest.raises(ValueError, match="image 2 is broken"):
        for x in prefetch(items()):
            got.append(x)
    assert got == [1]


def test_prefetch_stops_its_producer_when_the_consumer_stops() -> None:
    from craterlab.backbones.extract import prefetch

    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    it = prefetch(items(), depth=2)
    assert next(it) == 0
    it.close()  # joins the producer
    assert len(produced) <= 5
