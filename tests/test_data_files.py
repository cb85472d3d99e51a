"""CraterBench-R reader (miniature release), CSV manifests, export round trip and the CLI."""

from __future__ import annotations

import csv
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from craterlab.commands.dataset import main as cli_main
from craterlab.data.craterbench import CraterBenchR
from craterlab.data.export import export_dataset
from craterlab.data.manifest import ManifestDataset
from craterlab.data.synthetic import SyntheticCraters
from craterlab.errors import DataError
from craterlab.types import ImageRecord


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CRATERLAB_DATA", str(tmp_path / "cache"))


def _img(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def make_release(root: Path, *, zipped: bool = False, relevance_by_crater: bool = True) -> Path:
    """A miniature release in the published layout: string crater ids, relative paths."""
    craters = ["02-1-000001", "02-1-000002", "02-1-000003"]
    gallery = [
        {
            "image_id": f"{c}_{v}",
            "path": f"images/gallery/{c}_{v}.jpg",
            "crater_id": c,
            "view_type": v,
        }
        for c in craters
        for v in ("2x", "3x")
    ]
    query = [
        {"image_id": f"q_{c}_{i}", "path": f"images/query/q_{c}_{i}.jpg", "crater_id": c}
        for c in craters[:2]
        for i in range(2)
    ]
    files = {e["path"]: 40 + 10 * i for i, e in enumerate(gallery + query)}
    if zipped:
        root.mkdir(parents=True)
        with zipfile.ZipFile(root / "images.zip", "w") as zf:
            for rel, value in files.items():
                tmp = root / "tmp.jpg"
                _img(tmp, value)
                zf.write(tmp, rel)
                tmp.unlink()
    else:
        for rel, value in files.items():
            _img(root / rel, value)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(exist_ok=True)
    test = {"split_name": "test", "gallery_images": gallery, "query_images": query}
    (root / "splits/test.json").write_text(json.dumps(test))
    train = {"split_name": "train", "gallery_images": gallery[4:]}
    (root / "splits/train.json").write_text(json.dumps(train))
    if relevance_by_crater:
        rel = {
            craters[0]: {
                "raw_covisible_crater_ids": [craters[0], "99-9-999999"],
                "gallery_filtered_relevant_ids": [craters[0]],
            },
            craters[1]: {
                "raw_covisible_crater_ids": craters[1:],
                "gallery_filtered_relevant_ids": craters[1:],
            },
        }
    else:
        rel = {
            "queries": [{"image_id": q["image_id"], "relevant": [q["crater_id"]]} for q in query]
        }
    (root / "metadata/query_relevance.json").write_text(json.dumps(rel))
    (root / "metadata/stats.json").write_text(json.dumps({"official": {}}))
    return root


# ---------------------------------------------------------------------- CraterBench-R


def test_reads_miniature_release(tmp_path):
    ds = CraterBenchR(root=str(make_release(tmp_path / "rel")))
    gallery, query, train = (ds.records(s) for s in ("gallery", "query", "train"))
    assert len(gallery) == 6 and len(query) == 4 and len(train) == 2
    assert {r.view_type for r in gallery} == {"2x", "3x"}
    names = ds.crater_ids.to_name
    q2 = [q for q in query if names[q.crater_id] == "02-1-000002"][0]
    assert {names[i] for i in q2.relevant_ids} == {"02-1-000002", "02-1-000003"}
    q1 = [q for q in query if names[q.crater_id] == "02-1-000001"][0]
    assert {names[i] for i in q1.relevant_ids} == {"02-1-000001"}
    assert len(ds.raw_covisible[q1.image_id]) == 2  # raw ids keep the non-gallery crater
    img = ds.load_image(gallery[1])
    assert img.mode == "RGB" and img.size == (8, 8)
    assert ds.identity() == CraterBenchR(root=str(tmp_path / "rel")).identity()


def test_unzips_and_finds_nested_release(tmp_path):
    make_release(tmp_path / "outer" / "CraterBench-R", zipped=True, relevance_by_crater=False)
    ds = CraterBenchR(root=str(tmp_path / "outer"))
    assert (tmp_path / "outer/CraterBench-R/images/query").is_dir()
    assert len(ds.records("query")) == 4
    ds.load_image(ds.records("query")[0])


def test_images_unpacked_without_images_folder(tmp_path):
    root = make_release(tmp_path / "rel")
    shutil.move(root / "images" / "gallery", root / "gallery")
    shutil.move(root / "images" / "query", root / "query")
    ds = CraterBenchR(root=str(root))
    assert ds.load_image(ds.records("gallery")[0]).size == (8, 8)


def test_layout_mismatch_names_expected_key(tmp_path):
    root = make_release(tmp_path / "rel")
    (root / "splits/test.json").write_text(json.dumps({"gallery": [], "probes": []}))
    with pytest.raises(DataError, match=r"'query_images'.*found keys: gallery, probes"):
        CraterBenchR(root=str(root))


def test_missing_images_are_listed(tmp_path):
    root = make_release(tmp_path / "rel")
    (root / "images/query/q_02-1-000001_0.jpg").unlink()
    with pytest.raises(DataError, match="q_02-1-000001_0.jpg"):
        CraterBenchR(root=str(root))


def test_missing_root_and_offline_download_explain_the_fix(tmp_path):
    with pytest.raises(DataError, match="(?s)does not exist.*huggingface-cli download"):
        CraterBenchR(root=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="(?s)HF_HUB_OFFLINE.*huggingface-cli download jfang"):
        CraterBenchR(root=None)
    with pytest.raises(DataError, match="download=false"):
        CraterBenchR(root=None, download=False)


def test_corrupt_image_names_its_path(tmp_path):
    root = make_release(tmp_path / "rel")
    bad = root / "images/gallery/02-1-000001_2x.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"images/gallery/02-1-000001_2x.jpg: is not a readable"):
        CraterBenchR(root=str(root))  # found up front, by its header
    ds = CraterBenchR(root=str(root), check_files=False)
    rec = next(r for r in ds.records("gallery") if r.image_id == "02-1-000001_2x")
    with pytest.raises(DataError, match="02-1-000001_2x.jpg"):
        ds.load_image(rec)


# ---------------------------------------------------------------------- export round trip


def test_synthetic_export_reads_back_through_the_release_reader(tmp_path):
    syn = SyntheticCraters(size="tiny", image_size=32, n_query_craters=3, views_per_query=2)
    stats = export_dataset(syn, tmp_path / "out", image_format="png", progress=False)
    assert stats["official"]["gallery_images"] == 48
    back = CraterBenchR(root=str(tmp_path / "out"))
    for split in ("gallery", "query", "train"):
        a, b = syn.records(split), back.records(split)
        assert [(r.image_id, r.crater_id, r.view_type, r.relevant_ids) for r in a] == [
            (r.image_id, r.crater_id, r.view_type, r.relevant_ids) for r in b
        ]
    rec = syn.records("query")[1]
    assert np.array_equal(np.asarray(syn.load_image(rec)), np.asarray(back.load_image(rec)))
    # resumable: a second export writes nothing new
    again = export_dataset(syn, tmp_path / "out", image_format="png", progress=False)
    assert again["export"]["images_written"] == 0


def test_cli_export_info_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli_main(
        [
            "dataset",
            "export",
            "--out",
            str(out),
            "--size",
            "tiny",
            "--image-size",
            "24",
            "n_query_craters=2",
            "dataset.views_per_query=1",
            "--no-progress",
            "--zip",
        ]
    )
    assert rc == 0
    assert (out / "images.zip").is_file() and (out / "splits/test.json").is_file()
    doc = json.loads((out / "splits/test.json").read_text())
    assert len(doc["query_images"]) == 2
    assert cli_main(["info", "--size", "tiny"]) == 0
    assert "gallery: 48 images" in capsys.readouterr().out
    assert cli_main(["export", "--out", str(out), "n_identity=3"]) == 2
    assert "n_identities" in capsys.readouterr().err  # suggests the right key


# ---------------------------------------------------------------------- manifest


def write_manifest(root: Path, rows: list[dict[str, str]], *, images: bool = True) -> Path:
    fields = ["image_id", "path", "crater_id", "role", "relevant_ids", "view_type"]
    with open(root / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in fields})
    if images:
        for i, row in enumerate(rows):
            if not (root / row["path"]).exists():
                _img(root / row["path"], 10 * i)
    return root / "m.csv"


