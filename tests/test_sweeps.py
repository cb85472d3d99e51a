"""A Hydra multirun in a subprocess: one MLflow run per job, grouped under a sweep run.

Slow (four runs in a fresh interpreter): ``make test-slow``, CI's second step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import TINY
from mlflow.tracking import MlflowClient


@pytest.mark.slow
def test_multirun_logs_one_child_run_per_job(tmp_path) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", CRATERLAB_CACHE=str(tmp_path / "cache"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "craterlab",
            "-m",
            *TINY,
            "aggregator=instance,none",
            "k=4,8",
            "retrieval=two_stage",
            f"tracking.uri={store}",
            f"tracking.artifact_location={tmp_path / 'artifacts'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("craterlab")
    runs = client.search_runs(experiment.experiment_id)
    (parent,) = [r for r in runs if r.data.tags.get("craterlab.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    combos = {(r.data.params["aggregator.name"], r.data.params["k"]) for r in children}
    assert combos == {("instance", "4"), ("instance", "8"), ("none", "4"), ("none", "8")}
    assert all(r.info.status == "FINISHED" for r in children)
    for r in children:  # each child is named by its job's overrides
        overrides = r.info.run_name.split(",")
        assert f"aggregator={r.data.params['aggregator.name']}" in overrides
        assert f"k={r.data.params['k']}" in overrides
    assert all("two_stage/mAP" in r.data.metrics for r in children)
    # the backbone ran once: every job after the first read the feature cache
    hits = sorted(r.data.metrics["time/encode_gallery_cache_hit"] for r in children)
    assert hits == [0.0, 1.0, 1.0, 1.0]
