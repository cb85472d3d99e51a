"""Hostile use of the workflows' outputs: nothing the user made is replaced or deleted.

``index --out`` a crops folder, the working directory, a folder with a user's file or a file;
two updates of one index at once; a save killed between its two renames; outputs named like
their inputs; a full disk. Each is refused (or recovered) with one paragraph, and every input
is byte-identical afterwards."""

from __future__ import annotations

import csv
import errno
import shutil
import threading
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from conftest import workflow_tiny
from PIL import Image

from craterlab.cache import EntryWriter
from craterlab.commands import workflows as cli
from craterlab.errors import ConfigError, CraterlabError, DataError
from craterlab.types import Features
from craterlab.workflows import storage
from craterlab.workflows.api import CraterIndex as Index
from craterlab.workflows.ingest import ingest_folder

TINY = workflow_tiny(k=4, shortlist=4, batch_size=8)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    """Six 32-pixel crops and a labelled manifest listing them."""
    root = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(0)
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "path", "crater_id", "role"])
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(root / f"c{i}.png")
            w.writerow([f"c{i}", f"c{i}.png", f"crater{i // 2}", "gallery"])
    return root


@pytest.fixture(scope="module")
def saved(crops, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "idx"
    Index.build(crops / "manifest.csv", TINY, progress=False).save(out)
    return out


@pytest.fixture
def index_dir(saved, tmp_path) -> Path:
    shutil.copytree(saved, tmp_path / "idx")
    return tmp_path / "idx"


def ids_of(path: Path) -> list[str]:
    return [it.id for it in Index.load(path).items]


# --------------------------------------------------------------------------- index --out


def test_index_out_a_crops_folder_is_refused_and_the_crops_stay(crops) -> None:
    before = snapshot(crops)
    with pytest.raises(ConfigError, match="not a craterlab index.*refused"):
        cli.index_command([str(crops / "manifest.csv"), "--out", str(crops), *TINY])
    with pytest.raises(ConfigError, match="not a craterlab index"):
        cli.index_command([str(crops), "--out", str(crops), "--overwrite", *TINY])
    assert snapshot(crops) == before


@pytest.mark.parametrize("out", [".", "..", "$PWD"])
def test_index_out_the_working_directory_is_refused(crops, tmp_path, monkeypatch, out) -> None:
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    (work.parent / "thesis.tex").write_text("mine too")
    monkeypatch.chdir(work)
    target = str(work) if out == "$PWD" else out
    with pytest.raises(ConfigError, match="not a craterlab index"):
        cli.index_command([str(crops), "--out", target, *TINY])
    assert (work / "notes.txt").read_text() == "mine"
    assert (work.parent / "thesis.tex").read_text() == "mine too"


def test_index_out_an_existing_file_is_refused(crops, tmp_path) -> None:
    f = tmp_path / "results.csv"
    f.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        cli.index_command([str(crops), "--out", str(f), "--overwrite", *TINY])
    assert f.read_text() == "a,b\n1,2\n"
    assert not (tmp_path / "results.csv.old").exists()


def test_an_index_is_replaced_only_with_overwrite(saved, index_dir, tmp_path) -> None:
    other = Index.load(saved)
    other.remove([other.items[0].id])
    with pytest.raises(ConfigError, match="already holds a craterlab index.*--overwrite"):
        other.save(index_dir)
    assert len(Index.load(index_dir)) == 6
    other.save(index_dir, overwrite=True)
    assert len(Index.load(index_dir)) == 5
    # an index folder that also holds a user's file is not an index any more: never replaced
    (index_dir / "my-notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a craterlab index"):
        other.save(index_dir, overwrite=True)
    assert (index_dir / "my-notes.txt").read_text() == "keep"


def test_index_info_on_a_folder_does_not_advise_overwriting_it(crops) -> None:
    with pytest.raises(DataError) as info:
        cli.index_command(["info", str(crops)])
    message = str(info.value)
    assert "not a craterlab index" in message and f"--out {crops}`" not in message


# --------------------------------------------------------------------------- concurrent updates


def test_two_updates_at_once_both_land(index_dir) -> None:
    """The second update waits for the first's lock, then sees its change (none is lost)."""
    first_in = threading.Event()
    release = threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        try:
            with Index.updating(index_dir) as index:
                index.remove(["c0"])
                first_in.set()
                release.wait(10)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    t = threading.Thread(target=first)
    t.start()
    assert first_in.wait(10)
    second_done = threading.Event()

    def second() -> None:
        try:
            with Index.updating(index_dir) as index:
                index.remove(["c1"])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        second_done.set()

    t2 = threading.Thread(target=second)
    t2.start()
    assert not second_done.wait(0.5), "the second update did not wait for the first"
    release.set()
    t.join(10)
    t2.join(10)
    assert not errors
    assert ids_of(index_dir) == ["c2", "c3", "c4", "c5"]


def test_an_unlocked_stale_update_is_refused_not_lost(index_dir) -> None:
    a, b = Index.load(index_dir), Index.load(index_dir)
    a.remove(["c0"])
    a.save(index_dir)
    b.remove(["c1"])
    with pytest.raises(DataError, match="changed on disk after it was loaded"):
        b.save(index_dir)
    assert ids_of(index_dir) == ["c1", "c2", "c3", "c4", "c5"]


# --------------------------------------------------------------------------- interrupted save


def kill_at_rename(monkeypatch, n: int) -> None:
    """Make the n-th Path.rename of a save raise as a kill would stop it there."""
    real = Path.rename
    calls = {"n": 0}

    def rename(self, target):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("killed")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)


