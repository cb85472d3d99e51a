"""Silent wrong answers and raw errors of the workflows: a resumed sweep that misses a replaced
checkpoint, R@10 lowered by ``depth``, degenerate features without a warning, nonsense options
accepted with exit 0, a planner that hangs on a dead server, a catalog in Latin-1, an emptied
index, an orphaned worker. Each is a correct answer, a warning, or one paragraph."""

from __future__ import annotations

import csv
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import workflow_tiny
from PIL import Image

from craterlab.commands import plan as plan_command
from craterlab.commands import workflows as cli
from craterlab.errors import ConfigError, CraterlabError, DataError
from craterlab.metrics import evaluate
from craterlab.pipeline import ranked_depth
from craterlab.sweeps.resume import config_identity
from craterlab.workflows.api import CraterIndex
from craterlab.workflows.geometry import GeometryFilter
from craterlab.workflows.ingest import ingest_catalog, read_catalog

TINY = workflow_tiny(k=4, shortlist=4, batch_size=8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("answers")
    rng = np.random.default_rng(2)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(root / f"c{i}.png")
    CraterIndex.build(root, TINY, progress=False).save(root.parent / "answers-idx")
    return root.parent / "answers-idx"


# --------------------------------------------------------------------------- resume identity


def test_a_replaced_checkpoint_is_a_new_job_identity(tmp_path) -> None:
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(b"first model")
    config = {"backbone": {"weights": str(ckpt)}, "k": 16}
    before = config_identity(config)
    assert config_identity(config) == before  # stable while nothing changes
    ckpt.write_bytes(b"another model, same path")
    assert config_identity(config) != before


def test_a_changed_dataset_folder_is_a_new_job_identity(tmp_path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.csv").write_text("image_id,path\n")
    config = {"dataset": {"root": str(tmp_path / "data")}}
    before = config_identity(config)
    (tmp_path / "data" / "manifest.csv").write_text("image_id,path\na,a.png\n")
    assert config_identity(config) != before


# --------------------------------------------------------------------------- depth vs R@K


def test_depth_truncates_only_the_map_family_never_r_at_10() -> None:
    # one query; its only relevant image (crater 1) is at rank 8 of 10
    ranking = np.array([[2, 3, 4, 5, 6, 7, 8, 0, 9, 10]])
    gallery = np.array([1] + [100 + i for i in range(10)])
    full = evaluate(ranking, gallery, [{1}]).metrics
    cut = evaluate(ranking, gallery, [{1}], map_depth=5).metrics
    assert full["R@10"] == cut["R@10"] == 1.0 and cut["recall@10"] == 1.0
    assert full["mAP"] == pytest.approx(1 / 8) and cut["mAP"] == 0.0
    assert ranked_depth(5, 100) == 10 and ranked_depth(50, 100) == 50 and ranked_depth(5, 7) == 7


# --------------------------------------------------------------------------- degenerate features


def test_identical_crops_are_warned_about_in_a_workflow(tmp_path, caplog) -> None:
    for i in range(3):
        Image.fromarray(np.full((32, 32), 77, np.uint8)).save(tmp_path / f"same{i}.png")
    with caplog.at_level(logging.WARNING, logger="craterlab"):
        CraterIndex.build(tmp_path, TINY, progress=False)
    assert "Degenerate features after feature extraction: all 3 crops images" in caplog.text


# --------------------------------------------------------------------------- option ranges


@pytest.mark.parametrize(
    ("command", "argv", "message"),
    [
        ("search", ["--top", "0"], "--top 0 is not valid: it must be a whole number >= 1"),
        ("search", ["--top", "-3"], "--top -3 is not valid"),
        ("search", ["--shortlist", "0"], "--shortlist 0 is not valid"),
        ("search", ["--shortlist", "-5"], "--shortlist -5 is not valid"),
        ("dedup", ["--threshold", "nan"], "--threshold nan is not valid: it must be a finite"),
        ("dedup", ["--threshold", "0.9", "--neighbors", "0"], "--neighbors 0 is not valid"),
        ("dedup", ["--threshold", "0.9", "--neighbors", "-2"], "--neighbors -2 is not valid"),
        ("dedup", ["--threshold", "0.9", "--max-ratio", "0.5"], "--max-ratio 0.5 .* >= 1"),
        ("dedup", ["--threshold", "0.9", "--max-distance", "-1"], "--max-distance -1.0 .* >= 0"),
        ("dedup", ["--labels", "x.csv", "--min-precision", "2"], r"--min-precision 2.0 .*\(0, 1\]"),
        ("match", ["--neighbors", "-1"], "--neighbors -1 is not valid"),
        ("match", ["--min-score", "inf"], "--min-score inf is not valid"),
    ],
)
def test_nonsense_workflow_options_are_refused_with_the_range(
    saved, tmp_path, command, argv, message
) -> None:
    positional = {
        "search": [str(saved), str(tmp_path)],
        "dedup": [str(saved)],
        "match": [str(saved), str(saved)],
    }[command]
    run = {"search": cli.search_command, "dedup": cli.dedup_command, "match": cli.match_command}
    with pytest.raises(ConfigError, match=message):
        run[command]([*positional, *argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.csv").exists()


def test_the_geometry_filter_checks_its_limits_from_python_too() -> None:
    with pytest.raises(ConfigError, match="--max-offset nan"):
        GeometryFilter(max_offset=math.nan)


@pytest.mark.parametrize("override", ["batch_size=0", "num_workers=-1"])
def test_bad_run_settings_are_refused_before_encoding(tmp_path, override) -> None:
    with pytest.raises(ConfigError, match=f"{override} is not valid"):
        cli.index_command([str(tmp_path), "--out", str(tmp_path / "idx"), *TINY, override])


def tile_and_catalog(
    tmp_path: Path, rows: list[list[str]], encoding: str = "utf-8"
) -> tuple[Path, Path]:
    image = tmp_path / "tile.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(image)
    catalog = tmp_path / "catalog.csv"
    with open(catalog, "w", newline="", encoding=encoding) as f:
        csv.writer(f).writerows([["id", "x", "y", "diameter"], *rows])
    return image, catalog


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"factors": [0]}, "--factors 0 is not valid"),
        ({"factors": [2, -2]}, "--factors -2 is not valid"),
        ({"origin": (math.nan, math.inf)}, r"--origin \(nan, inf\) is not valid"),
        ({"crop_size": 0}, "--crop-size 0 is not valid"),
    ],
)
def test_nonsense_ingest_options_are_refused(tmp_path, kwargs, message) -> None:
    image, catalog = tile_and_catalog(tmp_path, [["a", "30", "30", "10"]])
    with pytest.raises(ConfigError, match=message):
        ingest_catalog(image, catalog, tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_tiny_and_enormous_diameters_are_named_rows(tmp_path) -> None:
    rows = [["tiny", "30", "30", "0.0001"], ["huge", "30", "30", "1e9"], ["ok", "30", "30", "10"]]
    _, catalog = tile_and_catalog(tmp_path, rows)
    with pytest.raises(DataError) as info:
        read_catalog(catalog, 64, 64)
    message = str(info.value)
    assert "2 unusable row(s)" in message and "(id tiny)" in message and "(id huge)" in message
    assert "too small to cut" in message and "over the image-size limit" in message
    good, problems = read_catalog(catalog, 64, 64, skip_invalid=True)
    assert [r.id for r in good] == ["ok"] and len(problems) == 2


# --------------------------------------------------------------------------- raw errors


def test_a_latin1_catalog_is_named_not_a_traceback(tmp_path) -> None:
    _, catalog = tile_and_catalog(tmp_path, [["Ganymède", "30", "30", "10"]], encoding="latin-1")
    with pytest.raises(DataError, match="is not UTF-8 text .* line 2.*iconv"):
        read_catalog(catalog, 64, 64)


def test_a_catalog_row_with_an_extra_field_is_named(tmp_path) -> None:
    _, catalog = tile_and_catalog(
        tmp_path, [["a", "30", "30", "10", "surplus"], ["b", "20", "20", "9"]]
    )
    with pytest.raises(DataError, match="line 2: 1 more field.*surplus"):
        read_catalog(catalog, 64, 64)


def test_a_search_on_an_emptied_index_is_named(saved, tmp_path) -> None:
    index = CraterIndex.load(saved)
    index.remove([it.id for it in index.items])
    index.save(tmp_path / "empty")
    for command in (
        lambda: cli.search_command(
            [str(tmp_path / "empty"), str(tmp_path), "--out", str(tmp_path / "h")]
        ),
        lambda: cli.match_command(
            [str(tmp_path / "empty"), str(saved), "--out", str(tmp_path / "m.csv")]
        ),
        lambda: cli.dedup_command(
            [str(tmp_path / "empty"), "--threshold", "0.5", "--out", str(tmp_path / "d")]
        ),
    ):
        with pytest.raises(DataError, match="holds no items"):
            command()


@pytest.mark.parametrize("content", [None, b"\x00\x01\xff\xfe binary"])
def test_a_missing_or_binary_ids_file_is_named(saved, tmp_path, content) -> None:
    ids = tmp_path / "ids.txt"
    if content is not None:
        ids.write_bytes(content)
    with pytest.raises(
        ConfigError, match="does not exist" if content is None else "not a UTF-8 text"
    ):
        cli.index_command(["remove", str(saved), "--ids-file", str(ids)])


def test_a_300_character_output_name_is_refused_before_any_work(saved, tmp_path) -> None:
    long = "x" * 300
    with pytest.raises(ConfigError, match="at most 255"):
        cli.search_command([str(saved), str(tmp_path), "--out", str(tmp_path / long)])
    with pytest.raises(ConfigError, match="at most 240"):
        cli.index_command([str(tmp_path), "--out", str(tmp_path / long), *TINY])


def test_plan_on_a_dead_server_is_a_message_within_the_timeout(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    start = time.monotonic()
    with pytest.raises(CraterlabError, match="Could not read the MLflow store http://127.0.0.1:9"):
        plan_command.main(
            ["--bytes-per-image", "1e4", "--ms-per-query", "5", "--tracking-uri",
             "http://127.0.0.1:9", "--timeout-s", "5"]
        )  # fmt: skip
    assert time.monotonic() - start < 20


def test_plan_on_a_garbage_database_is_a_message(tmp_path) -> None:
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not an SQLite database at all" * 30)
    with pytest.raises(CraterlabError, match="Could not read the MLflow store sqlite:///"):
        plan_command.main(
            ["--bytes-per-image", "1e4", "--ms-per-query", "5", "--tracking-uri",
             f"sqlite:///{db}", "--timeout-s", "20"]
        )  # fmt: skip


# --------------------------------------------------------------------------- orphaned workers

WORKER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from craterlab.sweeps.orphans import watch_launcher
    assert watch_launcher(poll_s=0.1)
    print("watching", flush=True)
    time.sleep(60)
    """
)
LAUNCHER = textwrap.dedent(
    """
    import subprocess, sys, time
    sys.path.insert(0, {root!r})
    from craterlab.sweeps.orphans import remember_launcher
    remember_launcher()
    worker = subprocess.Popen([sys.executable, "-c", {worker!r}], stdout=subprocess.PIPE, text=True)
    assert worker.stdout.readline().strip() == "watching"
    print(worker.pid, flush=True)
    time.sleep(60)
    """
)


def test_a_worker_exits_when_its_launcher_is_killed() -> None:
    root = str(Path(__file__).resolve().parents[2])
    code = LAUNCHER.format(root=root, worker=WORKER.format(root=root))
    env = {k: v for k, v in os.environ.items() if k != "CRATERLAB_LAUNCHER_PID"}
    launcher = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        worker_pid = int(launcher.stdout.readline())
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(worker_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(worker_pid, signal.SIGKILL)
            pytest.fail("the worker outlived its killed launcher")
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_a_full_disk_anywhere_is_a_message_not_a_traceback(monkeypatch, capsys) -> None:
    import errno

    import craterlab.__main__ as entry

    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "outputs/run/.hydra/config.yaml")

    monkeypatch.setattr(sys, "argv", ["craterlab", "k=8"])
    monkeypatch.setattr(entry, "check_component_keys", lambda argv: argv)
    monkeypatch.setattr(entry, "run_hydra", full)
    with pytest.raises(SystemExit) as exit_info:
        entry.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "The disk is full while writing outputs/run/.hydra/config.yaml" in err
    assert "Traceback" not in err


def test_one_image_size_limit_with_an_option_to_raise_it(tmp_path) -> None:
    image, catalog = tile_and_catalog(tmp_path, [["a", "30", "30", "10"]])
    with pytest.raises(DataError, match=r"64 x 64 = 4,096 pixels.*--max-image-pixels 4096"):
        ingest_catalog(image, catalog, tmp_path / "small", max_image_pixels=4000, progress=False)
    assert not (tmp_path / "small").exists()
    done = ingest_catalog(image, catalog, tmp_path / "ok", max_image_pixels=4096, progress=False)
    assert done.crops == 2
    argv = [
        "--image", str(image), "--catalog", str(catalog), "--out", str(tmp_path / "cli"),
        "--max-image-pixels", "none",
    ]  # fmt: skip
    assert cli.ingest_command(argv) == 0
    with pytest.raises(ConfigError, match="not a positive pixel count or 'none'"):
        cli.ingest_command([*argv[:-1], "lots"])


def test_the_crop_readers_of_index_search_and_add_have_the_same_limit_and_option(
    tmp_path, capsys
) -> None:
    """index, index add and search refuse a crop over --max-image-pixels before any encoding,
    naming the option and the value that allows it, and accept it with the limit raised."""
    rng = np.random.default_rng(5)
    crops, more, queries = tmp_path / "crops", tmp_path / "more", tmp_path / "queries"
    for folder, n in ((crops, 3), (more, 2), (queries, 2)):
        folder.mkdir()
        for i in range(n):
            pixels = rng.integers(0, 255, (48, 40), dtype=np.uint8)  # 40 x 48 = 1,920 pixels
            Image.fromarray(pixels).save(folder / f"{folder.name}{i}.png")
    out = tmp_path / "idx"
    refused = r"40 x 48 = 1,920 pixels, more than --max-image-pixels 1,000.*--max-image-pixels 1920"
    with pytest.raises(DataError, match=refused):
        cli.index_command([str(crops), "--out", str(out), "--max-image-pixels", "1000", *TINY])
    assert not out.exists()
    assert (
        cli.index_command([str(crops), "--out", str(out), "--max-image-pixels", "1920", *TINY]) == 0
    )
    with pytest.raises(DataError, match=refused):
        cli.index_command(["add", str(out), str(more), "--max-image-pixels", "1000"])
    assert len(CraterIndex.load(out)) == 3  # nothing added
    assert cli.index_command(["add", str(out), str(more), "--max-image-pixels", "none"]) == 0
    assert len(CraterIndex.load(out)) == 5
    prefix = tmp_path / "hits"
    search = [str(out), str(queries), "--out", str(prefix)]
    with pytest.raises(DataError, match=refused):
        cli.search_command([*search, "--max-image-pixels", "1000"])
    assert not prefix.with_suffix(".csv").exists()
    assert cli.search_command([*search, "--max-image-pixels", "1920"]) == 0
    assert prefix.with_suffix(".csv").is_file()
    # the Python API: the same parameter; a manifest's screening names the workflow option too
    manifest = tmp_path / "q.csv"
    manifest.write_text(
        "image_id,path,crater_id,role\n"
        + "".join(f"q{i},queries/queries{i}.png,c{i},gallery\n" for i in range(2))
    )
    index = CraterIndex.load(out)
    with pytest.raises(DataError, match="--max-image-pixels 1920"):
        index.search(manifest, max_image_pixels=1000, progress=False)
    assert len(index.search(manifest, top=2, max_image_pixels=1920, progress=False).by_query()) == 2


def test_the_default_limit_refuses_a_crop_over_it_from_its_header(tmp_path) -> None:
    from craterlab.workflows.items import Item, check_decodable

    big = tmp_path / "big.png"  # 9,500 x 9,500 = 90,250,000 pixels > PIL's 89,478,485
    Image.new("1", (9500, 9500)).save(big)
    item = Item("big", str(big), "big")
    with pytest.raises(DataError, match=r"more than --max-image-pixels 89,478,485.*"
                       r"--max-image-pixels 90250000 \(or --max-image-pixels none"):  # fmt: skip
        check_decodable([item], skip_bad=False, progress=False)
    good, bad = check_decodable([item], skip_bad=False, progress=False, max_image_pixels=None)
    assert [it.id for it in good] == ["big"] and bad == []
