"""extract_features with a real (random-weight) ViT-S/16: batched output equals image-by-image
encoding, in record order, the same with and without cache and with DataLoader workers."""

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
    return timm_vit("vit_small_patch16_224", "dino", weights="random")


def test_batched_matches_one_by_one(vit) -> None:
    data = Crops()
    feats, info = extract_features(vit, data, "gallery", device="cpu", batch_size=2, progress=False)
    assert isinstance(info, ExtractInfo) and info.images == 5 and not info.cache_hit
    assert feats.tokens.shape == (5, 196, 384) and feats.tokens.dtype == torch.float16
    assert feats.cls.dtype == torch.float32 and feats.attn.shape == (5, 196)
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
    assert len(feats) == 0 and info.images == 0 and feats.cls.shape == (0, 384)