def test_a_save_killed_between_its_renames_is_restored_on_load(index_dir, monkeypatch) -> None:
    index = Index.load(index_dir)
    index.remove(["c5"])
    kill_at_rename(monkeypatch, 2)  # DIR -> DIR.old done, DIR.partial -> DIR not
    with pytest.raises(KeyboardInterrupt):
        index.save(index_dir)
    monkeypatch.undo()
    assert not index_dir.exists() and (index_dir.parent / "idx.partial").is_dir()
    assert ids_of(index_dir) == ["c0", "c1", "c2", "c3", "c4"]  # the complete new version
    assert not (index_dir.parent / "idx.partial").exists()
    assert not (index_dir.parent / "idx.old").exists()


def test_a_save_killed_before_its_new_version_was_complete_restores_the_old(index_dir) -> None:
    old, partial = index_dir.parent / "idx.old", index_dir.parent / "idx.partial"
    index_dir.rename(old)
    partial.mkdir()
    (partial / "gallery").mkdir()  # killed while writing: no workflow.json yet
    assert ids_of(index_dir) == [f"c{i}" for i in range(6)]
    assert not partial.exists() and not old.exists()


def test_a_users_folder_named_like_the_partial_is_never_deleted(saved, tmp_path) -> None:
    mine = tmp_path / "idx.partial"
    mine.mkdir()
    (mine / "data.csv").write_text("mine")
    with pytest.raises(ConfigError, match="not a half-written craterlab index"):
        Index.load(saved).save(tmp_path / "idx")
    assert (mine / "data.csv").read_text() == "mine"


# --------------------------------------------------------------------------- outputs vs inputs


def test_search_out_never_replaces_the_query_manifest(saved, crops) -> None:
    before = (crops / "manifest.csv").read_bytes()
    for extra in ([], ["--overwrite"]):
        with pytest.raises(ConfigError, match="is an input of this command"):
            cli.search_command(
                [str(saved), str(crops / "manifest.csv"), "--out", str(crops / "manifest"), *extra]
            )
    assert (crops / "manifest.csv").read_bytes() == before


def test_search_out_inside_the_index_is_refused(saved, crops) -> None:
    with pytest.raises(ConfigError, match="inside .*which this command reads"):
        cli.search_command([str(saved), str(crops), "--out", str(saved / "workflow")])


def test_existing_outputs_need_overwrite(saved, crops, tmp_path) -> None:
    (tmp_path / "hits.csv").write_text("old")
    with pytest.raises(ConfigError, match="1 output file.*already exist.*--overwrite"):
        cli.search_command([str(saved), str(crops), "--out", str(tmp_path / "hits")])
    (tmp_path / "m.csv").write_text("old")
    with pytest.raises(ConfigError, match="already exist"):
        cli.match_command([str(saved), str(saved), "--out", str(tmp_path / "m.csv")])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "pairs.csv").write_text("old")
    with pytest.raises(ConfigError, match="already exist"):
        cli.dedup_command([str(saved), "--out", str(tmp_path / "d")])
    assert (tmp_path / "hits.csv").read_text() == (tmp_path / "m.csv").read_text() == "old"


