"""16-bit and float images keep their content (issue 9, item 3).

``convert("RGB")`` clipped a 16-bit PNG to 99.6% white and a float TIFF to black; every image
is now stretched by its own range. Each case is checked against a numpy computation of the
documented stretch, written here independently of craterlab.data.images.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from craterlab.backbones import timm_vit
from craterlab.data.images import open_rgb, to_rgb8
from craterlab.data.manifest import ManifestDataset


def expected_stretch(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Min-max of the valid values onto 0..255, no-data black, as (H, W, 3) uint8."""
    v = values.astype(np.float64)
    lo, span = v[valid].min(), np.ptp(v[valid])
    grey = np.where(valid, np.round((v - lo) / span * 255.0), 0.0)
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)


def assert_matches(got: Image.Image, want: np.ndarray) -> None:
    arr = np.asarray(got)
    assert got.mode == "RGB" and arr.shape == want.shape
    diff = np.abs(arr.astype(int) - want.astype(int))
    assert diff.max() <= 1  # float rounding at exact .5 steps only
    assert (diff == 0).mean() > 0.99


def hirise_like(shape: tuple[int, int] = (40, 56), seed: int = 0) -> np.ndarray:
    """10-bit data in a 16-bit container, as HiRISE RDR exports are."""
    rng = np.random.default_rng(seed)
    return rng.integers(180, 1023, size=shape).astype(np.uint16)


def test_16bit_png_is_stretched_not_clipped(tmp_path) -> None:
    data = hirise_like()
    path = tmp_path / "ctx16.png"
    Image.fromarray(data).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # really a high-depth file
        clipped = np.asarray(im.convert("RGB"))
    assert (clipped == 255).mean() > 0.7  # what plain convert does: mostly white
    got = open_rgb(path)
    assert_matches(got, expected_stretch(data, np.ones(data.shape, bool)))
    assert np.asarray(got).min() == 0 and np.asarray(got).max() == 255


def test_float_tiff_with_nodata_is_stretched(tmp_path) -> None:
    rng = np.random.default_rng(1)
    temp = rng.uniform(0.02, 0.35, size=(32, 48)).astype(np.float32)  # calibrated I/F
    temp[0, :5] = np.nan
    temp[3, 7] = -3.4028227e38  # an ISIS special pixel (NULL)
    temp[5, 9] = np.inf
    path = tmp_path / "iof.tif"
    Image.fromarray(temp, mode="F").save(path)
    valid = np.isfinite(temp) & (np.abs(temp) < 1e30)
    with Image.open(path) as im:
        assert im.mode == "F"
        assert np.asarray(im.convert("RGB"))[valid].max() <= 1  # plain convert: black
    assert_matches(open_rgb(path), expected_stretch(temp, valid))


def test_int32_tiff_with_negative_values(tmp_path) -> None:
    data = np.arange(-600, 600, dtype=np.int32).reshape(30, 40) * 3
    path = tmp_path / "dem.tif"
    Image.fromarray(data, mode="I").save(path)
    with Image.open(path) as im:
        assert im.mode == "I"
    assert_matches(open_rgb(path), expected_stretch(data, np.ones(data.shape, bool)))


def test_constant_and_all_nodata_images_are_black() -> None:
    flat = Image.fromarray(np.full((8, 8), 700, np.uint16))
    assert not np.asarray(to_rgb8(flat)).any()
    nodata = Image.fromarray(np.full((8, 8), np.nan, np.float32), mode="F")
    assert not np.asarray(to_rgb8(nodata)).any()


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_8bit_images_are_unchanged(tmp_path, mode) -> None:
    rng = np.random.default_rng(2)
    rgb = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    image = rgb.convert(mode)
    path = tmp_path / f"x_{mode}.png"
    image.save(path)
    assert np.array_equal(np.asarray(open_rgb(path)), np.asarray(image.convert("RGB")))


def test_16bit_crop_through_a_manifest_and_a_backbone(tmp_path) -> None:
    """The manifest reader and a backbone's transform both use the stretch."""
    data = hirise_like((24, 24), seed=4)
    (tmp_path / "img").mkdir()
    Image.fromarray(data).save(tmp_path / "img/g.png")
    Image.fromarray(hirise_like((24, 24), seed=5)).save(tmp_path / "img/q.png")
    (tmp_path / "m.csv").write_text(
        "image_id,path,crater_id,role\ng,img/g.png,A,gallery\nq,img/q.png,A,query\n"
    )
    ds = ManifestDataset(str(tmp_path / "m.csv"))
    image = ds.load_image(ds.records("gallery")[0])
    assert_matches(image, expected_stretch(data, np.ones(data.shape, bool)))
    # a plugin dataset handing a raw 16-bit image to the backbone gets the same result
    backbone = timm_vit("test_vit", "r160_in1k", weights="random")
    raw = Image.fromarray(data)
    assert raw.mode.startswith("I")
    assert np.allclose(backbone.transform(raw).numpy(), backbone.transform(image).numpy())
