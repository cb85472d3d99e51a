"""Paired views for DINO (``pretrain.pair_views``): images grouped by place, crops of one place
drawn from different images of it.

Checked: the config's rules; the view picks (globals from distinct images of one place, a
single-image place falls back to its one image); grouping by an explicit place key, by map
coordinates within a radius (against a brute-force reference) and by lat/lon on a body in km;
that every global crop of a batch element comes from its own place and the two from two
different images; the one-paragraph refusal when no place has two images; and a tiny run.
"""

from __future__ import annotations

import csv
import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_pretrain import TINY, vit

from craterlab.errors import ConfigError, DataError
from craterlab.train.pretrain import ImageSource, items_source, paired_views, pretrain
from craterlab.train.pretrain_config import PretrainConfig, validate_pretrain_config
from craterlab.train.ssl_pairs import pick_views, place_groups, radius_groups
from craterlab.train.ssl_views import MultiCrop
from craterlab.types import ImageRecord


class Places:
    """Flat grey images, image ``i`` of value ``(i + 1) / (n + 1)`` (so a crop names its
    image), with a place key and a centre per image."""

    name = "places"

    def __init__(self, keys: list[object], xy: list[tuple[float, float]] | None = None) -> None:
        self.keys = keys
        self.xy = xy
        n = len(keys)
        self.values = [round(255 * (i + 1) / (n + 1)) for i in range(n)]
        self._records = [ImageRecord(f"img{i}", 0) for i in range(n)]  # one label for all

    def records(self, split: str) -> list[ImageRecord]:
        return self._records if split == "train" else []

    def load_image(self, record: ImageRecord) -> Image.Image:
        value = self.values[int(record.image_id[3:])]
        return Image.fromarray(np.full((32, 32), value, np.uint8), mode="L").convert("RGB")

    def place_of(self, record: ImageRecord) -> object:
        return self.keys[int(record.image_id[3:])]

    def place_xy(self, record: ImageRecord) -> tuple[float, float] | None:
        assert self.xy is not None
        return self.xy[int(record.image_id[3:])]

    def identity(self) -> str:
        return f"places-{self.keys}"


PLAIN = {  # views that keep the image's grey value: no crop change, no photometric change
    "global_scale": [1.0, 1.0], "local_scale": [1.0, 1.0], "gamma": [1.0, 1.0],
    "contrast": 0.0, "brightness": 0.0, "blur_prob": 0.0, "noise": 0.0, "azimuth": "none",
}  # fmt: skip


# --------------------------------------------------------------------------- config


def test_config_pairing_rules() -> None:
    assert validate_pretrain_config({}).pair_views == "none"
    cfg = validate_pretrain_config({"pair_views": "coordinates", "pair_radius": 2.0})
    assert cfg.pair_radius == 2.0
    with pytest.raises(ConfigError, match="pair_views=coordinates needs pair_radius"):
        validate_pretrain_config({"pair_views": "coordinates"})
    with pytest.raises(ConfigError, match="pair_radius must be > 0"):
        validate_pretrain_config({"pair_views": "place", "pair_radius": -1.0})
    with pytest.raises(ConfigError, match="pair_views"):
        validate_pretrain_config({"pair_views": "label"})


# --------------------------------------------------------------------------- picks


def test_globals_come_from_distinct_images_of_the_place() -> None:
    rng = random.Random(0)
    picks = pick_views([2, 5, 1, 3] * 50, 2, 3, rng)
    for n, (g, loc) in zip([2, 5, 1, 3] * 50, picks, strict=True):
        assert all(0 <= i < n for i in g + loc) and len(loc) == 3
        if n > 1:
            assert g[0] != g[1]
        else:
            assert g == [0, 0]  # a single-image place: plain DINO views of its one image
    # every image of a place is drawn as a global over many batches
    assert {tuple(sorted(g)) for g, _ in pick_views([3] * 60, 2, 0, rng)} == {
        (0, 1),
        (0, 2),
        (1, 2),
    }
    # more globals than images: each image once before any repeats
    g, _ = pick_views([2], 3, 0, rng)[0]
    assert sorted(g[:2]) == [0, 1]


def test_each_batch_element_gets_two_images_of_its_own_place() -> None:
    data = Places(["a", "a", "b", "b", "b", "c"])
    source = ImageSource(data)
    groups = place_groups(source, "place")
    assert groups == [[0, 1], [2, 3, 4], [5]]
    cfg = PretrainConfig(**PLAIN, local_crops=2)
    crops = MultiCrop(cfg, 32, 16, [0.0] * 3, [1.0] * 3)
    for seed in range(10):
        globals_, locals_ = paired_views(source, crops, groups, [0, 1, 2], random.Random(seed))
        for b, place in enumerate(groups):
            own = {data.values[i] for i in place}
            seen = [round(float(v[b].mean()) * 255) for v in globals_]
            assert set(seen) <= own
            assert len(set(seen)) == min(2, len(place))  # two images where there are two
            assert {round(float(v[b].mean()) * 255) for v in locals_} <= own


