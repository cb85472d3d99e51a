"""The workflow chain on two synthetic observations: ingest, index, search, dedup, match,
add, remove; and the bad inputs each step must refuse with a clear message."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import workflow_tiny
from PIL import Image

from craterlab.data.manifest import ManifestDataset
from craterlab.errors import ConfigError, DataError
from craterlab.workflows.api import CraterIndex as Index
from craterlab.workflows.dedup import calibrate, connected_groups, dedup
from craterlab.workflows.demo import render_observation
from craterlab.workflows.geometry import GeometryFilter
from craterlab.workflows.ingest import ingest_catalog, ingest_folder
from craterlab.workflows.match import match
from craterlab.workflows.pairs import CraterPair

MAP = ["lat", "lon", "diameter_km", "query_lat", "query_lon", "query_diameter_km"]
PAIR_MAP = ["lat_a", "lon_a", "diameter_km_a", "lat_b", "lon_b", "diameter_km_b"]

TINY = workflow_tiny()


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """Two observations of one place: B is shifted by (3, -2) world units (24, -16 px) and
    lit from another azimuth, with new sensor noise."""
    root = tmp_path_factory.mktemp("tiles")
    a = render_observation(root / "a", sun_azimuth=270.0, noise_seed=1)
    b = render_observation(root / "b", centre=(19.0, 14.0), sun_azimuth=250.0, noise_seed=2)
    return root, a, b


@pytest.fixture(scope="module")
def built(tiles):
    root, a, b = tiles
    sa = ingest_catalog(a.image, a.catalog, root / "A", origin=a.origin, progress=False)
    sb = ingest_catalog(b.image, b.catalog, root / "B", origin=b.origin, progress=False)
    ia = Index.build(sa.manifest, TINY, progress=False)
    ib = Index.build(sb.manifest, TINY, progress=False)
    ia.save(root / "idxA")
    ib.save(root / "idxB")
    return root, sa, sb, ia, ib


def renamed(manifest, out, prefix):
    """A copy of a manifest whose image ids carry a prefix (new items, same crops)."""
    rows = read_csv(manifest)
    out = manifest.parent / out
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{**r, "image_id": prefix + r["image_id"]} for r in rows])
    return out


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- ingest


def test_ingest_cuts_2x_and_3x_crops_and_counts_border_padding(tiles, built) -> None:
    root, a, _ = tiles
    _, sa, _, _, _ = built
    catalog = read_csv(a.catalog)
    tile = np.asarray(Image.open(a.image))
    h, w = tile.shape
    assert sa.craters == len(catalog) and sa.crops == 2 * len(catalog)
    expected_padded = 0
    for r in catalog:
        x, y, d = float(r["x"]), float(r["y"]), float(r["diameter"])
        for f in (2, 3):
            left, top = round(x - f * d / 2), round(y - f * d / 2)
            side = max(1, round(f * d))
            expected_padded += not (left >= 0 and top >= 0 and left + side <= w and top + side <= h)
    assert sa.padded == expected_padded > 0
    rows = {r["image_id"]: r for r in read_csv(sa.manifest)}
    # An interior crater's crop is exactly the tile's pixels around it.
    for r in catalog:
        x, y, d = float(r["x"]), float(r["y"]), float(r["diameter"])
        left, top, side = round(x - d), round(y - d), max(1, round(2 * d))
        if left >= 0 and top >= 0 and left + side <= w and top + side <= h:
            crop = np.asarray(Image.open(sa.manifest.parent / rows[f"{r['id']}_2x"]["path"]))
            assert np.array_equal(crop, tile[top : top + side, left : left + side])
            break
    else:
        pytest.fail("no interior crater in the test tile")
    # The experiments' own manifest reader accepts it; positions are in the shared frame.
    ds = ManifestDataset(str(sa.manifest))
    assert len(ds.records("gallery")) == sa.crops
    first = catalog[0]
    row = rows[f"{first['id']}_3x"]
    assert float(row["x"]) == pytest.approx(float(first["x"]) + a.origin[0], abs=1e-3)


def test_ingest_skips_border_craters_when_asked(tiles, tmp_path) -> None:
    _, a, _ = tiles
    pad = ingest_catalog(a.image, a.catalog, tmp_path / "pad", progress=False)
    skip = ingest_catalog(a.image, a.catalog, tmp_path / "skip", border="skip", progress=False)
    assert skip.padded == 0
    assert skip.craters + skip.skipped_border == pad.craters
    assert skip.skipped_border > 0 and skip.crops == 2 * skip.craters


def test_bad_catalog_rows_are_named_or_counted(tiles, tmp_path) -> None:
    _, a, _ = tiles
    rows = read_csv(a.catalog)
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "x", "y", "diameter"])
        w.writerow([rows[0]["id"], rows[0]["x"], rows[0]["y"], rows[0]["diameter"]])
        w.writerow(["far", "5000", "10", "20"])  # line 3: outside the 256x256 tile
        w.writerow([rows[0]["id"], "10", "10", "20"])  # line 4: duplicate id
        w.writerow(["neg", "10", "10", "-3"])
    with pytest.raises(DataError) as err:
        ingest_catalog(a.image, bad, tmp_path / "out", progress=False)
    msg = str(err.value)
    assert "line 3 (id far): centre (5000, 10) is outside the 256x256 image" in msg
    assert f"line 4: duplicate id {rows[0]['id']!r} (first on line 2)" in msg
    assert "diameter -3.0 must be > 0" in msg and "--skip-invalid" in msg
    summary = ingest_catalog(a.image, bad, tmp_path / "out", skip_invalid=True, progress=False)
    assert summary.craters == 1 and len(summary.skipped_invalid) == 3


def test_undecodable_crops_are_named_or_skipped(tmp_path) -> None:
    crops = tmp_path / "crops"
    crops.mkdir()
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(crops / "good.png")
    (crops / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"(?s)broken: .*broken\.png cannot be decoded.*--skip-bad"):
        ingest_folder(crops, tmp_path / "m.csv", progress=False)
    summary = ingest_folder(crops, tmp_path / "m.csv", skip_bad=True, progress=False)
    assert summary.crops == 1 and len(summary.skipped_invalid) == 1
    assert [r["image_id"] for r in read_csv(tmp_path / "m.csv")] == ["good"]


# --------------------------------------------------------------------------- index + search


def test_saved_index_records_how_it_was_built(built) -> None:
    root, sa, _, ia, _ = built
    meta = json.loads((root / "idxA" / "workflow.json").read_text())
    import craterlab

    assert meta["craterlab_version"] == craterlab.__version__
    assert meta["overrides"] == TINY
    assert meta["config"]["backbone"]["model"] == "test_vit"
    assert meta["config"]["aggregator"]["k"] == 8
    assert meta["encoder"]["backbone"]["model"] == "test_vit"
    assert meta["encoder"]["untrained"] is True
    assert meta["encoder"]["weights_status"].startswith("random")
    rows = read_csv(sa.manifest)
    assert [it["id"] for it in meta["items"]] == [r["image_id"] for r in rows]
    assert meta["items"][0]["path"] == str((sa.manifest.parent / rows[0]["path"]).resolve())
    loaded = Index.load(root / "idxA")
    assert loaded.gallery.ids == ia.gallery.ids
    assert torch.equal(loaded.gallery.vectors, ia.gallery.vectors)


def test_search_finds_each_crop_itself_and_reports_both_scores(built, tmp_path) -> None:
    root, sa, _, _, _ = built
    index = Index.load(root / "idxA")
    hits = index.search(sa.manifest, top=3, progress=False)
    by_query = hits.by_query()
    assert len(by_query) == len(index)
    for q, rows in by_query.items():
        assert rows[0].gallery_id == q  # the same crop, encoded the same way, ranks first
        assert [h.rank for h in rows] == [1, 2, 3]
        assert all(a.score >= b.score for a, b in zip(rows, rows[1:], strict=False))
    # stage-1 score = the exact inner product of the single vectors, computed independently
    qv = index.gallery.vectors
    row_of = {gid: i for i, gid in enumerate(index.gallery.ids)}
    for h in hits.hits[:12]:
        expected = float(qv[row_of[h.query]] @ qv[row_of[h.gallery_id]])
        assert h.stage1_score == pytest.approx(expected, abs=1e-4)
    csv_rows = read_csv(hits.to_csv(tmp_path / "r.csv"))
    assert list(csv_rows[0]) == ["query", "rank", "gallery_id", "score", "stage1_score", *MAP]
    assert len(csv_rows) == 3 * len(index)
    # crops in pixels of a plain tile have no map position: empty cells, NaN in Python
    assert all(r[c] == "" for r in csv_rows for c in MAP)
    assert all(np.isnan(h.lat) and np.isnan(h.query_lon) for h in hits.hits)
    data = json.loads(hits.to_json(tmp_path / "r.json").read_text())
    first = data["queries"][csv_rows[0]["query"]][0]
    assert first["gallery_id"] == csv_rows[0]["gallery_id"]
    assert all(first[c] is None for c in MAP)


def test_search_refuses_another_encoder_but_takes_runtime_knobs(built) -> None:
    root, _, sb, _, _ = built
    index = Index.load(root / "idxA")
    with pytest.raises(ConfigError) as err:
        index.search(sb.manifest, overrides=["k=16"], progress=False)
    assert "aggregator.k: 8 (index) vs 16 (requested)" in str(err.value)
    with pytest.raises(ConfigError, match="backbone.model: 'test_vit' .index. vs 'test_vit2'"):
        index.search(sb.manifest, overrides=["backbone.model=test_vit2"], progress=False)
    hits = index.search(sb.manifest, overrides=["batch_size=4"], top=1, progress=False)
    assert len(hits.hits) == sum(1 for _ in read_csv(sb.manifest))


def test_queries_from_another_backbone_identity_are_refused(built, tmp_path) -> None:
    root = built[0]
    copy = tmp_path / "idx"
    shutil.copytree(root / "idxA", copy)
    meta = json.loads((copy / "workflow.json").read_text())
    meta["encoder"]["backbone"]["weights"] = {"weights": "checkpoint", "sha256": "abc"}
    (copy / "workflow.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="Queries would be encoded by another backbone"):
        Index.load(copy).search(built[2].manifest, progress=False)


def test_index_from_another_version_or_truncated_is_refused(built, tmp_path) -> None:
    root = built[0]
    old = tmp_path / "old"
    shutil.copytree(root / "idxA", old)
    meta = json.loads((old / "workflow.json").read_text())
    meta["craterlab_version"] = "0.0.1"
    (old / "workflow.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"built by craterlab 0\.0\.1 .*Rebuild it"):
        Index.load(old)
    cut = tmp_path / "cut"
    shutil.copytree(root / "idxA", cut)
    text = (cut / "workflow.json").read_text()
    (cut / "workflow.json").write_text(text[: len(text) // 2])
    with pytest.raises(DataError, match="damaged workflow.json"):
        Index.load(cut)
    short = tmp_path / "short"
    shutil.copytree(root / "idxA", short)
    vec = short / "gallery" / "vectors.bin"
    vec.write_bytes(vec.read_bytes()[:-64])
    with pytest.raises(DataError, match="vectors.bin"):
        Index.load(short)


def test_duplicate_ids_are_refused(built, tmp_path) -> None:
    _, sa, _, _, _ = built
    rows = read_csv(sa.manifest)
    dup = tmp_path / "dup.csv"
    with open(dup, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([rows[0], rows[1], {**rows[2], "image_id": rows[0]["image_id"]}])
    with pytest.raises(DataError, match="duplicate image ids"):
        Index.build(dup, TINY, progress=False)


# --------------------------------------------------------------------------- match


def test_a_crater_seen_in_two_observations_is_matched_to_itself(built) -> None:
    root, sa, sb, _, _ = built
    a, b = Index.load(root / "idxA"), Index.load(root / "idxB")
    common = {it.crater for it in a.items} & {it.crater for it in b.items}
    assert len(common) >= 10
    # By appearance alone (random tiny ViT weights: a weak encoder, so a lenient bound).
    plain = match(a, b)
    right = [m for m in plain.matches if m.crater_a == m.crater_b]
    assert len(right) >= 0.8 * len(plain.matches) and len(right) >= len(common) // 2
    # With the geometry pre-filter (both manifests are in the shared frame): all correct.
    geo = match(a, b, geometry=GeometryFilter(max_offset=0.5, max_ratio=1.5))
    assert all(m.crater_a == m.crater_b for m in geo.matches)
    assert len(geo.matches) >= 0.8 * len(common)
    for m in geo.matches:
        assert m.distance <= 0.5 * 3 * max(it.diameter for it in a.items)


def test_match_refuses_indexes_of_different_encoders(built, tmp_path) -> None:
    root, sa, _, _, _ = built
    a = Index.load(root / "idxA")
    other = Index.build(sa.manifest, [*TINY[:-3], "k=4", "shortlist=20"], progress=False)
    with pytest.raises(
        DataError, match=r"(?s)encoded differently.*aggregator.k: 8 \(A\) vs 4 \(B\)"
    ):
        match(a, other)


# --------------------------------------------------------------------------- dedup


@pytest.fixture(scope="module")
def duplicated(tiles, tmp_path_factory):
    """A catalog in which 4 craters are listed twice (1 px apart, new ids): the duplicates."""
    _, a, _ = tiles
    root = tmp_path_factory.mktemp("dedup")
    rows = read_csv(a.catalog)
    labels = {r["id"]: r["id"] for r in rows}
    extra = []
    for r in rows[:8:2]:
        extra.append({**r, "id": f"dup_{r['id']}", "x": f"{float(r['x']) + 1:.3f}"})
        labels[f"dup_{r['id']}"] = r["id"]
    catalog = root / "catalog.csv"
    with open(catalog, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "x", "y", "diameter"])
        w.writeheader()
        w.writerows(rows + extra)
    summary = ingest_catalog(a.image, catalog, root / "crops", progress=False)
    # The labelled manifest: the same crops, crater_id = the true crater.
    man = read_csv(summary.manifest)
    labelled = summary.manifest.parent / "labels.csv"
    with open(labelled, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(man[0]))
        w.writeheader()
        w.writerows([{**r, "crater_id": labels[r["crater_id"]]} for r in man])
    index = Index.build(summary.manifest, TINY, progress=False)
    return index, labelled, {(r["id"], f"dup_{r['id']}") for r in rows[:8:2]}


def test_dedup_calibrates_a_threshold_and_finds_the_duplicates(duplicated, tmp_path) -> None:
    index, labelled, truth = duplicated
    result = dedup(index, labels=labelled)
    cal = result.calibration
    assert cal is not None and cal.chosen.positives == len(truth)
    found = {tuple(sorted((p.crater_a, p.crater_b))) for p in result.pairs}
    want = {tuple(sorted(t)) for t in truth}
    assert cal.chosen.recall == pytest.approx(len(found & want) / len(want))
    assert cal.chosen.precision == pytest.approx(len(found & want) / len(found))
    # The chosen point is the best F1 over every candidate threshold (computed here again).
    candidates = dedup(index, threshold=-1.0).pairs
    best = 0.0
    for t in {p.score for p in candidates}:
        got = {tuple(sorted((p.crater_a, p.crater_b))) for p in candidates if p.score >= t}
        tp = len(got & want)
        best = max(best, 2 * tp / (len(got) + len(want)))
    assert cal.chosen.f1 == pytest.approx(best)
    assert all(p.score >= result.threshold for p in result.pairs)
    png = cal.plot(tmp_path / "pr.png")
    assert Image.open(png).size[0] > 100
    pairs_csv = read_csv(result.to_csv(tmp_path / "pairs.csv"))
    assert len(pairs_csv) == len(result.pairs)
    assert list(pairs_csv[0])[-7:] == ["group", *PAIR_MAP]
    assert all(r[c] == "" for r in pairs_csv for c in PAIR_MAP)  # pixel crops: no map
    groups_csv = read_csv(result.groups_csv(tmp_path / "groups.csv"))
    assert list(groups_csv[0]) == ["group", "size", "craters", "lat", "lon", "diameter_km"]
    assert all(r["lat"] == r["lon"] == r["diameter_km"] == "" for r in groups_csv)
    # The geometry pre-filter proposes only nearby craters of similar size: every duplicate
    # (1 px apart) is a candidate, and the calibrated point can only get better.
    flt = GeometryFilter(max_offset=0.25, max_ratio=1.2)
    everything = dedup(index, threshold=-1.0, geometry=flt)
    assert want <= {tuple(sorted((p.crater_a, p.crater_b))) for p in everything.pairs}
    diameter = {it.id: it.diameter for it in index.items}
    for p in everything.pairs:
        big = max(diameter[p.item_a], diameter[p.item_b])
        assert p.distance <= 0.25 * big + 1e-6 and p.ratio <= 1.2 + 1e-9
    geo = dedup(index, labels=labelled, geometry=flt)
    assert geo.calibration is not None and geo.calibration.chosen.f1 >= cal.chosen.f1
    assert geo.groups and all(len(g) == 2 for g in geo.groups)


def test_results_csv_carry_each_craters_lat_lon_and_leave_pixel_crops_empty(tmp_path) -> None:
    """Search hits, dedup pairs and groups and match pairs carry the lat/lon/diameter_km of
    the right crop's crater (read back as the same float), empty where a crop has none."""
    from craterlab.workflows.dedup import DedupResult
    from craterlab.workflows.items import Item, crater_places
    from craterlab.workflows.match import MatchResult
    from craterlab.workflows.pairs import PAIR_FIELDS, crater_pairs
    from craterlab.workflows.results import Hit, SearchHits

    mars = "IAU_2015:49900"
    g1 = dict(lat=-12.25, lon=179.9, diameter_km=3.5, crs=mars)
    gallery = [
        Item("g1_2x", "g1_2x.png", "g1", "2x", **g1),
        Item("g1_3x", "g1_3x.png", "g1", "3x", **g1),
        Item("g2_2x", "g2.png", "g2", lat=0.1 + 0.2, lon=-179.95, crs=mars),  # no km size
        Item("p_2x", "p.png", "p", x=10.0, y=20.0, diameter=5.0),  # pixels only
        Item("u", "u.png", "u"),
        Item("v", "v.png", "v", lat=1.0, lon=2.0),  # lat/lon without a CRS: not placed
    ]
    queries = [
        Item("q1", "q1.png", "q1", lat=45.5, lon=-0.125, diameter_km=7.0, crs=mars),
        Item("q2", "q2.png", "q2"),
    ]
    hits = SearchHits(
        [
            Hit("q1", 1, "g2_2x", 0.9, 0.8, 2),
            Hit("q1", 2, "p_2x", 0.5, 0.4, 3),
            Hit("q2", 1, "g1_3x", 0.7, 0.6, 0),  # a stale row: found by id
        ]
    ).place(queries, gallery)
    rows = read_csv(hits.to_csv(tmp_path / "hits.csv"))
    assert list(rows[0]) == ["query", "rank", "gallery_id", "score", "stage1_score", *MAP]
    assert [r["gallery_id"] for r in rows] == ["g2_2x", "p_2x", "g1_3x"]
    r = rows[0]
    assert (float(r["lat"]), float(r["lon"]), r["diameter_km"]) == (0.1 + 0.2, -179.95, "")
    q1 = (float(r["query_lat"]), float(r["query_lon"]), float(r["query_diameter_km"]))
    assert q1 == (45.5, -0.125, 7.0) and rows[1]["query_lat"] == "45.5"
    assert [rows[1][c] for c in MAP[:3]] == ["", "", ""]
    assert [float(rows[2][c]) for c in MAP[:3]] == [-12.25, 179.9, 3.5]
    assert [rows[2][c] for c in MAP[3:]] == ["", "", ""]
    assert (hits.hits[2].lat, hits.hits[0].query_diameter_km) == (-12.25, 7.0)
    data = json.loads(hits.to_json(tmp_path / "hits.json").read_text())["queries"]
    assert data["q1"][0]["lat"] == 0.1 + 0.2 and data["q1"][0]["diameter_km"] is None
    assert data["q1"][1]["lat"] is None and data["q2"][0]["query_lat"] is None
    assert data["q2"][0]["lon"] == 179.9

    # crop rows: (g1_2x, g2_2x), (g2_2x, p_2x), (g1_3x, p_2x), (u, v), (g1_3x, g2_2x)
    ia, ib = np.array([0, 2, 1, 4, 1]), np.array([2, 3, 3, 5, 2])
    index = type("Items", (), {"items": gallery})()
    pairs = crater_pairs(index, index, ia, ib, np.array([0.9, 0.8, 0.7, 0.6, 0.95]), same=True)
    assert [(p.crater_a, p.crater_b, p.item_a) for p in pairs][:1] == [("g1", "g2", "g1_3x")]
    groups = connected_groups(pairs)
    group_of = {c: g for g, members in enumerate(groups) for c in members}
    result = DedupResult(pairs, groups, 0.0, len(pairs), None, group_of, crater_places(gallery))
    rows = read_csv(result.to_csv(tmp_path / "pairs.csv"))
    assert list(rows[0]) == [*PAIR_FIELDS, "group", *PAIR_MAP]
    by = {(r["crater_a"], r["crater_b"]): r for r in rows}
    assert [float(by["g1", "g2"][c]) for c in PAIR_MAP[:5]] == [
        -12.25,
        179.9,
        3.5,
        0.1 + 0.2,
        -179.95,
    ]
    assert by["g1", "g2"]["diameter_km_b"] == ""
    assert [by["g1", "p"][c] for c in PAIR_MAP[3:]] == ["", "", ""]
    assert float(by["g1", "p"]["lat_a"]) == -12.25
    assert all(by["u", "v"][c] == "" for c in PAIR_MAP)
    assert (pairs[0].lat_a, pairs[0].lon_b) == (-12.25, -179.95)
    rows = read_csv(result.groups_csv(tmp_path / "groups.csv"))
    assert list(rows[0]) == ["group", "size", "craters", "lat", "lon", "diameter_km"]
    assert rows[0]["craters"] == "g1;g2;p"
    assert [float(v) if v else None for v in rows[0]["lat"].split(";")] == [-12.25, 0.1 + 0.2, None]
    assert rows[0]["diameter_km"] == "3.5;;" and rows[1]["craters"] == "u;v"
    assert rows[1]["lat"] == rows[1]["lon"] == rows[1]["diameter_km"] == ""
    assert result.group_places(0)[0] == (-12.25, 179.9, 3.5)

    rows = read_csv(MatchResult(pairs, 3, 3).to_csv(tmp_path / "m.csv"))
    assert list(rows[0]) == [*PAIR_FIELDS, *PAIR_MAP]
    assert float(rows[0]["lat_b"]) == 0.1 + 0.2 and rows[0]["item_b"] == "g2_2x"


