"""MLflow tracking: what a run records, long values, unreachable stores."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from craterlab.tracking import Tracker, flatten, metric_name, tracked_run


def test_flatten_nests_and_shortens_long_values() -> None:
    flat = flatten({"a": {"b": 1, "c": {"d": "x"}}, "long": "y" * 2000})
    assert flat["a.b"] == "1" and flat["a.c.d"] == "x"
    assert len(flat["long"]) == 500 and flat["long"].endswith("...(+1512)")


def test_metric_names_are_mlflow_safe() -> None:
    assert metric_name("two_stage/R@10") == "two_stage/R_at_10"
    assert metric_name("single/mAP") == "single/mAP"


@pytest.fixture
def store(tmp_path):
    return {
        "name": "mlflow",
        "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "experiment": "test",
        "artifact_location": str(tmp_path / "artifacts"),
    }


def test_run_records_params_metrics_tags_and_artifacts(store, tmp_path) -> None:
    artifact = tmp_path / "resolved_config.yaml"
    artifact.write_text("k: 8\n")
    config = {"k": 8, "aggregator": {"name": "instance", "k": 8}, "note": "z" * 10_000}
    with tracked_run(store, {"craterlab.backbone": "dino_s16"}) as tracker:
        tracker.log_params(config)
        tracker.log_metrics({"single/R@1": 0.5, "single/mAP": 0.25, "nan": float("nan")})
        tracker.set_tags({"craterlab.weights": "random (requested)"})
        tracker.log_artifact(artifact)
    assert tracker.not_logged == []
    run = MlflowClient(store["uri"]).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["aggregator.k"] == "8"
    assert run.data.params["note"].startswith("zzz")
    assert run.data.metrics == {"single/R_at_1": 0.5, "single/mAP": 0.25}
    assert run.data.tags["craterlab.weights"] == "random (requested)"
    assert run.data.tags["craterlab.backbone"] == "dino_s16"
    names = [a.path for a in MlflowClient(store["uri"]).list_artifacts(tracker.run_id)]
    assert names == ["resolved_config.yaml"]


def test_failed_body_marks_run_failed(store) -> None:
    with pytest.raises(RuntimeError), tracked_run(store, {}) as tracker:
        raise RuntimeError("boom")
    assert MlflowClient(store["uri"]).get_run(tracker.run_id).info.status == "FAILED"


def test_unreachable_server_is_reported_not_fatal(monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    tracking = {"name": "mlflow", "uri": "http://127.0.0.1:9", "timeout_s": 2}
    start = time.monotonic()
    with tracked_run(tracking, {}) as tracker:
        tracker.log_params({"k": 1})
        tracker.log_metrics({"mAP": 0.1})
    assert time.monotonic() - start < 30  # fails fast instead of retrying for minutes
    assert tracker.run_id is None
    assert tracker.not_logged and "could not start an MLflow run" in tracker.not_logged[0]


def test_tracking_none_logs_nothing() -> None:
    tracker = Tracker({"name": "none"})
    tracker.start({})
    tracker.log_metrics({"mAP": 1.0})
    tracker.finish()
    assert tracker.run_id is None and tracker.not_logged == []
