"""Rendered synthetic images are kept next to the feature cache: rendered once, read back
identical, and a damaged row is re-rendered rather than trusted."""

from __future__ import annotations

import numpy as np
import pytest

from craterlab.backbones import timm_vit
from craterlab.backbones.extract import extract_features
from craterlab.cache import renders_dir
from craterlab.data import synthetic
from craterlab.data.render_cache import RenderCache
from craterlab.data.synthetic import SyntheticCraters


def counting_renders(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = synthetic.render

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render", counted)
    return calls


def small() -> SyntheticCraters:
    return SyntheticCraters("tiny", n_identities=6, n_query_craters=2, image_size=32)


def test_each_image_is_rendered_once_and_read_back_identical(tmp_path, monkeypatch) -> None:
    plain = small()
    records = list(plain.records("gallery")) + list(plain.records("query"))
    expected = [np.asarray(plain.load_image(r)) for r in records]
    calls = counting_renders(monkeypatch)
    first = small()
    first.cache_renders(tmp_path)
    for r, e in zip(records, expected, strict=True):
        assert np.array_equal(np.asarray(first.load_image(r)), e)
    assert len(calls) == len(records)
    again = small()  # another run, same machine
    again.cache_renders(tmp_path)
    for r, e in zip(records, expected, strict=True):
        assert np.array_equal(np.asarray(again.load_image(r)), e)
    assert len(calls) == len(records)  # nothing rendered twice


def test_a_torn_row_is_rendered_again_not_trusted(tmp_path) -> None:
    cache = RenderCache(tmp_path, 3, (4, 4))
    image = np.arange(16, dtype=np.uint8).reshape(4, 4)
    assert np.array_equal(cache.get(1, lambda: image), image)
    pixels = np.memmap(tmp_path / "pixels.u8", dtype=np.uint8, mode="r+", shape=(3, 4, 4))
    pixels[1, 0, 0] = 255  # damage on disk after the sum was written
    pixels.flush()
    assert np.array_equal(cache.get(1, lambda: image), image)
    assert cache.get(1, lambda: pytest.fail("an intact row was rendered again"))[0, 0] == 0


def test_an_unusable_directory_only_costs_renders(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = RenderCache(blocker / "renders", 2, (4, 4))
    image = np.ones((4, 4), np.uint8)
    assert np.array_equal(cache.get(0, lambda: image), image)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "pixels.u8").write_bytes(b"x" * 5)  # another shape's file
    assert np.array_equal(RenderCache(tmp_path / "other", 2, (4, 4)).get(0, lambda: image), image)


def test_extraction_renders_once_across_backbones(tmp_path, monkeypatch) -> None:
    """A second precision misses the feature cache but not the rendered images."""
    data = small()
    calls = counting_renders(monkeypatch)
    for precision in ("fp32", "bf16"):
        vit = timm_vit("test_vit", "r160_in1k", weights="random", precision=precision)
        extract_features(vit, data, "query", device="cpu", batch_size=4, cache_dir=tmp_path,
                         progress=False)  # fmt: skip
    assert len(calls) == len(data.records("query"))
    assert (renders_dir(tmp_path, data.identity()) / "query" / "pixels.u8").exists()
