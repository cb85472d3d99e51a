"""The synthetic crater benchmark: protocol, determinism, laziness, generator physics."""

from __future__ import annotations

import numpy as np
import pytest

from craterlab.data.surface import CraterField, crater_profile, hash64, render
from craterlab.data.synthetic import SIZES, SyntheticCraters
from craterlab.errors import DataError
from craterlab.types import ImageRecord


@pytest.fixture(scope="module")
def tiny() -> SyntheticCraters:
    return SyntheticCraters(size="tiny", image_size=48, seed=3)


def test_splits_follow_the_protocol(tiny):
    gallery, query, train = (tiny.records(s) for s in ("gallery", "query", "train"))
    n_id, n_q = SIZES["tiny"]
    assert len(gallery) == 2 * n_id
    assert sorted({r.view_type for r in gallery}) == ["2x", "3x"]
    assert sorted({r.crater_id for r in gallery}) == list(range(n_id))
    assert len(query) == 5 * n_q
    gallery_ids = {r.crater_id for r in gallery}
    for q in query:
        assert q.crater_id in q.relevant_ids
        assert q.relevant_ids <= gallery_ids
    # train identities are disjoint from query craters and from every relevance set
    held = {q.crater_id for q in query}.union(*(q.relevant_ids for q in query))
    assert train and not {r.crater_id for r in train} & held
    ids = [r.image_id for r in (*gallery, *query)]
    assert len(ids) == len(set(ids))


def test_images_are_deterministic_rgb_and_sized(tiny):
    rec = tiny.records("query")[0]
    a, b = tiny.load_image(rec), tiny.load_image(rec)
    assert a.mode == "RGB" and a.size == (48, 48)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    other = SyntheticCraters(size="tiny", image_size=48, seed=3)
    assert np.array_equal(np.asarray(other.load_image(rec)), np.asarray(a))
    assert other.identity() == tiny.identity()
    assert other.records("query") == tiny.records("query")


def test_identity_changes_with_every_parameter(tiny):
    base = tiny.identity()
    variants = [
        SyntheticCraters(size="tiny", image_size=48, seed=4),
        SyntheticCraters(size="tiny", image_size=64, seed=3),
        SyntheticCraters(size="tiny", image_size=48, seed=3, crater_density=0.7),
        SyntheticCraters(size="tiny", image_size=48, seed=3, views_per_query=4),
        SyntheticCraters(size="tiny", image_size=48, seed=3, n_identities=30),
    ]
    idents = {v.identity() for v in variants}
    assert base not in idents and len(idents) == len(variants)


def test_seed_changes_images():
    a = SyntheticCraters(size="tiny", image_size=32, seed=0)
    b = SyntheticCraters(size="tiny", image_size=32, seed=1)
    rec = a.records("gallery")[0]
    assert not np.array_equal(np.asarray(a.load_image(rec)), np.asarray(b.load_image(rec)))


def test_full_scale_catalogue_is_cheap_and_lazy():
    full = SyntheticCraters(size="full", image_size=32)
    assert len(full.records("gallery")) == 50_000
    assert len(full.records("query")) == 5_000
    img = full.load_image(full.records("gallery")[49_999])
    assert img.size == (32, 32)


def test_query_view_differs_from_gallery_and_relevance_is_co_visible(tiny):
    q = tiny.records("query")[0]
    view = tiny.view_of(q.image_id)
    x, y, d = tiny.crater(q.crater_id)
    assert abs(view.centre[0] - x) <= 0.25 * d + 1e-9
    assert 1.8 * d <= view.width <= 3.5 * d
    for c in q.relevant_ids:
        cx, cy, cd = tiny.crater(c)
        assert np.hypot(cx - view.centre[0], cy - view.centre[1]) <= 0.25 * view.width + 1e-9 or (
            c == q.crater_id
        )
        assert 0.5 <= cd / d <= 2.0
    assert set(tiny.raw_covisible[q.image_id]) >= q.relevant_ids


def test_foreign_image_id_is_a_data_error(tiny):
    with pytest.raises(DataError, match="does not belong"):
        tiny.load_image(ImageRecord("g99999_2x", 99999))