def test_match_out_an_existing_folder_is_named(saved, tmp_path) -> None:
    with pytest.raises(ConfigError, match="is an existing folder"):
        cli.match_command([str(saved), str(saved), "--out", str(tmp_path)])


def test_ingest_never_replaces_a_labelled_manifest_without_overwrite(crops, tmp_path) -> None:
    shutil.copytree(crops, tmp_path / "A")
    labelled = (tmp_path / "A" / "manifest.csv").read_bytes()
    with pytest.raises(ConfigError, match="already exist.*--overwrite"):
        ingest_folder(tmp_path / "A", tmp_path / "A" / "manifest.csv", progress=False)
    assert (tmp_path / "A" / "manifest.csv").read_bytes() == labelled
    ingest_folder(tmp_path / "A", tmp_path / "A" / "manifest.csv", overwrite=True, progress=False)
    assert (tmp_path / "A" / "manifest.csv").read_bytes() != labelled


# --------------------------------------------------------------------------- full disk

Usage = namedtuple("Usage", "total used free")


def test_a_full_disk_before_an_index_save_changes_nothing(index_dir, monkeypatch) -> None:
    before = snapshot(index_dir)
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 1000))
    index = Index.load(index_dir)
    index.remove(["c0"])
    with pytest.raises(DataError, match=r"Not enough disk space.*needs about .*1000 B are free"):
        index.save(index_dir)
    assert snapshot(index_dir) == before
    assert sorted(p.name for p in index_dir.parent.iterdir()) == ["idx"]


def test_a_disk_that_fills_during_an_index_save_changes_nothing(index_dir, monkeypatch) -> None:
    before = snapshot(index_dir)
    index = Index.load(index_dir)
    index.remove(["c0"])

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device", "vectors.bin")

    monkeypatch.setattr(index.gallery, "save", full)
    with pytest.raises(DataError, match="Not enough disk space to write index idx"):
        index.save(index_dir)
    assert snapshot(index_dir) == before
    assert not (index_dir.parent / "idx.partial").exists()


def features(n: int) -> Features:
    import torch

    return Features(cls=torch.zeros(n, 8), tokens=torch.zeros(n, 4, 8), attn=None, grid=(2, 2))


def test_a_full_disk_for_the_feature_cache_is_a_message_not_a_bus_error(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr("craterlab.cache.shutil.disk_usage", lambda p: Usage(10**9, 10**9, 10))
    writer = EntryWriter(tmp_path / "entry", 5, {"key": "k"})
    with pytest.raises(CraterlabError, match=r"Not enough disk space for the feature cache.*10 B"):
        writer.write(features(2))
    assert list(tmp_path.iterdir()) == []


def test_a_cache_write_that_cannot_reserve_space_changes_nothing(tmp_path, monkeypatch) -> None:
    def no_space(fd, offset, length):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("craterlab.cache.os.posix_fallocate", no_space)
    writer = EntryWriter(tmp_path / "entry", 5, {"key": "k"})
    with pytest.raises(CraterlabError, match="Not enough disk space for the feature cache"):
        writer.write(features(2))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_two_index_add_processes_at_once_both_land(index_dir, crops, tmp_path) -> None:
    """The reported case end to end: two `index add` commands started together."""
    import os
    import subprocess
    import sys

    sources = []
    for tag in ("x", "y"):
        with open(crops / "manifest.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        path = tmp_path / f"add-{tag}.csv"  # lists the crops by absolute path
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(
                [
                    {**r, "image_id": tag + r["image_id"], "path": str(crops / r["path"])}
                    for r in rows
                ]
            )
        sources.append(path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "craterlab", "index", "add", str(index_dir), str(src)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for src in sources
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    ids = ids_of(index_dir)
    assert len(ids) == 18 and {f"{t}c{i}" for t in "xy" for i in range(6)} <= set(ids)
