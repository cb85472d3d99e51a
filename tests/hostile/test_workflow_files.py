"""Files are data, never instructions: paths and values read from an index's ``meta.json`` /
``workflow.json``, a token store or a cache entry are checked before anything is read or
written, a recorded cache folder is never written to, and a run's strings are escaped in
``table.md``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import workflow_tiny
from PIL import Image

from craterlab.cache import CorruptEntry, load_entry
from craterlab.commands import workflows as cli
from craterlab.errors import CraterlabError, DataError
from craterlab.hashing import sha256_of
from craterlab.report.runs import RunRecord
from craterlab.report.tables import LAYOUTS, build_table, to_markdown
from craterlab.retrieval import EncodedGallery, Int8Quantizer
from craterlab.testing import random_tokens
from craterlab.workflows.api import CraterIndex as Index

TINY = workflow_tiny(k=4, shortlist=4, batch_size=8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(root / f"c{i}.png")
    Index.build(root, TINY, progress=False).save(root.parent / "files-idx")
    return root.parent / "files-idx"


@pytest.fixture
def index_dir(saved, tmp_path) -> Path:
    shutil.copytree(saved, tmp_path / "deep" / "er" / "idx")
    return tmp_path / "deep" / "er" / "idx"


def edit_json(file: Path, change) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def rehash(gallery: Path) -> None:
    """Record the current size and checksum of every file (an attacker's consistent edit)."""

    def update(d: dict) -> None:
        for rel, info in d["files"].items():
            if (gallery / rel).is_file():
                info.update(bytes=(gallery / rel).stat().st_size, sha256=sha256_of(gallery / rel))

    edit_json(gallery / "meta.json", update)


def gallery_dir(tmp_path: Path) -> Path:
    g = random_tokens(6, 4, 8, seed=0)
    vectors = torch.nn.functional.normalize(g.vectors.mean(1), dim=-1)
    EncodedGallery([f"g{i}" for i in range(6)], vectors, Int8Quantizer().encode(g)).save(
        tmp_path / "g"
    )
    return tmp_path / "g"


# --------------------------------------------------------------------------- paths in files


def test_a_store_array_named_outside_the_index_is_never_written(index_dir, tmp_path) -> None:
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    meta = index_dir / "gallery" / "store" / "meta.json"
    edit_json(meta, lambda d: d["arrays"].__setitem__("../../../../victim", d["arrays"]["codes"]))
    rehash(index_dir / "gallery")
    with pytest.raises(DataError, match=r"'../../../../victim' that is not a plain file name"):
        cli.index_command(["remove", str(index_dir), "c0.png"])
    assert victim.read_bytes() == b"precious"


@pytest.mark.parametrize("name", ["../../../../etc/hostname", "/etc/hostname", "stage1/../x"])
def test_a_meta_json_file_entry_outside_the_index_is_refused(tmp_path, name) -> None:
    g = gallery_dir(tmp_path)
    edit_json(g / "meta.json", lambda d: d["files"].__setitem__(name, {"bytes": 1, "sha256": "0"}))
    with pytest.raises(DataError, match="not a plain file name inside"):
        EncodedGallery.load(g)


def test_a_meta_json_entry_through_a_link_out_of_the_index_is_refused(tmp_path) -> None:
    g = gallery_dir(tmp_path)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x")
    os.symlink(outside, g / "link.bin")
    edit_json(
        g / "meta.json", lambda d: d["files"].__setitem__("link.bin", {"bytes": 1, "sha256": "0"})
    )
    with pytest.raises(DataError, match="a link out of the folder"):
        EncodedGallery.load(g)


def test_a_cache_entry_naming_files_outside_it_is_corrupt(tmp_path) -> None:
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "meta.json").write_text(json.dumps({"images": 1, "grid": [1, 1]}))
    (entry / "manifest.json").write_text(
        json.dumps({"files": {"cls.npy": {}, "tokens.npy": {}, "../../secret.npy": {}}})
    )
    with pytest.raises(CorruptEntry, match="other than the entry's arrays"):
        load_entry(entry)