def test_invalid_config_values():
    with pytest.raises(ValueError, match="n_query_craters"):
        SyntheticCraters(size="tiny", n_query_craters=100)
    with pytest.raises(ValueError, match="size"):
        SyntheticCraters(size="huge")  # type: ignore[arg-type]


def test_size_frequency_distribution_is_steep():
    """Cumulative N(>D) ~ D^-2: each octave up holds about 4x fewer craters."""
    field = CraterField(lam=1.0)
    counts = [field.craters_of_class(0, j, 0, 0, 256, 256)["d"].size for j in (-2, -1, 0)]
    assert counts[0] / counts[1] == pytest.approx(4, rel=0.15)
    assert counts[1] / counts[2] == pytest.approx(4, rel=0.25)


def test_crater_profile_morphometry():
    r = np.linspace(0, 3, 3001)
    d = 2.0
    fresh, _ = crater_profile(r, np.asarray(d), np.asarray(0), complex_d=3.0)
    rim = fresh[np.argmin(np.abs(r - 1.0))]
    depth = rim - fresh[0]
    assert depth / d == pytest.approx(0.2, rel=0.05)  # bowl depth/diameter ~ 0.2
    assert rim > 0 and fresh[-1] == pytest.approx(0.0, abs=1e-9)  # raised rim, ejecta fades
    degraded, _ = crater_profile(r, np.asarray(d), np.asarray(3), complex_d=3.0)
    assert degraded.max() - degraded.min() < 0.7 * (fresh.max() - fresh.min())
    big, _ = crater_profile(r, np.asarray(4.0), np.asarray(0), complex_d=3.0)
    floor = big[(r > 0.25) & (r < 0.4)]
    assert np.ptp(floor) < 0.01 * 4.0  # flat floor
    assert big[0] > floor.mean() + 0.05  # central peak


def test_hillshading_follows_the_sun(tiny):
    """Lit from the west, a bowl's east inner wall faces the sun: brighter than the west one."""
    from craterlab.data.surface import Photometry

    for c in range(3):
        x, y, d = tiny.crater(c)
        means = {}
        for az in (270.0, 90.0):
            ph = Photometry(sun_azimuth=az, sun_elevation=30.0, noise=0.0)
            img = render(tiny.seed, tiny.field, (x, y), 2 * d, 64, ph, 0).astype(float)
            west, east = img[26:38, 20:28].mean(), img[26:38, 36:44].mean()
            means[az] = east - west
        assert means[270.0] > 0 > means[90.0]


def test_flat_ground_ignores_the_sun_and_hash_is_ordered():
    from craterlab.data.surface import Photometry

    field = CraterField(lam=1e-9)  # (almost) no craters
    imgs = [
        render(0, field, (0.0, 0.0), 4.0, 64, Photometry(a, e, noise=0.0), 0, terrain_amplitude=0)
        for a, e in ((270.0, 30.0), (90.0, 30.0), (10.0, 60.0))
    ]
    # flat ground: brightness is albedo only (exposure-normalized), whatever the sun
    assert np.abs(imgs[0].astype(int) - imgs[1]).max() <= 1
    assert np.abs(imgs[0].astype(int) - imgs[2]).max() <= 1
    assert int(hash64(1, 2)) != int(hash64(2, 1))


def test_renderings_of_one_place_share_its_place_and_lie_near_it(tiny):
    # paired-view pretraining groups images by place: every rendering of a train place (two
    # gallery crops, query-like views under other suns) is centred within 0.25 D of it
    by_place: dict[int, list[ImageRecord]] = {}
    for r in tiny.records("train"):
        by_place.setdefault(tiny.place_of(r), []).append(r)
    assert all(len(rs) == 2 + tiny.train_views for rs in by_place.values())
    for place, rs in by_place.items():
        x, y, d = tiny.crater(place)
        for r in rs:
            px, py = tiny.place_xy(r)
            assert np.hypot(px - x, py - y) <= 0.25 * d * np.sqrt(2) + 1e-9
        gallery = [tiny.place_xy(r) for r in rs if r.image_id.startswith("g")]
        assert gallery == [(x, y), (x, y)]