# --------------------------------------------------------------------------- grouping


def test_coordinate_groups_match_a_brute_force_single_linkage() -> None:
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 10, (60, 2))
    points[[3, 17]] = np.nan  # no position: a place of its own
    labels = radius_groups(points, [""] * 60, 1.0)
    parent = list(range(60))  # reference: union-find over every pair closer than the radius

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in itertools.combinations(range(60), 2):
        if np.hypot(*(points[i] - points[j])) <= 1.0:
            parent[root(i)] = root(j)
    for i, j in itertools.combinations(range(60), 2):
        assert (labels[i] == labels[j]) == (root(i) == root(j))
    assert sum(labels[3] == x for x in labels) == 1


def test_dataset_coordinates_pair_views_without_labels() -> None:
    xy = [(0.0, 0.0), (0.3, 0.0), (5.0, 5.0), (5.0, 5.2), (9.0, 0.0)]
    groups = place_groups(ImageSource(Places(list("abcde"), xy)), "coordinates", 0.5)
    assert groups == [[0, 1], [2, 3], [4]]


def test_manifest_lat_lon_pairs_within_km_and_place_column(tmp_path: Path) -> None:
    # Moon (IAU_2015:30100, R 1737.4 km): 0.01 deg of latitude = 0.303 km
    rows = [
        ("a", 10.0, 20.0, "p1"),
        ("b", 10.01, 20.0, "p1"),
        ("c", 10.2, 20.0, "p2"),
        ("d", 10.2, 20.0, ""),
    ]
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "path", "crater_id", "role", "lat", "lon", "diameter_km", "crs"])
        for name, lat, lon, _ in rows:
            Image.new("L", (32, 32), 100).save(tmp_path / f"{name}.png")
            w.writerow([name, f"{name}.png", name, "gallery", lat, lon, 1.0, "IAU_2015:30100"])
    source = items_source(str(tmp_path / "m.csv"))
    assert place_groups(source, "coordinates", 0.35) == [[0, 1], [2, 3]]
    assert place_groups(source, "coordinates", 0.25) == [[0], [1], [2, 3]]
    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "path", "crater_id", "role", "place"])
        for name, *_, place in rows:
            w.writerow([name, f"{name}.png", name, "gallery", place])
    assert place_groups(items_source(str(tmp_path / "p.csv")), "place") == [[0, 1], [2], [3]]


def test_no_place_with_two_images_is_refused_in_one_paragraph(tmp_path: Path) -> None:
    for i in range(3):
        Image.new("L", (32, 32), 50 * i).save(tmp_path / f"{i}.png")
    with pytest.raises(DataError) as info:
        place_groups(items_source(str(tmp_path)), "place")
    text = str(info.value)
    assert "none of its 3 images has a place key" in text and "\n" not in text
    assert "'place' column" in text and "pretrain.pair_views=none" in text
    with pytest.raises(DataError, match="no two of the 3 positioned images lie within"):
        place_groups(ImageSource(Places([1, 2, 3], [(0, 0), (2, 0), (4, 0)])), "coordinates", 1)


# --------------------------------------------------------------------------- the loop


def test_paired_pretraining_runs_and_names_its_pairing(tmp_path: Path) -> None:
    from craterlab.backbones.lineage import read_lineage, status_of

    data = Places([0, 0, 1, 1, 2, 2, 3, 3, 4])
    cfg = {**TINY, "pair_views": "place"}
    ckpt = pretrain(cfg, vit(), ImageSource(data), device="cpu", seed=0, out_dir=tmp_path)
    trained = vit(str(ckpt))
    lineage = read_lineage(ckpt)
    assert lineage is not None
    assert "dino, views paired by place" in status_of(lineage, f"checkpoint:{ckpt}")
    assert not torch.equal(
        trained.model.state_dict()["blocks.0.attn.qkv.weight"],
        vit().model.state_dict()["blocks.0.attn.qkv.weight"],
    )
    with pytest.raises(DataError, match="has 2 places for pretrain.batch_size 4"):
        pretrain(cfg, vit(), ImageSource(Places([0, 0, 0, 1, 1, 1])), device="cpu", seed=0)
