"""Sharded extraction: shard ranges cover a split in whole batches, and two shard parts merge
into the entry a single job writes, with the same name and the same bytes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from craterlab.backbones import timm_vit
from craterlab.backbones.extract import extract_features
from craterlab.cache import cache_info
from craterlab.errors import ConfigError
from craterlab.sweeps.shards import ShardView, merge_shards, shard_range, shard_views
from craterlab.types import ImageRecord


class Crops:
    name = "crops"

    def __init__(self, n: int) -> None:
        self.n = n

    def records(self, split: str) -> list[ImageRecord]:
        return [ImageRecord(f"{split}{i}", i) for i in range(self.n)]

    def load_image(self, record: ImageRecord) -> Image.Image:
        rng = np.random.default_rng(record.crater_id)
        return Image.fromarray(rng.integers(0, 255, (48, 51, 3), dtype=np.uint8))

    def identity(self) -> str:
        return f"crops-{self.n}"


@pytest.mark.parametrize("n,batch,shards", [(37, 8, 2), (37, 8, 3), (5, 8, 2), (64, 4, 7)])
def test_shard_ranges_cover_the_split_in_whole_batches(n, batch, shards) -> None:
    ranges = [shard_range(n, batch, i, shards) for i in range(shards)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (_, hi), (lo, _) in zip(ranges, ranges[1:], strict=False):
        assert hi == lo  # contiguous, disjoint
    assert all(lo % batch == 0 for lo, _ in ranges)  # every shard starts on a batch boundary
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= batch  # spread evenly, to within one batch


def test_a_shard_outside_the_count_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"extract.shard=2 is not a shard of extract.num_sh"):
        shard_range(10, 4, 2, 2)


def test_two_shards_merge_into_the_single_job_entry_byte_for_byte(tmp_path) -> None:
    vit = timm_vit("test_vit", "r160_in1k", weights="random", precision="fp32")
    data = Crops(21)  # 3 batches of 8: shards of 1 and 2 batches
    single, info = extract_features(
        vit, data, "gallery", device="cpu", batch_size=8, cache_dir=tmp_path / "one", progress=False
    )
    sharded = tmp_path / "sharded"
    views = shard_views(data, "gallery", 8, 2)
    assert [(v.lo, v.hi) for v in views] == [(0, 8), (8, 21)]
    assert merge_shards(vit, data, "gallery", batch_size=8, num_shards=2, cache_dir=sharded) is None
    for view in views:  # what the two shard jobs do
        extract_features(
            vit, view, "gallery", device="cpu", batch_size=8, cache_dir=sharded, progress=False
        )
    merged = merge_shards(vit, data, "gallery", batch_size=8, num_shards=2, cache_dir=sharded)
    assert merged is not None and merged.name == info.path.split("/")[-1]  # same identity
    for name in ("cls.npy", "tokens.npy", "attn.npy", "meta.json"):
        assert (merged / name).read_bytes() == (tmp_path / "one" / merged.name / name).read_bytes()
    assert [e.name for e in cache_info(sharded)] == [merged.name]  # the parts are gone
    # a run now gets a cache hit with the single job's features
    again, hit = extract_features(
        vit, data, "gallery", device="cpu", batch_size=8, cache_dir=sharded, progress=False
    )
    assert hit.cache_hit and np.array_equal(again.tokens.numpy(), single.tokens.numpy())


def test_a_shard_view_has_its_own_identity_and_rows() -> None:
    data = Crops(10)
    view = ShardView(data, "gallery", 4, 8, "shard 1/2")
    assert [r.image_id for r in view.records("gallery")] == [f"gallery{i}" for i in range(4, 8)]
    assert view.identity() != data.identity()
    with pytest.raises(ValueError, match="has no split 'query'"):
        view.records("query")