def test_calibration_and_groups_against_hand_computed_values() -> None:
    pairs = [
        CraterPair("a", "b", "", "", 0.9),
        CraterPair("c", "d", "", "", 0.8),
        CraterPair("a", "c", "", "", 0.7),
        CraterPair("e", "f", "", "", 0.6),
    ]
    truth = {"a": "1", "b": "1", "c": "2", "d": "2", "e": "3", "f": "4", "g": "4"}
    cal = calibrate(pairs, truth)  # 2 labelled duplicate pairs + (f, g) never proposed: 3
    assert cal.chosen.threshold == 0.8
    assert cal.chosen.precision == 1.0 and cal.chosen.recall == pytest.approx(2 / 3)
    strict = calibrate(pairs, truth, min_precision=1.0)
    assert strict.chosen.threshold == 0.8
    assert connected_groups(pairs[:3]) == [["a", "b", "c", "d"]]


def test_dedup_without_threshold_or_labels_says_what_it_needs(duplicated) -> None:
    with pytest.raises(ConfigError, match="--threshold T.*--labels"):
        dedup(duplicated[0])


# --------------------------------------------------------------------------- add / remove


def test_remove_then_add_keeps_ids_stable_and_matches_a_fresh_build(built, tmp_path) -> None:
    root, _, sb, _, _ = built
    index = Index.load(root / "idxA")
    before = list(index.gallery.ids)
    gone = [before[1], before[5], before[6]]
    index.remove(gone)
    assert index.gallery.ids == [i for i in before if i not in gone]
    assert len(index.gallery.store) == len(index.gallery.vectors) == len(before) - 3
    new = renamed(sb.manifest, "b_new.csv", "new_")
    index.add(new, progress=False)
    b_ids = [r["image_id"] for r in read_csv(new)]
    assert index.gallery.ids == [i for i in before if i not in gone] + b_ids
    index.save(tmp_path / "upd")
    again = Index.load(tmp_path / "upd")
    hits = again.search(new, top=5, progress=False)
    assert not {h.gallery_id for h in hits.hits} & set(gone)
    # Every added B crop finds itself first: its row, vectors and tokens line up.
    for q, rows in hits.by_query().items():
        assert rows[0].gallery_id == q
    # The appended rows hold what a fresh build of the same crops holds.
    fresh = Index.build(new, TINY, progress=False)
    n = len(b_ids)
    assert torch.allclose(again.gallery.vectors[-n:], fresh.gallery.vectors, atol=1e-6)
    rows = torch.arange(len(again) - n, len(again))
    assert torch.allclose(again.stored(rows)[1].vectors, fresh.stored(torch.arange(n))[1].vectors)
    with pytest.raises(DataError, match="already in the index"):
        again.add(new, progress=False)
    with pytest.raises(DataError, match="not in the index"):
        again.remove(["no-such-id"])