def base_rows() -> list[dict[str, str]]:
    return [
        {"image_id": "g1", "path": "img/g1.png", "crater_id": "A", "role": "gallery"},
        {"image_id": "g2", "path": "img/g2.png", "crater_id": "B", "role": "gallery"},
        {"image_id": "q1", "path": "img/q1.png", "crater_id": "A", "role": "query"},
        {
            "image_id": "q2",
            "path": "img/q2.png",
            "crater_id": "C",
            "role": "query",
            "relevant_ids": "C;B",
        },
        {"image_id": "t1", "path": "img/t1.png", "crater_id": "D", "role": "train"},
    ]


def test_manifest_reads_roles_and_relevance(tmp_path):
    ds = ManifestDataset(str(write_manifest(tmp_path, base_rows())))
    names = ds.crater_ids.to_name
    q1, q2 = ds.records("query")
    assert {names[i] for i in q1.relevant_ids} == {"A"}  # default: own crater
    assert {names[i] for i in q2.relevant_ids} == {"B", "C"}
    assert len(ds.records("gallery")) == 2 and len(ds.records("train")) == 1
    assert ds.load_image(q2).mode == "RGB"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.append(dict(r[0])), r"duplicate image ids:\n  line 7: image_id 'g1'"),
        (
            lambda r: r[1].update(path="img/none.png"),
            r"(?s)cannot be used:.*line 3: img/none.png: does not exist",
        ),
        (
            lambda r: r[3].update(relevant_ids="Z"),
            r"(?s)no relevant gallery image.*line 5: query 'q2'",
        ),
        (lambda r: r[4].update(role="val"), r"role='val'"),
    ],
)
def test_manifest_problems_name_the_rows(tmp_path, mutate, message):
    rows = base_rows()
    write_manifest(tmp_path, rows)  # create images first
    mutate(rows)
    path = write_manifest(tmp_path, rows, images=False)
    with pytest.raises(DataError, match=message):
        ManifestDataset(str(path))


