"""Feature cache: hit without a forward pass, miss on any identity change, fp16 memory-mapped
tokens, corrupt and half-written entries rebuilt, interrupted extraction resumed, racing runs."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from craterlab.backbones.extract import extract_features
from craterlab.cache import cache_info, clear_cache
from craterlab.commands.cache import cli
from craterlab.types import Features, ImageRecord


class TinyDataset:
    """n deterministic 8x8 RGB images."""

    name = "tiny"

    def __init__(self, n: int = 10, version: str = "v1") -> None:
        self.n, self.version = n, version

    def records(self, split: str) -> list[ImageRecord]:
        return [ImageRecord(f"{split}-{i}", i) for i in range(self.n)]

    def load_image(self, record: ImageRecord) -> Image.Image:
        rng = np.random.default_rng(record.crater_id)
        return Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))

    def identity(self) -> str:
        return f"tiny-{self.n}-{self.version}"


class CountingBackbone:
    """A cheap deterministic backbone that counts the images it encodes: 2x2 grid of 4x4
    patches, each projected to 8 dims; attention = softmax of token norms."""

    dim = 8
    has_attention = True
    weights_status = "random (requested)"

    def __init__(self, seed: int = 0, fail_after: int | None = None) -> None:
        self.seed = seed
        self.proj = torch.randn(48, 8, generator=torch.Generator().manual_seed(seed))
        self.model = torch.nn.Identity()
        self.calls = 0
        self.fail_after = fail_after

    def transform(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)

    def encode(self, images: torch.Tensor) -> Features:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += len(images)
        b = len(images)
        patches = images.unfold(2, 4, 4).unfold(3, 4, 4)  # B,3,2,2,4,4
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, 4, 48)
        tokens = patches @ self.proj
        return Features(tokens.mean(1), tokens, tokens.norm(dim=-1).softmax(-1), (2, 2))

    forward_features = encode

    def to(self, device: torch.device | str) -> CountingBackbone:
        return self

    def identity(self) -> dict:
        return {"label": "counting", "seed": self.seed}


def run(backbone, dataset, cache, **kw):
    kw.setdefault("batch_size", 3)
    return extract_features(
        backbone, dataset, "gallery", device="cpu", cache_dir=cache, progress=False, **kw
    )


def test_second_run_is_a_hit_without_forward(tmp_path: Path) -> None:
    data = TinyDataset()
    first, info1 = run(CountingBackbone(), data, tmp_path)
    assert not info1.cache_hit and info1.computed == 10 and info1.path
    backbone = CountingBackbone()
    second, info2 = run(backbone, data, tmp_path)
    assert info2.cache_hit and backbone.calls == 0 and info2.computed == 0
    assert torch.equal(first.tokens, second.tokens) and torch.equal(first.attn, second.attn)
    assert second.tokens.dtype == torch.float16 and second.cls.dtype == torch.float32
    assert isinstance(np.load(Path(info2.path) / "tokens.npy", mmap_mode="r"), np.memmap)
    # the stored values are the backbone's, rounded to fp16, in record order
    fresh = CountingBackbone()
    ref = fresh.encode(
        torch.stack([fresh.transform(data.load_image(r)) for r in data.records("gallery")])
    )
    assert torch.equal(second.tokens, ref.tokens.half())
    assert torch.allclose(second.cls, ref.cls)
    assert second.grid == (2, 2)


def test_any_identity_change_is_a_miss(tmp_path: Path) -> None:
    run(CountingBackbone(), TinyDataset(), tmp_path)
    for backbone, data in [
        (CountingBackbone(seed=1), TinyDataset()),
        (CountingBackbone(), TinyDataset(version="v2")),
    ]:
        _, info = run(backbone, data, tmp_path)
        assert not info.cache_hit and backbone.calls == 10
    _, info = extract_features(
        CountingBackbone(),
        TinyDataset(),
        "query",
        device="cpu",
        cache_dir=tmp_path,
        progress=False,
    )
    assert not info.cache_hit
    assert len(cache_info(tmp_path)) == 4


def test_tokens_are_memory_mapped_and_casting_works(tmp_path: Path) -> None:
    run(CountingBackbone(), TinyDataset(), tmp_path)
    feats, _ = run(CountingBackbone(), TinyDataset(), tmp_path)
    chunk = feats.tokens[2:5].float()
    assert chunk.shape == (3, 4, 8)
    feats.tokens[0] += 1  # copy-on-write map: never modifies the file
    again, _ = run(CountingBackbone(), TinyDataset(), tmp_path)
    assert not torch.equal(again.tokens[0], feats.tokens[0])


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_corrupt_entry_is_rebuilt_with_a_warning(tmp_path: Path, caplog, damage: str) -> None:
    first, info = run(CountingBackbone(), TinyDataset(), tmp_path)
    expected = first.tokens.clone()  # (the returned tokens map the file we damage below)
    entry = Path(info.path)
    tokens = entry / "tokens.npy"
    if damage == "truncate":
        tokens.write_bytes(tokens.read_bytes()[:-7])
    elif damage == "flip":
        raw = bytearray(tokens.read_bytes())
        raw[-3] ^= 0xFF
        tokens.write_bytes(bytes(raw))
    else:
        (entry / "manifest.json").unlink()
    backbone = CountingBackbone()
    rebuilt, info2 = run(backbone, TinyDataset(), tmp_path)
    assert not info2.cache_hit and backbone.calls == 10
    assert any("corrupt" in r.message for r in caplog.records if r.levelname == "WARNING")
    assert torch.equal(rebuilt.tokens, expected)
    assert cache_info(tmp_path, verify=True)[0].status == "complete"


def test_interrupted_extraction_resumes(tmp_path: Path) -> None:
    data = TinyDataset(n=10)
    # commits every 3 images; fails while encoding the 4th batch (images 9..10)
    with pytest.raises(KeyboardInterrupt):
        run(CountingBackbone(fail_after=9), data, tmp_path, commit_every=3)
    [partial] = cache_info(tmp_path)
    assert partial.status == "partial" and partial.done == 9 and partial.images == 10
    backbone = CountingBackbone()
    resumed, info = run(backbone, data, tmp_path, commit_every=3)
    assert backbone.calls == 1 and info.computed == 1 and not info.cache_hit
    whole, _ = extract_features(CountingBackbone(), data, "gallery", device="cpu", progress=False)
    assert torch.equal(resumed.tokens, whole.tokens) and torch.equal(resumed.attn, whole.attn)
    assert [e.status for e in cache_info(tmp_path)] == ["complete"]


def test_partial_entry_for_other_inputs_is_restarted(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        run(CountingBackbone(fail_after=3), TinyDataset(), tmp_path, commit_every=3)
    partial = Path(cache_info(tmp_path)[0].path)
    meta = json.loads((partial / "meta.json").read_text())
    meta["images"] = 99  # a leftover that doesn't belong to this extraction
    (partial / "meta.json").write_text(json.dumps(meta))
    backbone = CountingBackbone()
    run(backbone, TinyDataset(), tmp_path)
    assert backbone.calls == 10


def test_racing_runs_extract_once(tmp_path: Path) -> None:
    backbones = [CountingBackbone(), CountingBackbone()]
    results = [None, None]

    def go(i: int) -> None:
        results[i] = run(backbones[i], TinyDataset(), tmp_path)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(b.calls for b in backbones) == [0, 10]
    assert sorted(r[1].cache_hit for r in results) == [False, True]
    assert torch.equal(results[0][0].tokens, results[1][0].tokens)


def test_info_clear_and_cli(tmp_path: Path, capsys) -> None:
    assert cli(["info"], str(tmp_path)) == 0
    assert "(empty)" in capsys.readouterr().out
    run(CountingBackbone(), TinyDataset(), tmp_path)
    run(CountingBackbone(seed=2), TinyDataset(), tmp_path)
    infos = cache_info(tmp_path)
    assert len(infos) == 2 and all(i.bytes > 10 * 4 * 8 * 2 for i in infos)
    assert {i.backbone for i in infos} == {"counting"} and infos[0].images == 10
    assert cli(["info", "--verify"], str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and "complete" in out
    removed = clear_cache(tmp_path, pattern=f"{infos[0].name}")
    assert [r.name for r in removed] == [infos[0].name]
    assert cli(["clear", "--yes"], str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "would remove complete" in out and "Removed 1 entries" in out
    assert cache_info(tmp_path) == [] and not list(tmp_path.glob("*.lock"))
