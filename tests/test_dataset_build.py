"""``dataset build``: a CraterBench-R-style benchmark from a Mars GeoTIFF and a Robbins-style
lat/lon catalog, read back by the release reader, seeded, with relevance checked against an
independent computation, and evaluated end to end by ``python -m craterlab``."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

pytest.importorskip("rasterio")
pytest.importorskip("geopandas")

from conftest import ROOT, TINY  # noqa: E402

from craterlab.data.build import BuildSettings, build_benchmark, summary_table  # noqa: E402
from craterlab.data.craterbench import CraterBenchR  # noqa: E402
from craterlab.errors import ConfigError  # noqa: E402
from craterlab.geo.demo import write_demo_mosaic  # noqa: E402

MARS_R = 3396190.0
SETTINGS = BuildSettings(queries=4, views=3, seed=7, crop_size=96)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_mosaic(tmp_path_factory.mktemp("mars") / "tile", size=448)


@pytest.fixture(scope="module")
def built(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "release"
    stats = build_benchmark(demo.image, demo.catalog, out, SETTINGS, progress=False)
    return out, stats


def load(path):
    return json.loads(path.read_text())


def catalog(demo):
    with open(demo.catalog, newline="") as f:
        return {
            r["CRATER_ID"]: (
                float(r["LATITUDE_CIRCLE_IMAGE"]),
                float(r["LONGITUDE_CIRCLE_IMAGE"]),
                float(r["DIAM_CIRCLE_IMAGE"]),
            )
            for r in csv.DictReader(f)
        }


def test_the_release_reader_reads_the_build_unchanged(built) -> None:
    out, stats = built
    ds = CraterBenchR(root=str(out))
    gallery, query, train = (ds.records(s) for s in ("gallery", "query", "train"))
    summary = stats["summary"]
    assert len(gallery) == summary["gallery_images"] == 2 * summary["crater_identities"]
    assert len(query) == summary["query_images"] == SETTINGS.queries * SETTINGS.views
    assert {r.view_type for r in gallery} == {"2x", "3x"}
    names = ds.crater_ids.to_name
    gallery_ids = {r.crater_id for r in gallery}
    for r in query:
        assert r.crater_id in r.relevant_ids and r.relevant_ids <= gallery_ids
    # train: gallery images of identities outside the test relevance closure
    closure = set().union(*(r.relevant_ids for r in query))
    assert train and not {r.crater_id for r in train} & closure
    assert len(train) == 2 * summary["train_identities"]
    assert all(names[r.crater_id].startswith("03-1-") for r in (*gallery, *query))


def test_relevance_is_every_comparable_crater_in_the_central_area(demo, built) -> None:
    """Recomputed here on a local tangent plane from the catalog (not the builder's geodesy)."""
    out, _ = built
    cat = catalog(demo)
    relevance = load(out / "metadata/query_relevance.json")["queries"]
    gallery = {e["crater_id"] for e in load(out / "splits/test.json")["gallery_images"]}
    multi = 0
    for rel in relevance.values():
        qlat, qlon, qd = cat[rel["query_crater_id"]]
        half = SETTINGS.central * rel["context"] / 2
        sx, sy = rel["shift_diameters"]
        expected = set()
        for cid, (lat, lon, d) in cat.items():
            dlon = (lon - qlon + 180) % 360 - 180
            east = MARS_R * math.radians(dlon) * math.cos(math.radians(qlat)) / (qd * 1000)
            north = MARS_R * math.radians(lat - qlat) / (qd * 1000)
            comparable = max(d, qd) <= SETTINGS.relevance_ratio * min(d, qd)
            if comparable and abs(east - sx) <= half and abs(north - sy) <= half:
                expected.add(cid)
        assert set(rel["raw_covisible_crater_ids"]) == expected
        assert set(rel["gallery_filtered_relevant_ids"]) == expected & gallery
        multi += len(rel["gallery_filtered_relevant_ids"]) > 1
        assert math.hypot(sx, sy) <= SETTINGS.max_shift * rel["context"] + 1e-9
        assert SETTINGS.context[0] <= rel["context"] <= SETTINGS.context[1]
    stats = load(out / "metadata/stats.json")["summary"]
    assert stats["multi_id_relevance_share"] == round(multi / len(relevance), 4)
    ids = {e["crater_id"] for e in load(out / "splits/test.json")["gallery_images"]}
    assert stats["diameter_median_km"] == pytest.approx(
        statistics.median(cat[c][2] for c in ids), rel=1e-4
    )


def test_a_build_is_reproducible_and_the_seed_matters(demo, built, tmp_path) -> None:
    out, stats = built
    again = tmp_path / "again"
    build_benchmark(demo.image, demo.catalog, again, SETTINGS, progress=False)
    for f in ("splits/test.json", "splits/train.json", "metadata/query_relevance.json"):
        assert (again / f).read_bytes() == (out / f).read_bytes(), f
    for e in load(out / "splits/test.json")["query_images"]:
        assert (again / e["path"]).read_bytes() == (out / e["path"]).read_bytes()
    other = tmp_path / "other"
    s2 = BuildSettings(queries=4, views=3, seed=8, crop_size=96)
    build_benchmark(demo.image, demo.catalog, other, s2, progress=False)
    assert load(other / "metadata/query_relevance.json") != load(
        out / "metadata/query_relevance.json"
    )
    text = summary_table(stats)
    assert "Crater identities" in text and "Multi-ID relevance" in text
    assert "craters on no-data" in text  # the demo's no-data strip, counted and named


def test_queries_are_balanced_across_regions_and_regions_can_be_held_out(demo, tmp_path) -> None:
    out = tmp_path / "held"
    s = BuildSettings(queries=4, views=1, test_regions=("r00",), seed=1, crop_size=64)
    build_benchmark(demo.image, demo.catalog, out, s, progress=False)
    with open(out / "metadata/craters.csv", newline="") as f:
        craters = list(csv.DictReader(f))
    queries = [c for c in craters if c["role"] == "query"]
    assert queries and {c["region"] for c in queries} == {"r00"}
    assert not [c for c in craters if c["role"] == "train" and c["region"] == "r00"]
    out2 = tmp_path / "balanced"
    build_benchmark(
        demo.image,
        demo.catalog,
        out2,
        BuildSettings(queries=4, views=1, crop_size=64),
        progress=False,
    )
    with open(out2 / "metadata/craters.csv", newline="") as f:
        regions = [c["region"] for c in csv.DictReader(f) if c["role"] == "query"]
    assert len(set(regions)) == 4  # one per region of the 2 x 2 grid
    with pytest.raises(ConfigError, match="names no region"):
        build_benchmark(
            demo.image, demo.catalog, tmp_path / "x", BuildSettings(test_regions=("mc99",))
        )
    with pytest.raises(ConfigError, match="already holds a benchmark"):
        build_benchmark(demo.image, demo.catalog, out, s, progress=False)
    with pytest.raises(ConfigError, match="--max-shift"):
        BuildSettings(max_shift=0.3).check()


@pytest.mark.slow
def test_dataset_build_then_an_experiment_on_it(demo, tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "craterlab", "dataset", "build", "--image", str(demo.image)]
    cmd += ["--catalog", str(demo.catalog), "--out", str(out), "--queries", "4", "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Query images        20 (5 views each)" in done.stdout
    tiny = [o for o in TINY if not o.startswith("dataset")]
    run = [sys.executable, "-m", "craterlab", "dataset=craterbench_r", f"dataset.root={out}"]
    run += [*tiny, "tracking=none", f"output_dir={tmp_path / 'run'}"]
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result
