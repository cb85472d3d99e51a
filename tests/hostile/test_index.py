"""Hostile use of a saved gallery index: flipped bytes, truncated or missing files, a
``stage1/`` copied from another gallery, a damaged ``meta.json``. Each is a one-paragraph
:class:`DataError` naming the file, never a silently different ranking or a raw traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from craterlab.errors import CraterlabError
from craterlab.retrieval import EncodedGallery, Int8Quantizer
from craterlab.retrieval.stores import CodeStore
from craterlab.testing import random_tokens


def save(path: Path, seed: int = 0, n: int = 40, index: str = "Flat") -> EncodedGallery:
    g = random_tokens(n, 4, 16, seed=seed)
    vectors = torch.nn.functional.normalize(g.vectors.mean(1), dim=-1)
    gallery = EncodedGallery([f"g{i}" for i in range(n)], vectors, Int8Quantizer().encode(g), index)
    gallery.save(path)
    return gallery


def flip_byte(file: Path, offset: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x5A
    file.write_bytes(bytes(data))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    save(tmp_path / "idx")
    return tmp_path / "idx"


def test_intact_index_loads_and_records_its_manifest(saved: Path) -> None:
    meta = json.loads((saved / "meta.json").read_text())
    assert set(meta["files"]) == {
        "ids.json",
        "vectors.bin",
        "stage1/index.faiss",
        "store/meta.json",
        "store/codes.bin",
        "store/scales.bin",
    }
    assert meta["counts"] == {"ids": 40, "vectors": 40, "stage1": 40, "store": 40}
    assert all(info["bytes"] == (saved / rel).stat().st_size for rel, info in meta["files"].items())
    assert len(EncodedGallery.load(saved).ids) == 40


@pytest.mark.parametrize("rel", ["stage1/index.faiss", "store/codes.bin", "vectors.bin"])
def test_flipped_bytes_are_named(saved: Path, rel: str) -> None:
    flip_byte(saved / rel, (saved / rel).stat().st_size // 2)
    with pytest.raises(CraterlabError, match=f"{rel}.*does not match its saved checksum"):
        EncodedGallery.load(saved)
    EncodedGallery.load(saved, verify=False)  # the escape hatch for huge indexes still loads


@pytest.mark.parametrize("rel", ["stage1/index.faiss", "store/scales.bin", "ids.json"])
def test_truncated_files_are_named_even_without_checksums(saved: Path, rel: str) -> None:
    file = saved / rel
    file.write_bytes(file.read_bytes()[:-7])
    for verify in (True, False):
        with pytest.raises(CraterlabError, match=f"{rel} has .* bytes, .* were saved"):
            EncodedGallery.load(saved, verify=verify)


@pytest.mark.parametrize("rel", ["stage1/index.faiss", "store/codes.bin", "store/meta.json"])
def test_missing_files_are_named(saved: Path, rel: str) -> None:
    (saved / rel).unlink()
    with pytest.raises(CraterlabError, match=f"{rel} is missing"):
        EncodedGallery.load(saved)


def test_stage1_copied_from_another_gallery(tmp_path: Path) -> None:
    save(tmp_path / "a", seed=0)
    save(tmp_path / "b", seed=1)  # same size, different vectors
    shutil.rmtree(tmp_path / "a" / "stage1")
    shutil.copytree(tmp_path / "b" / "stage1", tmp_path / "a" / "stage1")
    with pytest.raises(CraterlabError, match="index.faiss does not match its saved checksum"):
        EncodedGallery.load(tmp_path / "a")
    save(tmp_path / "c", seed=2, n=30)  # another size: caught by sizes and counts alone
    shutil.rmtree(tmp_path / "a" / "stage1")
    shutil.copytree(tmp_path / "c" / "stage1", tmp_path / "a" / "stage1")
    with pytest.raises(CraterlabError, match="index.faiss has"):
        EncodedGallery.load(tmp_path / "a", verify=False)


def test_counts_that_disagree_are_named(saved: Path) -> None:
    meta = json.loads((saved / "meta.json").read_text())
    meta["counts"]["stage1"] = 39
    (saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CraterlabError, match="inconsistent"):
        EncodedGallery.load(saved)


def test_damaged_or_old_meta_json(saved: Path) -> None:
    (saved / "meta.json").write_text('{"format_version": 2, "n": 4')
    with pytest.raises(CraterlabError, match="meta.json is not valid JSON"):
        EncodedGallery.load(saved)
    (saved / "meta.json").write_text('{"format_version": 1}')
    with pytest.raises(CraterlabError, match="format version 1.*Rebuild"):
        EncodedGallery.load(saved)
    (saved / "meta.json").write_text("[2, 4]")  # valid JSON, not an index's metadata
    with pytest.raises(CraterlabError, match="meta.json is not a JSON object.*Rebuild"):
        EncodedGallery.load(saved)
    (saved / "store" / "meta.json").write_text("{")  # the token store's, shared reader
    with pytest.raises(CraterlabError, match="Token store metadata .* not valid JSON"):
        CodeStore.load(saved / "store")
