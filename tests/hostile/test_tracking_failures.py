"""Hostile tracking: runs left RUNNING by killed or interrupted jobs, stores that can't be
written or don't answer. Tracking never sinks a run, and never hangs it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
from mlflow.tracking import MlflowClient

import craterlab.tracking.mlflow as mlflow_tracker
from craterlab.tracking import tracked_run
from craterlab.tracking.mlflow import END_TAG, HOST_TAG, PID_TAG, MlflowTracker


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_start_marks_runs_of_dead_processes_killed(mlflow_store) -> None:
    with tracked_run(mlflow_store, {}):  # creates the experiment
        pass
    client = MlflowClient(mlflow_store["uri"])
    experiment = client.get_experiment_by_name("test").experiment_id
    host = socket.gethostname()

    def running(tags: dict[str, str]) -> str:
        return client.create_run(experiment, tags=tags).info.run_id

    orphan = running({PID_TAG: str(dead_pid()), HOST_TAG: host})
    alive = running({PID_TAG: str(os.getppid()), HOST_TAG: host})
    elsewhere = running({PID_TAG: str(dead_pid()), HOST_TAG: "another-host"})
    untagged = running({})
    with tracked_run(mlflow_store, {}) as tracker:
        pass
    status = {r: client.get_run(r).info.status for r in (orphan, alive, elsewhere, untagged)}
    assert status == {
        orphan: "KILLED",
        alive: "RUNNING",
        elsewhere: "RUNNING",
        untagged: "RUNNING",
    }
    assert "ended without closing the run" in client.get_run(orphan).data.tags[END_TAG]
    assert client.get_run(tracker.run_id).data.tags[PID_TAG] == str(os.getpid())


def run_script(code: str, tmp_path) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ, CRATERLAB_LOAD_PLUGINS="0")
    env.pop("CRATERLAB_PARENT_RUN_ID", None)
    return subprocess.run(  # cwd: whatever the script writes stays in the test's folder
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300,
        cwd=tmp_path,
    )  # fmt: skip


def test_sigterm_closes_the_run_killed(mlflow_store, tmp_path) -> None:
    result = run_script(
        f"""
        import os, signal, time
        from craterlab.tracking import tracked_run
        with tracked_run({mlflow_store!r}, {{"role": "job"}}) as tracker:
            print(tracker.run_id, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)
        """,
        tmp_path,
    )
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    run_id = result.stdout.split()[0]
    assert MlflowClient(mlflow_store["uri"]).get_run(run_id).info.status == "KILLED"


def test_interrupted_sweep_closes_parent_and_child_killed(mlflow_store, tmp_path) -> None:
    result = run_script(
        f"""
        import os
        from omegaconf import OmegaConf
        from craterlab.sweeps.callback import SweepCallback
        from craterlab.tracking import tracked_run
        sweep = {{"sweep": {{"dir": "s/1"}}}}
        config = OmegaConf.create({{"tracking": {mlflow_store!r}, "hydra": sweep}})
        SweepCallback().on_multirun_start(config)
        print(os.environ["CRATERLAB_PARENT_RUN_ID"], flush=True)
        with tracked_run({mlflow_store!r}, {{}}) as tracker:
            print(tracker.run_id, flush=True)
            raise KeyboardInterrupt
        """,
        tmp_path,
    )
    assert result.returncode != 0 and "KeyboardInterrupt" in result.stderr
    parent, child = re.findall(r"^[0-9a-f]{32}$", result.stdout, re.MULTILINE)[:2]  # run ids
    client = MlflowClient(mlflow_store["uri"])
    assert client.get_run(parent).info.status == "KILLED"
    assert client.get_run(child).info.status == "KILLED"
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent


def test_store_in_a_folder_that_cannot_exist_fails_at_start(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    tracking = {"name": "mlflow", "uri": f"sqlite:///{blocker / 'mlflow.db'}", "timeout_s": 5}
    with tracked_run(tracking, {}) as tracker:
        tracker.log_metrics({"mAP": 0.5})
    assert tracker.run_id is None
    assert "could not start an MLflow run" in tracker.not_logged[0]
    assert f"the MLflow store {blocker} is not writable" in tracker.not_logged[0]
    assert "tracking=none" in tracker.summary()


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions don't stop root")
def test_read_only_store_folder_fails_at_start(tmp_path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        tracking = {"name": "mlflow", "uri": f"sqlite:///{folder / 'mlflow.db'}"}
        with tracked_run({**tracking, "artifact_location": str(tmp_path / "a")}, {}) as tracker:
            pass
    finally:
        folder.chmod(0o755)
    assert f"the MLflow store {folder} is not writable" in tracker.not_logged[0]


def test_a_store_that_does_not_answer_costs_one_timeout(mlflow_store, monkeypatch) -> None:
    release = threading.Event()
    answered = []

    def stalled_connect(*args, **kwargs):
        release.wait(120)
        answered.append(True)
        raise RuntimeError("too late")

    with tracked_run(mlflow_store, {}):  # the store exists (a new one gets longer, for migrations)
        pass
    monkeypatch.setattr(mlflow_tracker, "connect", stalled_connect)
    uri, artifacts = mlflow_store["uri"], mlflow_store["artifact_location"]
    tracker = MlflowTracker(uri=uri, artifact_location=artifacts)
    tracker.timeout_s = 0.5
    try:
        with tracked_run(tracker, {}):
            tracker.log_metrics({"mAP": 0.5})
        assert answered == []  # start gave up while the store was still stalled
        assert tracker.not_logged == [
            "the whole run (could not start an MLflow run) "
            "(the tracking store did not answer within 0.5 s (starting a run))"
        ]
    finally:
        release.set()
