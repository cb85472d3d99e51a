"""Planetary data in: GeoTIFFs in IAU CRSs (Mars equirectangular across the antimeridian, the
Moon's north polar stereographic), lat/lon catalogs in km, crops centred on their crater, and
every bad input named in one paragraph."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from conftest import workflow_tiny

rasterio = pytest.importorskip("rasterio")
pyproj = pytest.importorskip("pyproj")

from rasterio.transform import from_origin  # noqa: E402

from craterlab.errors import ConfigError, DataError  # noqa: E402
from craterlab.geo.bodies import body_crs, body_of, crs_label, parse_crs  # noqa: E402
from craterlab.geo.catalogs import read_catalog  # noqa: E402
from craterlab.geo.demo import write_demo_mosaic  # noqa: E402
from craterlab.geo.placement import Limits, crop_crater, place  # noqa: E402
from craterlab.geo.rasters import Mosaic  # noqa: E402
from craterlab.workflows.mosaic import ingest_mosaic  # noqa: E402

MARS_R = 3396190.0
MOON_R = 1737400.0
OUT = 64


def eqc_xy(lon, lat, lon0=180.0):
    """Spherical equirectangular (standard parallel 0), written out: the reference."""
    dlon = (np.asarray(lon, float) - lon0 + 180.0) % 360.0 - 180.0
    return MARS_R * np.radians(dlon), MARS_R * np.radians(lat)


def polar_xy(lon, lat):
    """Spherical north polar stereographic (k0 = 1), written out: the reference."""
    rho = 2 * MOON_R * np.tan(np.pi / 4 - np.radians(lat) / 2)
    lam = np.radians(lon)
    return rho * np.sin(lam), -rho * np.cos(lam)


def blob_raster(path, crs, transform, size, centres_px, sigma_px, dtype="uint16", nodata=0):
    """A raster with a Gaussian bright spot at each (col, row) (continuous pixel coords)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    img = np.full((size, size), 1000.0)
    for c, r in centres_px:
        img += 3000 * np.exp(-((xx - c) ** 2 + (yy - r) ** 2) / (2 * sigma_px**2))
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=size,
        height=size,
        count=1,
        dtype=dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
    ) as dst:
        dst.write(img.astype(dtype), 1)
    return path


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_catalog(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def centroid(image):
    """Brightness-weighted centre (x, y) of the part above the background, in crop pixels."""
    im = image.astype(float) - image.min()
    im = np.clip(im, 0, None)
    yy, xx = np.mgrid[0 : im.shape[0], 0 : im.shape[1]] + 0.5
    return (im * xx).sum() / im.sum(), (im * yy).sum() / im.sum()


@pytest.fixture(scope="module")
def mars(tmp_path_factory):
    """Mars equirectangular (clon 180) tile across the antimeridian, 200 m/px, blobs at
    known lat/lon on both sides of it."""
    root = tmp_path_factory.mktemp("mars")
    size, res = 400, 200.0
    craters = {"east": (-179.8, 9.8, 3.0), "west": (179.75, 10.2, 4.0), "mid": (179.98, 10.0, 2.0)}
    x0, y0 = eqc_xy(180.0, 10.0)
    transform = from_origin(x0 - size / 2 * res, y0 + size / 2 * res, res, res)
    centres = []
    for lon, lat, _ in craters.values():
        x, y = eqc_xy(lon, lat)
        centres.append(~transform @ (float(x), float(y)))
    tif = blob_raster(root / "mars.tif", "IAU_2015:49915", transform, size, centres, 2.5)
    return root, tif, craters, centres, res


def test_body_and_radius_come_from_the_crs(mars) -> None:
    _, tif, *_ = mars
    with Mosaic(tif) as m:
        assert m.body.name == "Mars"
        assert m.body.radius_m == pytest.approx(MARS_R)
        assert crs_label(m.geodetic) == "IAU_2015:49900"
        assert m.pixel_size_m(200, 200) == pytest.approx(200.0, rel=0.02)
    esri = parse_crs(
        'GEOGCS["GCS_Moon_2000",DATUM["D_Moon_2000",SPHEROID["Moon_2000_IAU_IAG",1737400.0,0.0]],'
        'PRIMEM["Reference_Meridian",0.0],UNIT["Degree",0.0174532925199433]]'
    )
    assert body_of(esri).name == "Moon"
    assert body_of(body_crs("mercury")).name == "Mercury"
    with pytest.raises(ConfigError, match="not a body"):
        body_crs("Marz")


def test_projection_matches_the_written_out_formulas(mars) -> None:
    _, tif, craters, centres, _ = mars
    with Mosaic(tif) as m:
        lon = np.array([c[0] for c in craters.values()])
        lat = np.array([c[1] for c in craters.values()])
        col, row = m.to_pixel(lon, lat)
        np.testing.assert_allclose(col, [c for c, _ in centres], atol=1e-6)
        np.testing.assert_allclose(row, [r for _, r in centres], atol=1e-6)
        col360, _ = m.to_pixel(np.mod(lon, 360), lat)  # 0..360 east: the same place
        np.testing.assert_allclose(col360, col, atol=1e-6)


@pytest.mark.parametrize("convention", ["-180..180", "0..360"])
def test_crops_are_centred_on_their_crater_across_the_antimeridian(mars, convention) -> None:
    root, tif, craters, _, res = mars
    rows = []
    for name, (lon, lat, d) in craters.items():
        rows.append([name, lat, lon % 360 if convention == "0..360" else lon, d])
    cat = read_catalog(
        write_catalog(root / f"cat{convention[0]}.csv", ["id", "lat", "lon", "diameter_km"], rows)
    )
    assert cat.longitudes == convention
    with Mosaic(tif) as m:
        placed = place(m, cat, out_px=OUT, limits=Limits(max_upscale=None)).placed
        assert sorted(p.id for p in placed) == sorted(craters)
        for p in placed:
            for factor in (2.0, 3.0):
                crop = crop_crater(m, p, factor, OUT)
                cx, cy = centroid(crop.image)
                assert abs(cx - OUT / 2) < 1.0 and abs(cy - OUT / 2) < 1.0, (p.id, cx, cy)
                # sized in km: the crop spans factor * D km, i.e. this many 200 m pixels
                # (east-west pixels are 200 m * cos(lat) on the ground)
                ground_px = factor * p.diameter_km * 1000 / res
                assert crop.native_px == pytest.approx(
                    ground_px / math.cos(math.radians(p.lat)), rel=0.02
                )


def test_moon_polar_stereographic_crops_are_centred(tmp_path) -> None:
    size, res = 300, 100.0
    craters = [("a", 358.0, 86.0, 2.0), ("b", 2.0, 85.95, 3.0), ("c", 355.0, 86.05, 1.5)]
    xs, ys = polar_xy([c[1] for c in craters], [c[2] for c in craters])
    cx0, cy0 = float(np.mean(xs)), float(np.mean(ys))
    transform = from_origin(cx0 - size / 2 * res, cy0 + size / 2 * res, res, res)
    centres = [~transform @ (float(x), float(y)) for x, y in zip(xs, ys, strict=True)]
    tif = blob_raster(tmp_path / "moon.tif", "IAU_2015:30130", transform, size, centres, 2.0,
                      dtype="float32", nodata=-9999.0)  # fmt: skip
    cat = read_catalog(
        write_catalog(
            tmp_path / "moon.csv",
            ["CRATER_ID", "LAT_CIRC_IMG", "LON_CIRC_IMG", "DIAM_CIRC_IMG"],  # Robbins (Moon)
            [[n, lat, lon, d] for n, lon, lat, d in craters],
        )
    )
    assert cat.columns["lat"] == "LAT_CIRC_IMG" and cat.longitudes == "0..360"
    with Mosaic(tif) as m:
        assert m.body.name == "Moon" and m.body.radius_m == pytest.approx(MOON_R)
        col, row = m.to_pixel(np.array([c[1] for c in craters]), np.array([c[2] for c in craters]))
        np.testing.assert_allclose(np.c_[col, row], centres, atol=1e-6)
        for p in place(m, cat, out_px=OUT, limits=Limits(max_upscale=None)).placed:
            crop = crop_crater(m, p, 3.0, OUT)
            cx, cy = centroid(crop.image)
            assert abs(cx - OUT / 2) < 1.0 and abs(cy - OUT / 2) < 1.0, (p.id, cx, cy)


def test_windowed_reads_decimate_large_crops(mars) -> None:
    """A crop much coarser than the mosaic is read decimated, still centred."""
    _, tif, craters, _, _ = mars
    lon, lat, _ = craters["mid"]
    with Mosaic(tif) as m:
        col, row = m.grid(lon, lat, 60_000.0, 32)  # 300 mosaic px across -> about 9 px/sample
        crop = m.crop(col, row)
        assert crop.native_px == pytest.approx(300 / math.cos(math.radians(lat)), rel=0.02)
        assert crop.valid.all()


def test_robbins_mars_columns_and_the_columns_option(tmp_path) -> None:
    robbins = write_catalog(
        tmp_path / "robbins.csv",
        ["CRATER_ID", "LATITUDE_CIRCLE_IMAGE", "LONGITUDE_CIRCLE_IMAGE", "DIAM_CIRCLE_IMAGE", "X"],
        [["02-1-002611", "10.5", "-170.25", "1.2", "a"]],
    )
    cat = read_catalog(robbins)
    assert cat.kind == "latlon"
    (c,) = cat.craters
    assert (c.id, c.lat, c.lon, c.diameter_km) == ("02-1-002611", 10.5, -170.25, 1.2)
    odd = write_catalog(tmp_path / "odd.tsv", ["name\tPHI\tLAMBDA_E\tSIZE"], [["k1\t-3\t200\t5"]])
    with pytest.raises(DataError, match="has no column for lat, lon, diameter_km"):
        read_catalog(odd)
    cat = read_catalog(odd, columns="lat=PHI,lon=LAMBDA_E,diameter_km=SIZE,id=name")
    assert (cat.craters[0].id, cat.craters[0].lon, cat.longitudes) == ("k1", 200.0, "0..360")
    with pytest.raises(ConfigError, match="unknown role"):
        read_catalog(odd, columns="latitude=PHI")
    with pytest.raises(DataError, match="does not have"):
        read_catalog(odd, columns="lat=LATITUDE")
    pixel = write_catalog(tmp_path / "px.csv", ["id", "x", "y", "diameter"], [["p", 1, 2, 3]])
    assert read_catalog(pixel).kind == "pixel"


def test_bad_catalog_rows_are_named_in_one_paragraph_or_counted(tmp_path) -> None:
    path = write_catalog(
        tmp_path / "bad.csv",
        ["id", "lat", "lon", "diameter_km"],
        [
            ["ok", "1", "2", "3"],
            ["nolat", "", "2", "3"],
            ["text", "1", "east", "3"],
            ["pole", "95", "2", "3"],
            ["neg", "1", "2", "-1"],
            ["ok", "1", "2", "3"],
        ],
    )
    with pytest.raises(DataError) as err:
        read_catalog(path)
    msg = str(err.value)
    assert str(path) in msg and "5 unusable row(s)" in msg and "--skip-invalid" in msg
    for needle in (
        "line 3 (id nolat): lat is missing",
        "line 4 (id text): lon 'east' is not a number",
        "line 5 (id pole): lat 95 is beyond +-90",
        "line 6 (id neg): diameter_km -1 must be > 0",
        "line 7 (id ok): duplicate id (first on line 2)",
    ):
        assert needle in msg
    cat = read_catalog(path, skip_invalid=True)
    assert [c.id for c in cat.craters] == ["ok"] and len(cat.skipped) == 5
    mixed = write_catalog(
        tmp_path / "mixed.csv",
        ["id", "lat", "lon", "diameter_km"],
        [["a", 0, 350, 1], ["b", 0, -5, 1]],
    )
    with pytest.raises(DataError, match="mixes longitude conventions"):
        read_catalog(mixed)


def test_mosaic_crs_and_body_errors(tmp_path, mars) -> None:
    root, tif, craters, centres, _ = mars
    cat_path = write_catalog(
        tmp_path / "c.csv", ["id", "lat", "lon", "diameter_km"], [["east", 9.8, -179.8, 3]]
    )
    bare = tmp_path / "bare.tif"
    with rasterio.open(tif) as src:
        data, transform = src.read(1), src.transform
    with rasterio.open(bare, "w", driver="GTiff", width=400, height=400, count=1,
                       dtype="uint16", transform=transform) as dst:  # fmt: skip
        dst.write(data, 1)
    cat = read_catalog(cat_path)
    with Mosaic(bare) as m, pytest.raises(DataError, match=r"has no CRS.*--crs"):
        place(m, cat)
    with Mosaic(bare, crs="IAU_2015:49915") as m:  # --crs supplies it
        (p,) = place(m, cat, limits=Limits(max_upscale=None)).placed
        assert (p.col, p.row) == pytest.approx(centres[0], abs=1e-6)
    with pytest.raises(DataError, match="is in a CRS of Mars.*--body says Moon"):
        Mosaic(tif, body="Moon")
    with pytest.raises(DataError, match="assumes its transform is in degrees"):
        Mosaic(bare, body="Mars")
    moon_cat = write_catalog(
        tmp_path / "moon.csv", ["id", "lat", "lon", "diameter_km", "body"], [["a", 1, 2, 3, "Moon"]]
    )
    with Mosaic(tif) as m, pytest.raises(DataError, match="lists craters of Moon.*CRS of Mars"):
        place(m, read_catalog(moon_cat))
    far = write_catalog(
        tmp_path / "far.csv",
        ["id", "lat", "lon", "diameter_km"],
        [["a", -40, 20, 3], ["b", -41, 21, 3]],
    )
    with Mosaic(tif) as m, pytest.raises(DataError) as err:
        place(m, read_catalog(far))
    assert "None of the 2 craters" in str(err.value) and "lat -41..-40" in str(err.value)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00not a tiff at all")
    with pytest.raises(DataError, match="cannot be read by GDAL"):
        Mosaic(broken)
    with pytest.raises(ConfigError, match="not a CRS pyproj can read"):
        Mosaic(bare, crs="IAU_2015:nonsense")


def test_ingest_counts_and_names_what_it_leaves_out(tmp_path) -> None:
    demo = write_demo_mosaic(tmp_path / "demo", longitudes="0..360")
    rows = read_rows(demo.catalog)
    # one crater off the tile, one far too small for a 224 px crop
    extra = [
        {**rows[0], "CRATER_ID": "off", "LATITUDE_CIRCLE_IMAGE": "40"},
        {**rows[1], "CRATER_ID": "tiny", "DIAM_CIRCLE_IMAGE": "0.2"},
    ]
    with open(demo.catalog, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerows(extra)
    s = ingest_mosaic(demo.image, demo.catalog, tmp_path / "out", progress=False)
    text = str(s)
    assert "off (line" in text and "outside the mosaic" in text
    assert "tiny: D 0.2 km" in text and "upscaled beyond --max-upscale" in text
    assert s.on_nodata, "the demo's no-data strip holds craters"
    manifest = read_rows(s.manifest)
    assert len(manifest) == s.crops == 2 * s.craters
    by_id = {r["CRATER_ID"]: r for r in rows}
    for r in manifest:
        src = by_id[r["crater_id"]]
        assert float(r["lat"]) == pytest.approx(float(src["LATITUDE_CIRCLE_IMAGE"]))
        assert float(r["lon"]) == pytest.approx(float(src["LONGITUDE_CIRCLE_IMAGE"]))
        assert r["crs"] == "IAU_2015:49900"
    s2 = ingest_mosaic(
        demo.image, demo.catalog, tmp_path / "out2", progress=False, min_diameter_km=4.0
    )
    assert "below the minimum diameter" in str(s2) and s2.craters < s.craters


# --------------------------------------------------------------------------- layers

gpd = pytest.importorskip("geopandas")

TINY = workflow_tiny()


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """Two observations (different suns) of one Mars tile across the antimeridian, ingested
    from their GeoTIFFs and Robbins-style catalogs and indexed."""
    from craterlab.workflows.api import CraterIndex as Index

    root = tmp_path_factory.mktemp("observed")
    out = {}
    for name, sun in (("A", 270.0), ("B", 240.0)):
        demo = write_demo_mosaic(root / name, sun_azimuth=sun, nodata_rows=0, size=320)
        summary = ingest_mosaic(demo.image, demo.catalog, root / f"crops{name}", progress=False)
        index = Index.build(summary.manifest, TINY, progress=False)
        index.save(root / f"idx{name}")
        out[name] = (demo, summary, index)
    return root, out


def catalog_positions(path):
    rows = read_rows(path)
    return {
        r["CRATER_ID"]: (float(r["LONGITUDE_CIRCLE_IMAGE"]), float(r["LATITUDE_CIRCLE_IMAGE"]))
        for r in rows
    }


def cli(name, *args):
    """Run a registered command as the command line does."""
    from craterlab.plugins import get_commands

    return get_commands()[name].handler([str(a) for a in args])


def manifest_places(manifest):
    """image_id -> (lat, lon, diameter_km) as the manifest writes them."""
    keys = ("lat", "lon", "diameter_km")
    return {r["image_id"]: tuple(float(r[k]) for k in keys) for r in read_rows(manifest)}


def csv_place(row, prefix="", suffix=""):
    return tuple(float(row[f"{prefix}{k}{suffix}"]) for k in ("lat", "lon", "diameter_km"))


def assert_mars_lonlat(frame):
    assert frame.crs.is_geographic and body_of(frame.crs).name == "Mars"
    assert frame.crs.ellipsoid.semi_major_metre == pytest.approx(MARS_R)


@pytest.mark.slow
def test_search_dedup_and_match_write_layers_that_read_back(observed, tmp_path, capsys) -> None:
    root, obs = observed
    demo_a, sum_a, _ = obs["A"]
    truth = catalog_positions(demo_a.catalog)
    assert cli("search", str(root / "idxA"), str(sum_a.manifest), "--top", "3",
                 "--out", str(tmp_path / "hits"), "--geojson") == 0  # fmt: skip
    hits_csv = read_rows(tmp_path / "hits.csv")
    # the CSV itself carries the manifest's lat/lon/diameter_km of the hit and of the query
    place = manifest_places(sum_a.manifest)
    for r in hits_csv:
        assert csv_place(r, "") == place[r["gallery_id"]]
        assert csv_place(r, "query_") == place[r["query"]]
    for suffix in (".gpkg", ".geojson"):
        layer = gpd.read_file(tmp_path / f"hits{suffix}", engine="pyogrio")
        assert_mars_lonlat(layer)
        assert len(layer) == len(hits_csv)
        for _, r in layer.iterrows():
            lon, lat = truth[r["crater"]]
            assert (r.geometry.x, r.geometry.y) == pytest.approx((lon, lat), abs=1e-6)
            assert r["gallery_id"].startswith(r["crater"])
        first = layer[layer["rank"] == 1]
        assert (first["query"] == first["gallery_id"]).all()  # each crop finds itself first

    assert cli("dedup", str(root / "idxA"), "--threshold", "0.0",
                 "--out", str(tmp_path / "dedup")) == 0  # fmt: skip
    groups = gpd.read_file(tmp_path / "dedup" / "groups.gpkg", layer="groups")
    assert_mars_lonlat(groups)
    group_rows = read_rows(tmp_path / "dedup" / "groups.csv")
    assert len(groups) == sum(int(g["size"]) for g in group_rows) > 0
    for _, r in groups.iterrows():
        assert (r.geometry.x, r.geometry.y) == pytest.approx(truth[r["crater"]], abs=1e-6)
    crater_place = {m["crater_id"]: place[m["image_id"]] for m in read_rows(sum_a.manifest)}
    for g in group_rows:
        members = g["craters"].split(";")
        cells = zip(*(g[c].split(";") for c in ("lat", "lon", "diameter_km")), strict=True)
        assert [tuple(map(float, c)) for c in cells] == [crater_place[m] for m in members]
    for r in read_rows(tmp_path / "dedup" / "pairs.csv"):
        assert csv_place(r, "", "_a") == place[r["item_a"]]
        assert csv_place(r, "", "_b") == place[r["item_b"]]

    assert cli("match", str(root / "idxA"), str(root / "idxB"),
                 "--out", str(tmp_path / "m.csv")) == 0  # fmt: skip
    lines = gpd.read_file(tmp_path / "m.gpkg", layer="matches")
    assert_mars_lonlat(lines)
    assert len(lines) == len(read_rows(tmp_path / "m.csv")) > 0
    truth_b = catalog_positions(obs["B"][0].catalog)
    place_b = manifest_places(obs["B"][1].manifest)
    for r in read_rows(tmp_path / "m.csv"):
        assert csv_place(r, "", "_a") == place[r["item_a"]]
        assert csv_place(r, "", "_b") == place_b[r["item_b"]]
    for _, r in lines.iterrows():
        (lon_a, lat_a), (lon_b, lat_b) = r.geometry.coords
        assert (lon_a, lat_a) == pytest.approx(truth[r["crater_a"]], abs=1e-6)
        assert lat_b == pytest.approx(truth_b[r["crater_b"]][1], abs=1e-6)
        assert abs(lon_b - lon_a) < 1.0  # drawn the short way across the antimeridian
    assert "m.gpkg" in capsys.readouterr().out


def test_layer_module_writes_points_and_short_lines_with_the_crs(tmp_path) -> None:
    from craterlab.geo.layers import line, point, write_layer
    from craterlab.workflows.items import Item
    from craterlab.workflows.maps import NO_MAP, layer_crs, search_layer
    from craterlab.workflows.results import Hit, SearchHits

    crs = body_crs("Moon")
    paths = write_layer(
        tmp_path / "pts",
        [{"crater": "a", "score": 0.5}, {"crater": "b", "score": 0.25}],
        [point(179.5, -3.0), point(-179.5, -3.5)],
        crs,
        "craters",
        geojson=True,
    )
    assert [p.name for p in paths] == ["pts.gpkg", "pts.geojson"]
    for p in paths:
        frame = gpd.read_file(p)
        assert body_of(frame.crs).name == "Moon"
        assert list(frame.geometry.x) == [179.5, -179.5] and list(frame["score"]) == [0.5, 0.25]
    assert list(line(179.5, 0, -179.5, 1).coords) == [(179.5, 0.0), (180.5, 1.0)]
    assert list(line(-179.5, 0, 179.5, 1).coords) == [(-179.5, 0.0), (-180.5, 1.0)]
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"

    plain = [Item("q", "q.png", "q"), Item("g", "g.png", "g")]
    hits = SearchHits([Hit("q", 1, "g", 0.9, 0.8, 1)])
    assert search_layer(hits, plain[:1], plain[1:], tmp_path / "none") == NO_MAP
    assert not (tmp_path / "none.gpkg").exists()
    mars = Item("m", "m.png", "m", lat=1.0, lon=2.0, crs="IAU_2015:49900")
    moon = Item("n", "n.png", "n", lat=1.0, lon=2.0, crs="IAU_2015:30100")
    with pytest.raises(DataError, match="different CRSs"):
        layer_crs([mars, moon])


def test_a_lonlat_raster_laid_out_0_to_360_across_the_antimeridian(tmp_path) -> None:
    """A simple-cylindrical Moon raster in degrees (no CRS: --body Moon) spanning 178..182 E;
    craters given at -179.5 (i.e. 180.5 E) and 179.2 land where the degrees say."""
    size, res = 400, 0.01  # degrees per pixel
    transform = from_origin(178.0, 2.0, res, res)
    craters = [("e", -179.5, 0.5, 6.0), ("w", 179.2, -0.4, 5.0)]
    centres = [((lon % 360 - 178.0) / res, (2.0 - lat) / res) for _, lon, lat, _ in craters]
    tif = blob_raster(tmp_path / "moon_deg.tif", None, transform, size, centres, 2.0)
    cat = read_catalog(
        write_catalog(
            tmp_path / "c.csv",
            ["id", "lat", "lon", "diameter_km"],
            [[n, lat, lon, d] for n, lon, lat, d in craters],
        )
    )
    with Mosaic(tif, body="Moon") as m:
        assert m.is_geographic and m.body.name == "Moon"
        placed = place(m, cat, out_px=OUT, limits=Limits(max_upscale=None)).placed
        got = {p.id: (p.col, p.row) for p in placed}
        for (name, *_), c in zip(craters, centres, strict=True):
            assert got[name] == pytest.approx(c, abs=1e-6)
        for p in placed:
            cx, cy = centroid(crop_crater(m, p, 3.0, OUT).image)
            assert abs(cx - OUT / 2) < 1.0 and abs(cy - OUT / 2) < 1.0, (p.id, cx, cy)


def test_a_pixel_catalog_on_a_georeferenced_mosaic_gets_lat_lon(tmp_path, mars) -> None:
    root, tif, craters, centres, res = mars
    rows = [[n, f"{c:.4f}", f"{r:.4f}", 15] for n, (c, r) in zip(craters, centres, strict=True)]
    pixel = write_catalog(tmp_path / "px.csv", ["id", "x", "y", "diameter"], rows)
    s = ingest_mosaic(tif, pixel, tmp_path / "out", crop_size=32, progress=False)
    manifest = {r["crater_id"]: r for r in read_rows(s.manifest)}
    for name, (lon, lat, _) in craters.items():
        r = manifest[name]
        assert float(r["lat"]) == pytest.approx(lat, abs=1e-7)
        assert (float(r["lon"]) - lon + 180) % 360 - 180 == pytest.approx(0, abs=1e-7)
        assert float(r["diameter_km"]) == pytest.approx(15 * res / 1000, rel=0.03)


def test_ingest_command_takes_the_mosaic_path_with_columns(tmp_path, mars, capsys) -> None:
    root, tif, craters, _, _ = mars
    rows = [[n, lat, lon, d] for n, (lon, lat, d) in craters.items()]
    cat = write_catalog(tmp_path / "odd.csv", ["NAME", "PHI", "LAMBDA", "SIZE_KM"], rows)
    args = ["--image", tif, "--catalog", cat, "--out", tmp_path / "out", "--crop-size", "32"]
    with pytest.raises(DataError, match="--columns"):
        cli("ingest", *args)
    assert cli("ingest", *args, "--columns", "lat=PHI,lon=LAMBDA,diameter_km=SIZE_KM,id=NAME") == 0
    out = capsys.readouterr().out
    assert "craters: 3, crops: 6" in out and "Mars" in out


def test_the_interpolated_sample_grid_matches_exact_projection(monkeypatch, tmp_path) -> None:
    """Crops project 17 x 17 nodes exactly and interpolate between them: within 0.05 px of
    projecting every sample, even for a 3x crop of a 60 km crater 2 degrees from the pole."""
    from craterlab.geo import rasters

    transform = from_origin(-60_000.0, 60_000.0, 100.0, 100.0)
    tif = blob_raster(tmp_path / "p.tif", "IAU_2015:30130", transform, 64, [], 1.0)
    with Mosaic(tif) as m:
        fast = m.grid(45.0, 88.0, 180_000.0, 224, (5_000.0, -3_000.0))
        monkeypatch.setattr(rasters, "GRID_NODES", 10**6)
        exact = m.grid(45.0, 88.0, 180_000.0, 224, (5_000.0, -3_000.0))
    for a, b in zip(fast, exact, strict=True):
        assert np.abs(a - b).max() < 0.05
