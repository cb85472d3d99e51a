"""Hostile use of the feature cache: `cache clear` on a folder that holds more than the cache,
a hand-edited progress.json, a read-only cache directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_cache import CountingBackbone, TinyDataset, run

import craterlab.cache as cache_module
from craterlab.backbones.extract import extract_features
from craterlab.cache import ENTRY_MARKER, cache_info
from craterlab.commands.cache import cli
from craterlab.errors import CraterlabError


def fill(root: Path) -> dict[str, Path]:
    """A cache dir as users have them: entries (new, legacy, partial) beside other things."""
    _, info = run(CountingBackbone(), TinyDataset(), root)
    _, legacy = run(CountingBackbone(seed=1), TinyDataset(), root)
    (Path(legacy.path) / ENTRY_MARKER).unlink()  # written before the marker existed
    with pytest.raises(KeyboardInterrupt):
        run(CountingBackbone(seed=2, fail_after=3), TinyDataset(), root, commit_every=3)
    (root / "runs" / "2024-01-01").mkdir(parents=True)
    (root / "runs" / "2024-01-01" / "metrics.json").write_text("{}")
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "my-notes").mkdir()
    (root / "notes.txt").write_text("keep me")
    # looks like an entry by name, but its meta.json doesn't hold the name's key
    lookalike = root / f"x__y__z__{'0' * 20}"
    lookalike.mkdir()
    (lookalike / "meta.json").write_text(json.dumps({"key": "1" * 20}))
    return {"entry": Path(info.path), "legacy": Path(legacy.path), "lookalike": lookalike}


def test_clear_yes_removes_only_provable_entries(tmp_path: Path, capsys) -> None:
    made = fill(tmp_path)
    assert {e.status for e in cache_info(tmp_path)} == {"complete", "partial"}
    assert len(cache_info(tmp_path)) == 3
    assert cli(["clear", "--yes"], str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.count("would remove") == 3 and "Removed 3 entries" in out
    assert "left alone" in out and ".git" in out and "runs" in out
    assert not made["entry"].exists() and not made["legacy"].exists()
    assert (tmp_path / "runs" / "2024-01-01" / "metrics.json").read_text() == "{}"
    assert (tmp_path / ".git" / "HEAD").is_file() and (tmp_path / "my-notes").is_dir()
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert made["lookalike"].is_dir()
    assert cache_info(tmp_path) == [] and not list(tmp_path.glob("*.lock"))


def test_clear_without_yes_and_no_terminal_refuses(tmp_path: Path, monkeypatch) -> None:
    fill(tmp_path)
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    with pytest.raises(CraterlabError, match="no terminal to confirm on. Run it again with --yes"):
        cli(["clear"], str(tmp_path))
    assert len(cache_info(tmp_path)) == 3


def test_clear_asks_and_a_no_removes_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    fill(tmp_path)
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert cli(["clear"], str(tmp_path)) == 1
    assert "Nothing removed" in capsys.readouterr().out and len(cache_info(tmp_path)) == 3
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert cli(["clear", "--status", "partial"], str(tmp_path)) == 0
    assert [e.status for e in cache_info(tmp_path)] == ["complete", "complete"]


@pytest.mark.parametrize(
    "progress",
    [
        {"done": 999, "arrays": ["attn", "cls", "tokens"]},
        {"done": -3, "arrays": ["attn", "cls", "tokens"]},
        {"done": 8, "arrays": ["attn", "cls", "tokens"]},  # only 6 rows were written
        {"done": 3, "arrays": ["../../etc", "cls"]},
        {"done": "3", "arrays": ["attn", "cls", "tokens"]},
        [1, 2, 3],
        "not json",
    ],
)
def test_tampered_progress_restarts_and_gives_true_features(
    tmp_path: Path, progress, caplog
) -> None:
    data = TinyDataset()
    with pytest.raises(KeyboardInterrupt):
        run(CountingBackbone(fail_after=6), data, tmp_path, commit_every=3)
    [partial] = cache_info(tmp_path)
    assert partial.done == 6
    text = progress if isinstance(progress, str) else json.dumps(progress)
    (Path(partial.path) / "progress.json").write_text(text)
    feats, info = run(CountingBackbone(), data, tmp_path, commit_every=3)
    assert info.computed == 10  # the partial entry was discarded, not trusted
    assert any("Discarding unreadable partial" in r.message for r in caplog.records)
    whole, _ = extract_features(CountingBackbone(), data, "gallery", device="cpu", progress=False)
    assert torch.equal(feats.tokens, whole.tokens) and torch.equal(feats.cls, whole.cls)


def read_only(monkeypatch, root: Path) -> None:
    """Make ``root`` unwritable: chmod for ordinary users, the write probe for root (whom
    permissions don't stop)."""
    root.chmod(0o555)
    real = cache_module.writable_dir
    monkeypatch.setattr(cache_module, "writable_dir", lambda p: p != root and real(p))


def test_read_only_cache_serves_its_entries(tmp_path: Path, monkeypatch, caplog) -> None:
    root = tmp_path / "cache"
    first, _ = run(CountingBackbone(), TinyDataset(), root)
    for lock in root.glob("*.lock"):
        lock.unlink()
    read_only(monkeypatch, root)
    try:
        backbone = CountingBackbone()
        again, info = run(backbone, TinyDataset(), root)
        assert info.cache_hit and backbone.calls == 0
        assert torch.equal(again.tokens, first.tokens)
        assert any("not writable: using it read-only" in r.message for r in caplog.records)
        assert not list(root.glob("*.lock"))
        with pytest.raises(CraterlabError, match=r"not writable .* must write entry counting__"):
            run(CountingBackbone(seed=5), TinyDataset(), root)
    finally:
        root.chmod(0o755)
    shutil.rmtree(root)
