"""File datasets against hostile or damaged input (issue 9, items 6, 7, 8 and 9).

Stale features after an image changes with check_files=false, relevance ids naming no gallery
crater, bad images (all reported up front, or skipped and counted), FIFOs, decompression bombs,
paths leaving the dataset folder, and manifest rows with extra fields.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from craterlab.backbones import timm_vit
from craterlab.backbones.extract import extract_features
from craterlab.data.craterbench import CraterBenchR
from craterlab.data.images import open_rgb
from craterlab.data.manifest import ManifestDataset
from craterlab.errors import DataError

HEADER = "image_id,path,crater_id,role,relevant_ids\n"


@pytest.fixture(autouse=True)
def _no_hang():
    """A FIFO read would block forever: fail the test after 60 s instead."""
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("timed out (blocked on a read?)"))
    signal.alarm(60)
    yield
    signal.alarm(0)


def image(path: Path, value: int, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def manifest(root: Path, rows: list[str], name: str = "m.csv") -> Path:
    """A manifest of ``rows`` (CSV lines); every listed image under root/img is created."""
    for i, row in enumerate(rows):
        rel = row.split(",")[1]
        if rel.startswith("img/") and not (root / rel).exists():
            image(root / rel, i)
    (root / name).write_text(HEADER + "\n".join(rows) + "\n")
    return root / name


BASE = [
    "g1,img/g1.png,A,gallery,",
    "g2,img/g2.png,B,gallery,",
    "g3,img/g3.png,C,gallery,",
    "q1,img/q1.png,A,query,",
    "q2,img/q2.png,B,query,B;C",
]


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")
    )
    return path


# ---------------------------------------------------------------------- identity (item 6)


def test_check_files_false_identity_follows_size_and_mtime(tmp_path, caplog) -> None:
    path = manifest(tmp_path, BASE)
    with caplog.at_level(logging.INFO):
        before = ManifestDataset(str(path), check_files=False)
    assert "matched to the images by path+size+mtime" in caplog.text
    # toggling check_files alone does not change the identity (no needless recompute)
    assert ManifestDataset(str(path)).identity() == before.identity()
    target = tmp_path / "img/g2.png"
    st = target.stat()
    image(target, 99)  # same size (8x8 random PNG of the same encoder), new content
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = ManifestDataset(str(path), check_files=False)
    assert after.identity() != before.identity()


def test_changed_image_is_not_served_from_the_cache(tmp_path) -> None:
    path = manifest(tmp_path, BASE)
    backbone = timm_vit("test_vit", "r160_in1k", weights="random")
    cache = tmp_path / "cache"

    def run() -> tuple[np.ndarray, bool]:
        ds = ManifestDataset(str(path), check_files=False)
        feats, info = extract_features(
            backbone, ds, "gallery", device="cpu", cache_dir=cache, progress=False
        )
        return feats.cls.numpy().copy(), info.cache_hit

    first, hit = run()
    assert not hit and run()[1]  # unchanged: a hit
    target = tmp_path / "img/g1.png"
    st = target.stat()
    image(target, 123)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second, hit = run()
    assert not hit and not np.allclose(first[0], second[0]) and np.allclose(first[1], second[1])


# ---------------------------------------------------------------------- relevance (item 7)


def test_relevance_ids_naming_no_gallery_crater_warn_or_fail(tmp_path, caplog) -> None:
    rows = [*BASE[:4], "q2,img/q2.png,B,query,B;Z;Y", "q3,img/q3.png,C,query,C;Z"]
    path = manifest(tmp_path, rows)
    with caplog.at_level(logging.WARNING):
        ds = ManifestDataset(str(path))
    assert len(ds.records("query")) == 3  # nothing dropped
    warning = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "2 query row(s) list relevant_ids that name no gallery crater" in warning
    assert "line 6: query 'q2': Y;Z" in warning and "line 7: query 'q3': Z" in warning
    with pytest.raises(DataError, match=r"(?s)2 query row\(s\) list relevant_ids.*'q3': Z"):
        ManifestDataset(str(path), strict=True)


# ---------------------------------------------------------------------- bad images (item 8)


def test_all_bad_images_are_reported_up_front_with_their_rows(tmp_path) -> None:
    path = manifest(tmp_path, [*BASE, "g4,img/g4.png,A,gallery,", "g5,img/g5.png,A,gallery,"])
    (tmp_path / "img/g1.png").write_bytes(b"not an image")
    (tmp_path / "img/g4.png").unlink()
    (tmp_path / "img/g5.png").unlink()
    os.mkfifo(tmp_path / "img/g5.png")
    (tmp_path / "img/q1.png").write_bytes(b"")
    with pytest.raises(DataError) as err:
        ManifestDataset(str(path))
    msg = str(err.value)
    assert "4 image file(s) of the manifest cannot be used" in msg
    assert "line 2: img/g1.png: is not a readable image" in msg
    assert "line 7: img/g4.png: does not exist" in msg
    assert "line 8: img/g5.png: is a FIFO (named pipe), not an image file" in msg
    assert "line 5: img/q1.png: is empty (0 bytes)" in msg
    assert "dataset.skip_bad=true" in msg


def test_skip_bad_leaves_them_out_and_counts_them(tmp_path, caplog) -> None:
    path = manifest(tmp_path, [*BASE, "g4,img/g4.png,A,gallery,"])
    good = ManifestDataset(str(path))
    (tmp_path / "img/g4.png").write_bytes(b"GIF89a broken")
    (tmp_path / "img/g2.png").unlink()
    with caplog.at_level(logging.WARNING):
        ds = ManifestDataset(str(path), skip_bad=True)
    assert [r.image_id for r in ds.records("gallery")] == ["g1", "g3"]
    assert sorted(ds.skipped) == ["g2", "g4"]
    assert "skipped 2 bad image file(s)" in caplog.text and "line 7: img/g4.png" in caplog.text
    assert ds.identity() != good.identity()
    # a query whose relevant gallery images were all skipped is still an error, explained
    (tmp_path / "img/g1.png").unlink()
    with pytest.raises(DataError, match=r"(?s)no relevant gallery image \(3 bad image.*'q1'"):
        ManifestDataset(str(path), skip_bad=True)


def test_fifo_is_refused_without_blocking(tmp_path) -> None:
    path = manifest(tmp_path, BASE)
    (tmp_path / "img/g3.png").unlink()
    os.mkfifo(tmp_path / "img/g3.png")
    ds = ManifestDataset(str(path), check_files=False)  # no up-front check
    with pytest.raises(DataError, match=r"g3.png is a FIFO \(named pipe\), not an image file"):
        ds.load_image(ds.records("gallery")[2])
    with pytest.raises(DataError, match=r"is a folder"):
        open_rgb(tmp_path / "img")
    with pytest.raises(DataError, match=r"/dev/null is a device"):
        open_rgb("/dev/null")


def test_decompression_bomb_names_the_file_and_the_option(tmp_path) -> None:
    path = manifest(tmp_path, BASE)
    png_header_only(tmp_path / "img/g2.png", 20_000, 20_000)  # 400 Mpx: PIL's bomb error
    with pytest.raises(DataError) as err:
        ManifestDataset(str(path))
    msg = str(err.value)
    assert "line 3: img/g2.png: has 400,000,000 pixels, more than" in msg
    assert "dataset.max_image_pixels=400000000 (or null for no limit)" in msg
    # between PIL's warning and error levels: our own limit, same advice
    png_header_only(tmp_path / "img/g2.png", 10_000, 10_000)
    with pytest.raises(DataError, match=r"10000 x 10000 = 100,000,000 pixels"):
        ManifestDataset(str(path))
    # a small limit applies to ordinary images too, at load time as well
    with pytest.raises(DataError, match=r"img/g1.png: has 8 x 8 = 64 pixels.*pixels=64"):
        ManifestDataset(str(path), max_image_pixels=50)
    ds = ManifestDataset(str(path), max_image_pixels=None)  # allowed: the header passes
    with pytest.raises(DataError, match="max_image_pixels=63"):
        ManifestDataset(str(path), max_image_pixels=63, check_files=False).load_image(
            ds.records("gallery")[0]
        )


def test_relative_paths_climbing_out_of_the_manifest_folder_are_refused(tmp_path) -> None:
    root = tmp_path / "data"
    image(tmp_path / "outside.png", 1)
    rows = [*BASE[:3], "g4,../outside.png,A,gallery,", f"g5,{tmp_path / 'outside.png'},B,gallery,"]
    rows += [f"g6,{root / 'img/g1.png'},C,gallery,", *BASE[3:]]  # absolute but inside: fine
    path = manifest(root, rows)
    with pytest.raises(DataError) as err:
        ManifestDataset(str(path))
    msg = str(err.value)
    assert f"1 path(s) leave the manifest's folder {root} with ../" in msg
    assert "line 5: ../outside.png" in msg and "line 6:" not in msg  # absolute: the user's own
    assert "dataset.allow_outside_root=true" in msg
    ds = ManifestDataset(str(path), allow_outside_root=True)
    assert len(ds.records("gallery")) == 6


def test_a_users_absolute_paths_are_read_and_logged(tmp_path, caplog) -> None:
    root = tmp_path / "data"
    image(tmp_path / "elsewhere" / "mine.png", 1)
    rows = [*BASE[:3], f"g5,{tmp_path / 'elsewhere' / 'mine.png'},B,gallery,", *BASE[3:]]
    with caplog.at_level(logging.INFO, logger="craterlab"):
        ds = ManifestDataset(str(manifest(root, rows)))
    assert len(ds.records("gallery")) == 4
    assert "1 image(s) are listed by absolute path outside the manifest's folder" in caplog.text
    assert f"line 5: {tmp_path / 'elsewhere' / 'mine.png'}" in caplog.text


def test_every_problem_of_every_category_is_reported_in_one_pass(tmp_path) -> None:
    rows = [*BASE[:3], "g1,pics/missing.png,A,gallery,", "g9,../up.png,A,gallery,", *BASE[3:]]
    rows.append("q9,img/q1.png,B,query,B,extra")
    path = manifest(tmp_path / "data", rows)
    with pytest.raises(DataError) as err:
        ManifestDataset(str(path))
    msg = str(err.value)
    assert "duplicate image ids" in msg and "line 5: image_id 'g1'" in msg
    assert "pics/missing.png" in msg and "does not exist" in msg
    assert "leave the manifest's folder" in msg and "../up.png" in msg
    assert "more fields than the header" in msg


# ---------------------------------------------------------------------- extra fields (item 9)


def test_row_with_extra_fields_names_the_row(tmp_path) -> None:
    path = manifest(tmp_path, [*BASE[:4], "q2,img/q2.png,B,query,B,C", "q3,img/q3.png,C,query,,x"])
    with pytest.raises(DataError) as err:
        ManifestDataset(str(path))
    msg = str(err.value)
    assert "2 row(s) have more fields than the header (5 columns" in msg
    assert "line 6: extra value(s) ['C']" in msg and "line 7: extra value(s) ['x']" in msg
    assert "separate relevant_ids with semicolons" in msg


# ---------------------------------------------------------------------- extraction time


def truncated_jpeg(path: Path, seed: int) -> None:
    image(path, seed, size=64)
    path.rename(path.with_suffix(".tmp"))
    Image.open(path.with_suffix(".tmp")).save(path, format="JPEG")
    path.with_suffix(".tmp").unlink()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # the header survives, the scan data does not


@pytest.mark.parametrize("workers", [0, 1])
def test_images_damaged_past_their_header_are_all_reported_after_one_pass(
    tmp_path, workers
) -> None:
    rows = [f"g{i},img/g{i}.png,{'ABC'[i % 3]},gallery," for i in range(6)] + BASE[3:4]
    path = manifest(tmp_path, rows)
    for i in (1, 4):
        truncated_jpeg(tmp_path / f"img/g{i}.png", i)
    ds = ManifestDataset(str(path))  # headers are fine: the up-front check passes
    backbone = timm_vit("test_vit", "r160_in1k", weights="random")
    with pytest.raises(DataError) as err:
        extract_features(
            backbone, ds, "gallery", device="cpu", batch_size=2, num_workers=workers,
            progress=False, cache_dir=tmp_path / "cache",
        )  # fmt: skip
    msg = str(err.value)
    assert "2 of 6 images of manifest:m/gallery could not be decoded" in msg
    assert "img/g1.png" in msg and "img/g4.png" in msg and "truncated" in msg
    assert "Traceback" not in msg


# ---------------------------------------------------------------------- CraterBench-R


def release(root: Path, entries: dict[str, list[dict]], relevance: dict | None = None) -> Path:
    for e in entries["gallery_images"] + entries["query_images"]:
        if not e["path"].startswith(".."):
            image(root / e["path"], len(e["image_id"]))
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "splits/test.json").write_text(json.dumps(entries))
    if relevance is not None:
        (root / "metadata").mkdir(exist_ok=True)
        (root / "metadata/query_relevance.json").write_text(json.dumps(relevance))
    return root


def entry(image_id: str, crater: str, folder: str = "gallery") -> dict[str, str]:
    return {"image_id": image_id, "path": f"images/{folder}/{image_id}.jpg", "crater_id": crater}


def test_craterbench_checks(tmp_path, caplog) -> None:
    gallery = [entry("a1", "A"), entry("a2", "A"), entry("b1", "B")]
    query = [entry("qa", "A", "query"), entry("qb", "B", "query")]
    rel = {"A": {"gallery_filtered_relevant_ids": ["A", "X"]}, "B": ["B"]}
    root = release(tmp_path / "rel", {"gallery_images": gallery, "query_images": query}, rel)
    with caplog.at_level(logging.WARNING):
        CraterBenchR(root=str(root))
    assert "1 CraterBench-R queries list gallery-filtered relevant ids" in caplog.text
    assert "qa: X" in caplog.text
    with pytest.raises(DataError, match="qa: X"):
        CraterBenchR(root=str(root), strict=True)
    # bad images: all listed, or skipped with skip_bad
    (root / "images/gallery/a2.jpg").unlink()
    (root / "images/gallery/b1.jpg").write_bytes(b"junk")
    with pytest.raises(DataError) as err:
        CraterBenchR(root=str(root))
    msg = str(err.value)
    assert "images/gallery/a2.jpg: does not exist" in msg and "b1.jpg: is not a readable" in msg
    assert "1 of them are missing: unpack images.zip" in msg
    with pytest.raises(DataError, match=r"no relevant gallery image \(2 bad images"):
        CraterBenchR(root=str(root), skip_bad=True)  # qb's only gallery image is gone
    image(root / "images/gallery/b1.jpg", 5)
    ds = CraterBenchR(root=str(root), skip_bad=True)
    assert [r.image_id for r in ds.records("gallery")] == ["a1", "b1"]
    # check_files=false: identity still follows the files
    before = CraterBenchR(root=str(root), skip_bad=True, check_files=False).identity()
    st = (root / "images/gallery/a1.jpg").stat()
    os.utime(root / "images/gallery/a1.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert CraterBenchR(root=str(root), skip_bad=True, check_files=False).identity() != before


def test_craterbench_paths_leaving_the_release_are_refused(tmp_path) -> None:
    image(tmp_path / "secret.jpg", 1)
    gallery = [entry("a1", "A"), {"image_id": "x", "path": "../secret.jpg", "crater_id": "A"}]
    query = [entry("qa", "A", "query")]
    root = release(tmp_path / "rel", {"gallery_images": gallery, "query_images": query})
    with pytest.raises(DataError, match=r"(?s)1 image path\(s\).*point outside.*x: .*secret.jpg"):
        CraterBenchR(root=str(root))
    assert len(CraterBenchR(root=str(root), allow_outside_root=True).records("gallery")) == 2