# --------------------------------------------------------------------------- damaged values


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.__setitem__("nprobe", "abc"), "nprobe='abc'"),
        (lambda d: d.__setitem__("n", -3), "n=-3"),
        (lambda d: d.__setitem__("counts", [1, 2]), "counts="),
        (lambda d: d.__setitem__("files", "all"), "'files' is not a mapping"),
    ],
)
def test_damaged_gallery_meta_values_are_named(tmp_path, change, message) -> None:
    g = gallery_dir(tmp_path)
    edit_json(g / "meta.json", change)
    with pytest.raises(DataError, match=message.replace("[", r"\[")):
        EncodedGallery.load(g, verify=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["arrays"].pop("scales"), "'scales' that a int8 store needs is missing"),
        (lambda d: d["arrays"]["codes"].__setitem__("shape", [-6, 4, 8]), "array 'codes'"),
        (lambda d: d["arrays"]["codes"].__setitem__("dtype", "object"), "array 'codes'"),
        (lambda d: d.__setitem__("k", "four"), "k='four'"),
    ],
)
def test_damaged_store_meta_is_named(tmp_path, change, message) -> None:
    g = gallery_dir(tmp_path)
    edit_json(g / "store" / "meta.json", change)
    rehash(g)
    with pytest.raises(DataError, match=message):
        EncodedGallery.load(g, verify=False)


WORKFLOW_DAMAGE = {
    "a JSON list": lambda d: [d],
    "items not a list": lambda d: {**d, "items": "many"},
    "an item without id": lambda d: {**d, "items": [{"path": "x"}] * d["n"]},
    "no stage1": lambda d: {**d, "config": {k: v for k, v in d["config"].items() if k != "stage1"}},
    "n a string": lambda d: {**d, "n": "five"},
    "overrides not a list": lambda d: {**d, "overrides": "k=4"},
    "a pooling without name": lambda d: {**d, "config": {**d["config"], "pooling": 3}},
}


@pytest.mark.parametrize("variant", list(WORKFLOW_DAMAGE))
def test_damaged_workflow_json_is_one_error(index_dir, variant) -> None:
    file = index_dir / "workflow.json"
    file.write_text(json.dumps(WORKFLOW_DAMAGE[variant](json.loads(file.read_text()))))
    with pytest.raises(DataError, match="damaged workflow.json"):
        Index.load(index_dir)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary", b'{"format": 1, "items": [', b""])
def test_unreadable_workflow_json_is_one_error(index_dir, content) -> None:
    (index_dir / "workflow.json").write_bytes(content)
    with pytest.raises(DataError, match="damaged workflow.json"):
        Index.load(index_dir)


# --------------------------------------------------------------------------- recorded cache dir


def test_a_recorded_cache_dir_is_information_not_a_place_to_write(index_dir, tmp_path) -> None:
    elsewhere = tmp_path / "builders-machine" / "cache"
    edit_json(
        index_dir / "workflow.json",
        lambda d: d["config"]["cache"].__setitem__("dir", str(elsewhere)),
    )
    index = Index.load(index_dir)
    assert index.config["cache"]["dir"] == os.environ["CRATERLAB_CACHE"]
    assert index.built_with_cache["dir"] == str(elsewhere)
    queries = tmp_path / "q"
    queries.mkdir()
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(queries / "q.png")
    index.search(queries, top=2, progress=False)
    assert not elsewhere.exists()


# --------------------------------------------------------------------------- table.md


def test_a_runs_weights_string_is_escaped_in_table_md() -> None:
    cfg = {
        "backbone.name": "timm_vit",
        "backbone.model": "vit_small_patch16_224",
        "backbone.pretrained_tag": "dino",
        "pooling.name": "cls",
        "dataset.name": "craterbench_r",
    }
    evil = "<img src=x onerror=alert(1)>|pwn"
    record = RunRecord("r", cfg, {"single": {"mAP": 0.5, "R@1": 0.4}}, weights=evil)
    markdown = to_markdown(build_table([record], LAYOUTS["table2"]))
    assert "<img" not in markdown and "&lt;img src=x onerror=alert(1)&gt;" in markdown
    assert "\\|pwn" in markdown


