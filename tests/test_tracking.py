"""Tracking: the tracker plugin kind, what an MLflow run records, hooks logging through it."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from craterlab.errors import ConfigError, UnknownComponentError
from craterlab.hookspecs import hookimpl
from craterlab.plugins import get_registry, make_manager
from craterlab.results import flatten_config as flatten
from craterlab.results import metric_name
from craterlab.tracking import Tracker, make_tracker, tracked_run
from craterlab.tracking.mlflow import MlflowTracker


def test_flatten_nests_and_shortens_long_values() -> None:
    flat = flatten({"a": {"b": 1, "c": {"d": "x"}}, "long": "y" * 2000})
    assert flat["a.b"] == "1" and flat["a.c.d"] == "x"
    assert len(flat["long"]) == 500 and flat["long"].endswith("...(+1512)")


def test_metric_names_are_mlflow_safe() -> None:
    assert metric_name("two_stage/R@10") == "two_stage/R_at_10"
    assert metric_name("single/mAP") == "single/mAP"


def test_trackers_are_a_registry_kind() -> None:
    registry = get_registry()
    assert {"mlflow", "none"} <= set(registry.names("tracking"))
    assert isinstance(make_tracker({"name": "mlflow", "timeout_s": 3}), MlflowTracker)
    assert type(make_tracker({"name": "none"})) is Tracker
    assert type(make_tracker(None)) is Tracker
    with pytest.raises(UnknownComponentError, match="Unknown tracking 'mlflw'.*'mlflow'"):
        make_tracker({"name": "mlflw"})
    with pytest.raises(ConfigError, match="no config key 'urii'.*'uri'"):
        make_tracker({"name": "mlflow", "urii": "x"})
    with pytest.raises(ConfigError, match="timeout_s must be positive"):
        make_tracker({"name": "mlflow", "timeout_s": 0})


def test_run_records_params_metrics_tags_and_artifacts(mlflow_store, tmp_path) -> None:
    artifact = tmp_path / "resolved_config.yaml"
    artifact.write_text("k: 8\n")
    config = {"k": 8, "aggregator": {"name": "instance", "k": 8}, "note": "z" * 10_000}
    with tracked_run(mlflow_store, {"craterlab.backbone": "dino_s16"}) as tracker:
        tracker.log_params(config)
        tracker.log_metrics({"single/R@1": 0.5, "single/mAP": 0.25})
        tracker.set_tags({"craterlab.weights": "random (requested)"})
        tracker.log_artifact(artifact)
    assert tracker.not_logged == []
    assert tracker.summary() == f"MLflow run {tracker.run_id} ({mlflow_store['uri']})"
    run = MlflowClient(mlflow_store["uri"]).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["aggregator.k"] == "8"
    assert run.data.params["note"].startswith("zzz")
    assert run.data.metrics == {"single/R_at_1": 0.5, "single/mAP": 0.25}
    assert run.data.tags["craterlab.weights"] == "random (requested)"
    assert run.data.tags["craterlab.backbone"] == "dino_s16"
    names = [a.path for a in MlflowClient(mlflow_store["uri"]).list_artifacts(tracker.run_id)]
    assert names == ["resolved_config.yaml"]


def test_nan_metrics_are_logged_not_dropped(mlflow_store) -> None:
    with tracked_run(mlflow_store, {}) as tracker:
        tracker.log_metrics({"single/mAP": float("nan"), "single/R@1": 0.5, "none": None})
    metrics = MlflowClient(mlflow_store["uri"]).get_run(tracker.run_id).data.metrics
    assert math.isnan(metrics["single/mAP"]) and metrics["single/R_at_1"] == 0.5
    assert tracker.not_logged == ["metrics without a value (none)"]


def test_failed_body_marks_run_failed_and_interruption_killed(mlflow_store) -> None:
    with pytest.raises(RuntimeError), tracked_run(mlflow_store, {}) as tracker:
        raise RuntimeError("boom")
    assert MlflowClient(mlflow_store["uri"]).get_run(tracker.run_id).info.status == "FAILED"
    with pytest.raises(KeyboardInterrupt), tracked_run(mlflow_store, {}) as tracker:
        raise KeyboardInterrupt
    assert MlflowClient(mlflow_store["uri"]).get_run(tracker.run_id).info.status == "KILLED"


def test_unreachable_server_is_reported_not_fatal(monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    tracking = {"name": "mlflow", "uri": "http://127.0.0.1:9", "timeout_s": 2}
    with tracked_run(tracking, {}) as tracker:
        tracker.log_params({"k": 1})
        tracker.log_metrics({"mAP": 0.1})
    assert tracker.run_id is None
    assert tracker.not_logged and "could not start an MLflow run" in tracker.not_logged[0]
    assert tracker.summary().startswith("Tracking: not logged: the whole run")


def test_tracking_none_logs_nothing() -> None:
    with tracked_run({"name": "none", "run_name": "x"}, {}) as tracker:
        tracker.log_metrics({"mAP": 1.0})
    assert tracker.run_id is None and tracker.not_logged == [] and tracker.summary() == ""


def test_observer_hooks_log_through_the_active_tracker(mlflow_store, tmp_path) -> None:
    class Observer:
        @hookimpl
        def run_started(self, config, tracker):
            tracker.set_tags({"observer.k": str(config["k"])})

        @hookimpl
        def run_finished(self, results, run_dir, tracker):
            path = tmp_path / "summary.txt"
            path.write_text(str(results))
            tracker.log_metrics({"observer/best_mAP": max(m["mAP"] for m in results.values())})
            tracker.log_artifact(path)

    pm = make_manager(load_entry_points=False)
    pm.register(Observer())
    results = {"single": {"mAP": 0.25}, "two_stage": {"mAP": 0.5}}
    with tracked_run(mlflow_store, {}) as tracker:
        pm.hook.run_started(config={"k": 8}, run_dir="d", tracker=tracker)
        pm.hook.run_finished(config={"k": 8}, run_dir="d", results=results, tracker=tracker)
    client = MlflowClient(mlflow_store["uri"])
    run = client.get_run(tracker.run_id)
    assert run.data.metrics["observer/best_mAP"] == 0.5 and run.data.tags["observer.k"] == "8"
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["summary.txt"]


def test_a_plugin_tracker_is_selected_by_name(tmp_path) -> None:
    class ListTracker(Tracker):
        """Keeps everything in memory."""

        def __init__(self, prefix: str = "") -> None:
            super().__init__()
            self.prefix, self.events = prefix, []

        def start(self, tags, run_name=None, parent=None):
            self.run_id = "r1"
            self.events.append(("start", run_name, parent))

        def log_metrics(self, metrics, step=0):
            self.events.append(("metrics", {self.prefix + k: v for k, v in metrics.items()}))

        def finish(self, status="FINISHED"):
            self.events.append(("finish", status))

    class Plugin:
        @hookimpl
        def register_trackers(self, register):
            register("memory", ListTracker)

    from craterlab.plugins import fill_registry

    pm = make_manager(load_entry_points=False)
    pm.register(Plugin(), name="memory-plugin")
    tracker = fill_registry(pm).build("tracking", {"name": "memory", "prefix": "p/"})
    with tracked_run(tracker, {}):
        tracker.log_metrics({"mAP": 0.5})
    assert tracker.events == [
        ("start", None, None),
        ("metrics", {"p/mAP": 0.5}),
        ("finish", "FINISHED"),
    ]