def test_manifest_missing_column_and_missing_file(tmp_path):
    (tmp_path / "bad.csv").write_text("image_id,path,crater\nx,y,z\n")
    with pytest.raises(DataError, match="lacks column.*crater_id, role; found columns"):
        ManifestDataset(str(tmp_path / "bad.csv"))
    with pytest.raises(DataError, match="(?s)does not exist.*dataset.path"):
        ManifestDataset(str(tmp_path / "nope.csv"))


def test_manifest_unreadable_image_is_found_up_front_or_lazily(tmp_path):
    path = write_manifest(tmp_path, base_rows())
    (tmp_path / "img/g2.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"line 3: img/g2.png: is not a readable image"):
        ManifestDataset(str(path))
    ds = ManifestDataset(str(path), check_files=False)  # no header reads: fails when decoded
    with pytest.raises(DataError, match=r"img/g2.png"):
        ds.load_image(ds.records("gallery")[1])
    with pytest.raises(DataError, match="not in manifest"):
        ds.load_image(ImageRecord("zzz", 0))


def test_example_manifest_is_valid():
    root = Path(__file__).resolve().parents[1] / "examples/manifest/manifest.csv"
    ds = ManifestDataset(str(root))
    assert any(len(q.relevant_ids) > 1 for q in ds.records("query"))
    ds.load_image(ds.records("query")[0])