def test_a_damaged_index_never_reaches_the_user_as_a_traceback(index_dir) -> None:
    edit_json(index_dir / "gallery" / "meta.json", lambda d: d.__setitem__("ef_search", -1))
    with pytest.raises(CraterlabError, match="ef_search=-1"):
        cli.index_command(["info", str(index_dir)])


# --- a sweep's state: the earlier run's directory recorded in the tracking store ---


def _crafted_run(tag: str):
    from craterlab.results import IDENTITY_TAG, RUN_DIR_TAG, FinishedRun

    return FinishedRun("r1", {"single/mAP": 0.9}, {RUN_DIR_TAG: tag, IDENTITY_TAG: "abc"})


@pytest.mark.parametrize("kind", ["climbs", "absolute", "link"])
def test_a_run_dir_tag_outside_the_sweeps_outputs_is_not_reused_and_nothing_is_read(
    tmp_path, monkeypatch, caplog, kind
) -> None:
    from craterlab.sweeps import resume

    project, victim = tmp_path / "project", tmp_path / "elsewhere" / "secret"
    victim.mkdir(parents=True)
    (victim / "results.json").write_text(json.dumps({"results": {"single": {"mAP": 0.123}}}))
    (victim / "rankings.json").write_text('{"stolen": 1}')
    job = project / "outputs" / "multirun" / "d" / "t" / "0"
    job.mkdir(parents=True)
    monkeypatch.chdir(project)
    if kind == "climbs":
        tag = "../elsewhere/secret"
    elif kind == "absolute":
        tag = str(victim)
    else:  # a folder inside the outputs whose results.json is a link out of it
        inside = project / "outputs" / "multirun" / "d" / "old" / "0"
        inside.mkdir(parents=True)
        (inside / "results.json").symlink_to(victim / "results.json")
        tag = str(inside)
    found = _crafted_run(tag)
    with pytest.raises(DataError, match="craterlab.run_dir"):
        resume.earlier_run_dir(found, job)

    class Store:
        def find_finished(self, tags):
            return found

    monkeypatch.setattr(resume, "in_multirun", lambda: True)
    monkeypatch.setattr(resume, "make_tracker", lambda cfg: Store())
    config = {"output_dir": str(job), "resume": True, "tracking": {"name": "mlflow"}}
    with caplog.at_level("WARNING", logger="craterlab"):
        assert resume.previous_run(config) is None  # the job runs again
    assert "not reused, the job runs again" in caplog.text and repr(tag) in caplog.text
    # called directly, record_skip still reads nothing there: results from the run's metrics
    resume.record_skip(job, found)
    assert json.loads((job / "results.json").read_text())["results"] == {"single": {"mAP": 0.9}}
    assert not (job / "rankings.json").exists()


def test_a_sweep_launched_from_the_filesystem_root_trusts_no_outside_tag(monkeypatch) -> None:
    from craterlab.sweeps import resume

    monkeypatch.chdir("/")
    assert resume.allowed_roots(Path("/sweep/0")) == []
    with pytest.raises(DataError, match="outside the sweep's outputs"):
        resume.earlier_run_dir(_crafted_run("/etc"), Path("/sweep/0"))


def test_a_run_dir_tag_inside_the_outputs_is_reused(tmp_path, monkeypatch) -> None:
    from craterlab.sweeps import resume

    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "outputs" / "multirun" / "d1" / "t1" / "0"
    earlier.mkdir(parents=True)
    (earlier / "results.json").write_text(json.dumps({"results": {"single": {"mAP": 0.5}}}))
    job = tmp_path / "outputs" / "multirun" / "d2" / "t2" / "0"
    found = _crafted_run("outputs/multirun/d1/t1/0")  # relative to the launch folder
    assert resume.earlier_run_dir(found, job) == earlier.resolve()
    resume.record_skip(job, found)
    assert (job / "results.json").read_text() == (earlier / "results.json").read_text()