@pytest.mark.parametrize("spec", ["IVF4,Flat", "HNSW8", "torch"])
def test_approximate_stage1_updates_agree_with_exact_search(built, spec) -> None:
    root, _, sb, _, _ = built
    index = Index.load(root / "idxA")
    g = index.gallery
    from craterlab.retrieval.index import EncodedGallery

    approx = EncodedGallery(
        g.ids,
        g.vectors,
        g.store,
        index=spec,
        nprobe=4 if "IVF" in spec else None,
        ef_search=256 if "HNSW" in spec else None,
    )
    index.gallery = approx
    drop = [g.ids[0], g.ids[3], g.ids[10], g.ids[11]]
    index.remove(drop)
    index.add(renamed(sb.manifest, "b_more.csv", "more_"), progress=False)
    exact = EncodedGallery(index.gallery.ids, index.gallery.vectors, index.gallery.store)
    q = index.gallery.vectors[::3]
    got = index.gallery.search(q, None, mode="single", depth=5).ids
    want = exact.search(q, None, mode="single", depth=5).ids
    assert got == want


# --------------------------------------------------------------------------- command line


def test_commands_are_registered_and_run_the_chain(built, tmp_path, capsys) -> None:
    from craterlab.plugins import get_commands

    root, sa, sb, _, _ = built
    commands = get_commands()
    assert {"ingest", "index", "search", "dedup", "match"} <= set(commands)

    def run(name: str, *args: object) -> str:
        assert commands[name].handler([str(a) for a in args]) == 0
        return capsys.readouterr().out

    out = run("index", sa.manifest, "--out", tmp_path / "idx", *TINY)
    assert f"{len(read_csv(sa.manifest))} items" in out and "untrained" in out
    out = run(
        "search", tmp_path / "idx", sb.manifest, "--top", "2", "--out", tmp_path / "hits", "--html"
    )
    assert len(read_csv(tmp_path / "hits.csv")) == 2 * len(read_csv(sb.manifest))
    found = json.loads((tmp_path / "hits.json").read_text())["queries"]
    page = (tmp_path / "hits.html").read_text()
    assert str(tmp_path / "hits.html") in out
    assert page.count('<section class="query"') == min(len(found), 50)
    assert page.count("<img") == 3 * min(len(found), 50)  # each query and its 2 hits
    crater = {r["image_id"]: r["crater_id"] for r in read_csv(sb.manifest)}
    crater |= {r["image_id"]: r["crater_id"] for r in read_csv(sa.manifest)}
    same = sum(crater[h["gallery_id"]] == crater[q] for q, hs in found.items() for h in hs)
    assert page.count('class="correct"') == same  # framed green: the query's crater, exactly
    run("dedup", tmp_path / "idx", "--threshold", "0.95", "--out", tmp_path / "dd")
    assert read_csv(tmp_path / "dd" / "pairs.csv") is not None
    assert (tmp_path / "dd" / "groups.csv").is_file()
    out = run(
        "match",
        tmp_path / "idx",
        root / "idxB",
        "--out",
        tmp_path / "m.csv",
        "--max-offset",
        "0.5",
        "--max-ratio",
        "1.5",
    )
    matches = read_csv(tmp_path / "m.csv")
    assert matches and all(m["crater_a"] == m["crater_b"] for m in matches)
    first = read_csv(sa.manifest)[0]["image_id"]
    out = run("index", "remove", tmp_path / "idx", first)
    assert "removed 1 item(s)" in out
    assert first not in run("index", "info", tmp_path / "idx", "--ids").split()
    with pytest.raises(ConfigError, match="index remove needs ids"):
        commands["index"].handler(["remove", str(tmp_path / "idx")])
    with pytest.raises(ConfigError, match="does not apply to a workflow"):
        commands["index"].handler(
            [str(sa.manifest), "--out", str(tmp_path / "x"), "dataset=synthetic"]
        )


