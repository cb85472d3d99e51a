"""Resume: the job identity ignores launch-local keys only, a FINISHED run of the identity is
found (FAILED and KILLED ones are not), a skipped job gets the earlier run's results, and
"database is locked" and a lost insert race are retried rather than losing a write, and
parallel jobs' shared-view columns are merged, not overwritten."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from craterlab.sweeps.resume import (
    IDENTITY_TAG,
    FinishedRun,
    config_identity,
    record_skip,
    strip_keys,
)
from craterlab.tracking.mlflow import (
    RACE_RETRIES,
    MlflowTracker,
    is_insert_race,
    is_locked_error,
    retry_locked,
)

CONFIG = {
    "k": 32,
    "shortlist": 100,
    "seed": 0,
    "num_workers": 0,
    "resume": True,
    "output_dir": "outputs/multirun/2026-01-01/12-00-00/3",
    "cache": {"enabled": True, "dir": "outputs/cache"},
    "tracking": {"name": "mlflow", "uri": None, "run_name": "k=32"},
    "extract": {"shard": None, "num_shards": 1},
    "report": {"table": None, "page_queries": 6},
    "aggregator": {"name": "instance", "k": 32, "assign": "hard"},
}


def test_identity_ignores_launch_local_keys() -> None:
    other_launch = {
        **CONFIG,
        "output_dir": "elsewhere/0",
        "resume": False,
        "num_workers": 4,
        "cache": {"enabled": True, "dir": "/scratch/cache"},
        "tracking": {"name": "mlflow", "uri": "http://host:5000", "run_name": "x"},
        "report": {"table": None, "page_queries": 0},
    }
    assert config_identity(other_launch) == config_identity(CONFIG)


@pytest.mark.parametrize(
    "change",
    [{"k": 16}, {"seed": 1}, {"aggregator": {"name": "instance", "k": 32, "assign": "soft2"}}],
)
def test_identity_changes_with_what_a_job_computes(change) -> None:
    assert config_identity({**CONFIG, **change}) != config_identity(CONFIG)
    assert config_identity({**CONFIG, "report": {"table": "t2"}}) != config_identity(CONFIG)


def test_strip_keys_removes_dotted_keys_only() -> None:
    out = strip_keys(CONFIG, ("report.page_queries", "tracking", "missing.key"))
    assert out["report"] == {"table": None} and "tracking" not in out
    assert CONFIG["report"] == {"table": None, "page_queries": 6}  # the input is untouched


def test_finished_run_splits_metrics_into_modes_storage_timings() -> None:
    run = FinishedRun(
        "r1",
        {"two_stage/mAP": 0.5, "two_stage/R_at_1": 0.4, "storage/token_store_bytes": 9.0,
         "time/tokens_seconds": 1.5, "train/loss": 3.0},
    )  # fmt: skip
    results, storage, timings = run.split()
    assert results == {"two_stage": {"mAP": 0.5, "R@1": 0.4}}
    assert storage == {"token_store_bytes": 9.0} and timings == {"tokens_seconds": 1.5}


def test_the_finished_run_of_an_identity_is_found_failed_and_killed_are_not(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri=uri, artifact_location=str(tmp_path / "art"), timeout_s=60)
    assert tracker.find_finished({IDENTITY_TAG: "abc"}) is None  # no store yet
    client = MlflowClient(uri)
    experiment = client.create_experiment("craterlab", (tmp_path / "art").as_uri())
    ids = {}
    for status in ("FAILED", "KILLED", "FINISHED", "RUNNING"):
        run = client.create_run(experiment, tags={IDENTITY_TAG: "abc", "s": status})
        client.log_metric(run.info.run_id, "two_stage/mAP", 0.25)
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
        ids[status] = run.info.run_id
    other = client.create_run(experiment, tags={IDENTITY_TAG: "xyz"})
    client.set_terminated(other.info.run_id, "FINISHED")
    found = tracker.find_finished({IDENTITY_TAG: "abc"})
    assert found is not None and found.run_id == ids["FINISHED"]
    assert found.metrics == {"two_stage/mAP": 0.25}
    assert tracker.find_finished({IDENTITY_TAG: "nope"}) is None


def test_a_skipped_job_gets_the_earlier_runs_results(tmp_path) -> None:
    earlier = tmp_path / "sweep1" / "0"
    earlier.mkdir(parents=True)
    (earlier / "results.json").write_text(json.dumps({"results": {"single": {"mAP": 0.7}}}))
    found = FinishedRun("r1", {}, {"craterlab.run_dir": str(earlier), IDENTITY_TAG: "abc"})
    job = tmp_path / "sweep2" / "0"
    record_skip(job, found)
    assert json.loads((job / "skipped.json").read_text()) == {"run_id": "r1", IDENTITY_TAG: "abc"}
    assert (job / "results.json").read_text() == (earlier / "results.json").read_text()
    # the earlier run directory is gone: results are rebuilt from the run's metrics
    gone = FinishedRun("r2", {"single/mAP": 0.7, "storage/tokens_per_image": 32.0}, {})
    record_skip(tmp_path / "sweep3" / "0", gone)
    rebuilt = json.loads((tmp_path / "sweep3" / "0" / "results.json").read_text())
    assert rebuilt["results"] == {"single": {"mAP": 0.7}}
    assert rebuilt["storage"] == {"tokens_per_image": 32.0}


def test_a_skipped_job_writes_the_whole_record_of_a_job_that_ran(tmp_path) -> None:
    earlier = tmp_path / "sweep1" / "0"
    earlier.mkdir(parents=True)
    (earlier / "results.json").write_text(json.dumps({"results": {"single": {"mAP": 0.7}}}))
    (earlier / "rankings.json").write_text('{"single": {}}')
    (earlier / "results.html").write_text("<html></html>")
    found = FinishedRun("r1", {}, {"craterlab.run_dir": str(earlier), IDENTITY_TAG: "abc"})
    job = tmp_path / "sweep2" / "0"
    record_skip(job, found, CONFIG)
    assert yaml.safe_load((job / "resolved_config.yaml").read_text()) == CONFIG
    assert (job / "rankings.json").read_text() == '{"single": {}}'
    assert (job / "results.html").is_file()
    assert {p.name for p in job.iterdir()} >= {p.name for p in earlier.iterdir()}


@pytest.mark.slow
def test_a_resumed_sweep_reports_exactly_as_an_uninterrupted_one(tmp_path) -> None:
    """headline_k16 in miniature: once uninterrupted (resume=false), once interrupted after
    its first job and relaunched (that job skipped): the two reports are the same table."""
    from conftest import ROOT, TINY

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CRATERLAB_CACHE": str(tmp_path / "cache")}

    def sweep(name: str, *extra: str) -> Path:
        out = tmp_path / name
        cmd = [sys.executable, "-m", "craterlab", "-m", "experiment=headline_k16", *TINY]
        cmd += ["report.page_queries=0", f"tracking.uri=sqlite:///{tmp_path}/{name[:5]}.db"]
        cmd += [f"hydra.sweep.dir={out}", *extra]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return out

    whole = sweep("whole", "resume=false")
    sweep("parts-first", "method=raw_selection")  # interrupted: only its first job ran
    resumed = sweep("parts-again")  # relaunched into the same store: that job is skipped
    skipped = [p for p in resumed.iterdir() if (p / "skipped.json").is_file()]
    assert len(skipped) == 1 and (skipped[0] / "resolved_config.yaml").is_file()
    table = "report/table.md"
    assert (resumed / table).read_text() == (whole / table).read_text()
    assert "—" not in (resumed / table).read_text().split("|---", 1)[1].split("\n- ")[0]


def test_a_locked_sqlite_database_is_retried_until_the_writer_lets_go(tmp_path) -> None:
    db = tmp_path / "store.db"
    setup = sqlite3.connect(db)
    setup.execute("create table t (x int)")
    setup.commit()
    holder = sqlite3.connect(db, check_same_thread=False)
    holder.execute("begin exclusive")
    holder.execute("insert into t values (1)")

    def write() -> int:
        with sqlite3.connect(db, timeout=0) as conn:
            conn.execute("insert into t values (2)")
        return 2

    with pytest.raises(sqlite3.OperationalError, match="database is locked") as caught:
        write()  # what a job without the retry meets: the write is lost
    assert is_locked_error(caught.value)
    release = threading.Timer(0.4, holder.commit)
    release.start()
    t0 = time.monotonic()
    assert retry_locked(write, budget_s=30) == 2
    assert time.monotonic() - t0 >= 0.3  # it waited for the holder, then wrote
    release.join()
    assert sorted(r[0] for r in setup.execute("select x from t")) == [1, 2]


def test_only_locked_errors_are_retried_and_only_within_the_budget() -> None:
    calls = []

    def fails(exc: Exception):
        def fn():
            calls.append(1)
            raise exc

        return fn

    with pytest.raises(ValueError):
        retry_locked(fails(ValueError("bad param")), budget_s=10, sleep=lambda s: None)
    assert len(calls) == 1
    calls.clear()
    wrapped = RuntimeError("log_batch failed")
    wrapped.__cause__ = sqlite3.OperationalError("database is locked")
    waited = []
    with pytest.raises(RuntimeError):
        retry_locked(fails(wrapped), budget_s=0.5, sleep=waited.append)
    assert len(calls) > 1 and waited  # retried (a wrapped lock error counts) until the budget


def test_a_lost_insert_race_is_written_again_a_bounded_number_of_times() -> None:
    """Two jobs creating the same tag at once: the loser's insert fails with "UNIQUE
    constraint failed" (what CI met); written again it finds the row and updates it."""
    db = sqlite3.connect(":memory:")
    db.execute("create table tags (key text primary key, value text)")
    state = {"seen": False}

    def upsert() -> str:  # MLflow's tag write: look, then insert or update
        exists = db.execute("select 1 from tags where key = 'view'").fetchone() or state["seen"]
        if not exists:
            state["seen"] = True
            db.execute("insert into tags values ('view', 'other job')")  # the other job wins
            db.execute("insert into tags values ('view', 'mine')")  # raises IntegrityError
        db.execute("update tags set value = 'mine' where key = 'view'")
        return "written"

    with pytest.raises(sqlite3.IntegrityError) as caught:
        upsert()
    assert is_insert_race(caught.value) and not is_locked_error(caught.value)
    db.execute("delete from tags")
    state["seen"] = False
    assert retry_locked(upsert, budget_s=0, sleep=lambda s: None) == "written"
    assert db.execute("select value from tags").fetchall() == [("mine",)]

    calls = []

    def always() -> None:
        calls.append(1)
        raise sqlite3.IntegrityError("UNIQUE constraint failed: experiment_tags.key")

    with pytest.raises(sqlite3.IntegrityError):
        retry_locked(always, budget_s=10, sleep=lambda s: None)
    assert len(calls) == RACE_RETRIES + 1  # a real duplicate is not retried for the budget


