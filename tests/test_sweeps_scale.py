"""Sweeps past one job at a time, end to end in subprocesses (slow: ``make test-slow``).

- joblib runs 3 jobs at once on a cold cache: the backbone runs once, every job is a FINISHED
  child of the sweep's run, and the sweep prints ``job i/N`` and writes summary.csv;
- a 6-job sweep killed (SIGKILL) after its first job, then relaunched (2 joblib workers):
  every job has exactly one FINISHED run, the relaunch skips the finished ones and says so;
- two extraction shards as two joblib jobs: merged into the entry a run then reads;
- submitit's local executor (what Slurm runs, on one machine): one process per job;
- four processes logging to one SQLite store at once: no run or metric is lost.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY
from mlflow.tracking import MlflowClient

pytest.importorskip("hydra_plugins.hydra_joblib_launcher")

pytestmark = pytest.mark.slow


def craterlab(tmp_path: Path, *args: str, sweep: str = "sweep", wait: bool = True):
    env = dict(os.environ, HF_HUB_OFFLINE="1", CRATERLAB_CACHE=str(tmp_path / "cache"))
    argv = [
        sys.executable,
        "-m",
        "craterlab",
        "-m",
        *TINY,
        "retrieval=two_stage",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_location={tmp_path / 'artifacts'}",
        f"hydra.sweep.dir={tmp_path / sweep}",
        *args,
    ]
    if not wait:
        return subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL)
    result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def job_runs(tmp_path: Path) -> list:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("craterlab")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("craterlab.role") != "sweep"]


def test_parallel_jobs_share_one_extraction_and_one_store(tmp_path) -> None:
    out = craterlab(tmp_path, "k=4,8,16", "hydra/launcher=joblib", "hydra.launcher.n_jobs=3")
    runs = job_runs(tmp_path)
    assert sorted(r.data.params["k"] for r in runs) == ["16", "4", "8"]
    assert all(r.info.status == "FINISHED" and "two_stage/mAP" in r.data.metrics for r in runs)
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1
    hits = sorted(r.data.metrics["time/encode_gallery_cache_hit"] for r in runs)
    assert hits == [0.0, 1.0, 1.0]  # three jobs at once, one extraction
    assert "Sweep: 3 jobs" in out and "3/3 done" in out
    with open(tmp_path / "sweep" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["k"] for r in rows) == ["16", "4", "8"]
    assert {r["status"] for r in rows} == {"finished"}
    by_k = {r.data.params["k"]: r.data.metrics["two_stage/mAP"] for r in runs}
    assert {r["k"]: float(r["two_stage/mAP"]) for r in rows} == pytest.approx(by_k)


def test_a_killed_sweep_relaunched_loses_nothing_and_repeats_nothing(tmp_path) -> None:
    sweep = ("k=4,8,16", "quantizer=fp32,int8")
    proc = craterlab(tmp_path, *sweep, sweep="first", wait=False)
    first_job = tmp_path / "first" / ".craterlab" / "jobs" / "0.json"
    deadline = time.monotonic() + 600
    while not first_job.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first_job.exists(), "the first job never finished"
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup: the running job's run stays RUNNING
    proc.wait()
    before = [r for r in job_runs(tmp_path) if r.info.status == "FINISHED"]
    assert 1 <= len(before) < 6

    out = craterlab(tmp_path, *sweep, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert f"Resume: skipped {len(before)} of 6 jobs" in out
    runs = job_runs(tmp_path)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    identities = [r.data.tags["craterlab.config_hash"] for r in finished]
    assert len(identities) == 6 and len(set(identities)) == 6  # every job once, none twice
    combos = {(r.data.params["k"], r.data.params["quantizer.name"]) for r in finished}
    assert combos == {(k, q) for k in ("4", "8", "16") for q in ("fp32", "int8")}
    assert not [r for r in runs if r.info.status == "RUNNING"]  # the killed one is KILLED
    # resume=false reruns every job
    craterlab(tmp_path, "k=4", "quantizer=fp32", "resume=false", sweep="again")
    assert len([r for r in job_runs(tmp_path) if r.info.status == "FINISHED"]) == 7


def test_two_extraction_shards_as_two_jobs_merge_into_one_entry(tmp_path) -> None:
    from craterlab.cache import cache_info

    out = craterlab(
        tmp_path,
        "extract.num_shards=2",
        "extract.shard=0,1",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        sweep="shards",
    )
    assert "all shards merged" in out
    entries = cache_info(tmp_path / "cache")
    assert sorted(e.split for e in entries) == ["gallery", "query"]  # the parts are gone
    assert all(e.status == "complete" for e in entries)
    assert not job_runs(tmp_path)  # shard jobs only extract
    craterlab(tmp_path, "k=8", sweep="after")
    (run,) = job_runs(tmp_path)
    assert run.data.metrics["time/encode_gallery_cache_hit"] == 1.0


def test_submitit_local_runs_each_job_in_its_own_process(tmp_path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = craterlab(tmp_path, "k=4,8", "hydra/launcher=submitit_local", sweep="submitit")
    runs = job_runs(tmp_path)
    assert sorted(r.data.params["k"] for r in runs) == ["4", "8"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["craterlab.pid"] for r in runs}) == 2  # two processes
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1
    assert "Sweep done: 2/2 jobs ended (2 finished)" in out
    assert (tmp_path / "submitit" / "summary.csv").is_file()


def log_many(uri: str, artifacts: str, worker: int, runs: int, queue) -> None:
    from craterlab.tracking.mlflow import MlflowTracker

    lost = []
    for i in range(runs):
        tracker = MlflowTracker(uri=uri, artifact_location=artifacts, timeout_s=60)
        tracker.start({"worker": str(worker), "i": str(i)})
        tracker.log_params({"k": i, "worker": worker})
        for step in range(5):
            tracker.log_metrics({f"m{j}": float(step + j) for j in range(50)}, step=step)
        tracker.finish("FINISHED")
        lost += tracker.not_logged
    queue.put(lost)


def test_four_writers_on_one_sqlite_store_lose_nothing(tmp_path) -> None:
    from craterlab.tracking.mlflow import MlflowTracker

    uri, artifacts = f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts")
    seed = MlflowTracker(uri=uri, artifact_location=artifacts)
    seed.start({"worker": "setup"})  # create the store (schema) before the writers race
    seed.finish()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=log_many, args=(uri, artifacts, w, 5, queue)) for w in range(4)]
    for p in procs:
        p.start()
    lost = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    assert lost == [[], [], [], []]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("craterlab")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "i" in r.data.tags]
    assert len(runs) == 20 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        history = client.get_metric_history(r.info.run_id, "m49")
        assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_joblib_workers_exit_when_the_launcher_is_killed(tmp_path) -> None:
    """Hydra's real joblib launcher, two jobs running in two loky workers: ``kill -9`` of the
    launcher and every worker exits within seconds (the launcher watchdog), never orphaned."""
    import threading

    from craterlab.sweeps.orphans import alive

    env = dict(os.environ, HF_HUB_OFFLINE="1", CRATERLAB_CACHE=str(tmp_path / "cache"))
    env.pop("CRATERLAB_LAUNCHER_PID", None)
    argv = [sys.executable, "-m", "craterlab", "-m", *TINY, "k=4,8", "tracking=none"]
    argv += [f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra/launcher=joblib"]
    argv += ["hydra.launcher.n_jobs=2"]
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()  # type: ignore[arg-type]
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if sum(line.startswith("[sweep] job") and ":" in line for line in lines) >= 2:
                break  # both jobs started: each worker's watchdog runs (on_job_start)
            time.sleep(0.2)
        assert proc.poll() is None, "".join(lines)[-3000:]
        workers = children_of(proc.pid)
        assert len(workers) >= 2, f"expected the loky workers as children: {workers}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < 15 and any(alive(w) for w in workers):
            time.sleep(0.2)
        left = [w for w in workers if alive(w)]
        assert not left, f"workers {left} outlived their killed launcher"
        print(f"{len(workers)} workers gone {time.monotonic() - killed_at:.1f} s after the kill")
        assert not (tmp_path / "sweep" / "0" / "results.json").exists()  # killed mid-job
    finally:
        for w in workers:
            if alive(w):
                os.kill(w, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