# --------------------------------------------------------------------------- search page


def test_search_page_marks_same_crater_hits_and_survives_a_moved_file(tmp_path) -> None:
    from craterlab.workflows.items import Item
    from craterlab.workflows.results import Hit, SearchHits
    from craterlab.workflows.search_page import search_page

    def crop(name: str) -> str:
        path = tmp_path / f"{name}.png"
        Image.new("RGB", (24, 24), (len(name) * 40 % 255, 90, 30)).save(path)
        return str(path)

    gallery = [Item("g1", crop("g1"), "A"), Item("g2", crop("g2"), "B")]
    queries = [Item("q1", crop("q1"), "A"), Item("q2", crop("q2"), "C")]
    hits = SearchHits(
        [
            Hit("q1", 1, "g1", 0.9, 0.8, 0),
            Hit("q1", 2, "g2", 0.5, 0.4, 1),
            Hit("q2", 1, "g2", 0.7, 0.6, 1),
        ],
        skipped=["broken_crop"],
    )
    page = search_page(hits, queries, gallery, weights="random (offline)")
    assert page.count('<section class="query"') == 2 and page.count('class="correct"') == 1
    assert "#1 0.900" in page and "crater A" in page and "untrained" in page
    assert "1 query crop(s) could not be decoded" in page and "broken_crop" in page
    (tmp_path / "g2.png").unlink()  # the gallery moved since the index was built
    page = search_page(hits, queries, gallery, max_queries=1)
    assert page.count('<section class="query"') == 1 and "the first 1; the CSV" in page
    assert f"{tmp_path / 'g2.png'}: cannot be shown" in page and "does not exist" in page
    folder = [Item("q1", queries[0].path, "q1"), Item("q2", queries[1].path, "q2")]
    page = search_page(hits, folder, gallery)  # a folder of crops has no crater labels
    assert 'class="correct"' not in page and "no crater labels" in page


def test_an_index_built_with_a_generator_saves_it_and_searches_with_it(built, tmp_path) -> None:
    root, sa, _, ia, _ = built
    index = Index.build(sa.manifest, [*TINY, "retrieval=token_ivf"], progress=False)
    index.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")
    gen = loaded.gallery.prepared["generator:token_ivf"]
    assert gen.persisted and gen.ntotal == len(loaded)  # saved at build, not rebuilt at search
    hits = loaded.search(sa.manifest, top=3, progress=False)
    assert loaded.gallery.prepared["generator:token_ivf"] is gen
    assert all(rows[0].gallery_id == q for q, rows in hits.by_query().items())
    # the pooled index of the same crops has no generator to save
    assert "generators" not in [p.name for p in (root / "idxA" / "gallery").iterdir()]