def test_parallel_jobs_merge_their_columns_into_the_shared_view(mlflow_store, monkeypatch) -> None:
    """Two jobs finishing together, each reading the view before the other wrote it: without
    the view lock the second write drops the first job's columns (a lost update)."""
    from mlflow.tracking import MlflowClient

    from craterlab.tracking.view import LATEST_VIEW, VIEW_TAG

    store = {k: v for k, v in mlflow_store.items() if k != "name"}
    read = MlflowClient.get_experiment

    def slow_read(self, experiment_id):  # hold the read open while the other job reads too
        found = read(self, experiment_id)
        time.sleep(0.5)
        return found

    trackers = [MlflowTracker(**store) for _ in range(2)]
    for i, tracker in enumerate(trackers):
        tracker.start({"job": str(i)})
        tracker.log_metrics({f"mode{i}/mAP": 0.5})
    monkeypatch.setattr(MlflowClient, "get_experiment", slow_read)
    jobs = [threading.Thread(target=t.finish) for t in trackers]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert [t.not_logged for t in trackers] == [[], []]
    client = MlflowClient(store["uri"])
    experiment = client.get_experiment_by_name(store["experiment"])
    shown = json.loads(experiment.tags[VIEW_TAG + LATEST_VIEW])["selectedColumns"]
    assert {"metrics.`mode0/mAP`", "metrics.`mode1/mAP`"} <= set(shown)
