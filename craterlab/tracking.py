"""Experiment tracking: one MLflow run per Hydra job, grouped under a parent run per sweep.

Tracking never sinks a run: if the store is unreachable or refuses something, the run goes on,
and the summary at the end says exactly what was not logged and why.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("craterlab")

PARENT_RUN_ENV = "CRATERLAB_PARENT_RUN_ID"
DEFAULT_STORE = Path("outputs") / "mlflow.db"
DEFAULT_ARTIFACTS = Path("outputs") / "mlartifacts"
MAX_PARAM_LENGTH = 500  # MLflow 3 accepts 6,000; shorter keeps the UI's tables readable


def default_uri() -> str:
    """The embedded SQLite store under outputs/ (an absolute path, so cwd doesn't matter)."""
    return f"sqlite:///{DEFAULT_STORE.resolve()}"


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"aggregator.k": "32", ...}; long values are shortened, not dropped."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            text = str(value)
            if len(text) > MAX_PARAM_LENGTH:
                suffix = f"...(+{len(text) - MAX_PARAM_LENGTH + 12})"
                text = text[: MAX_PARAM_LENGTH - len(suffix)] + suffix
            flat[name] = text
    return flat


def metric_name(name: str) -> str:
    """A metric name MLflow accepts: 'R@10' -> 'R_at_10' (MLflow forbids '@')."""
    return re.sub(r"[^\w./\- :]", "_", name.replace("@", "_at_"))


class Tracker:
    """Logs one run; every call is guarded so tracking trouble is reported, never fatal."""

    def __init__(self, tracking: Mapping[str, Any] | None) -> None:
        tracking = dict(tracking or {})
        self.enabled = tracking.get("name", "none") != "none"
        self.uri = tracking.get("uri") or default_uri()
        self.experiment = tracking.get("experiment", "craterlab")
        self.artifact_location = tracking.get("artifact_location") or str(
            DEFAULT_ARTIFACTS.resolve()
        )
        self.timeout_s = int(tracking.get("timeout_s", 10))
        self.run_name = tracking.get("run_name")
        self.not_logged: list[str] = []
        self.run_id: str | None = None
        self._client: Any = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, tags: Mapping[str, str]) -> None:
        if not self.enabled:
            return
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(self.timeout_s))
        try:
            client, experiment_id = connect(self.uri, self.experiment, self.artifact_location)
            run_tags = dict(tags)
            parent = os.environ.get(PARENT_RUN_ENV)
            if parent:
                run_tags["mlflow.parentRunId"] = parent
            run = client.create_run(experiment_id, tags=run_tags, run_name=self.run_name)
        except Exception as exc:  # tracking must not sink the run
            self._fail("the whole run (could not start an MLflow run)", exc)
            return
        self._client = client
        self.run_id = run.info.run_id
        log.info("MLflow run %s in %s (experiment %r)", self.run_id, self.uri, self.experiment)

    def finish(self, status: str = "FINISHED") -> None:
        if self._client is not None:
            self._guard("the run status", self._client.set_terminated, self.run_id, status)
        if self.not_logged:
            log.warning(
                "Tracking: not logged to %s: %s. Check that the tracking store is reachable "
                "(tracking.uri=...), or turn tracking off with tracking=none.",
                self.uri,
                "; ".join(self.not_logged),
            )

    # -- logging ----------------------------------------------------------------------------

    def log_params(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
            self._guard("params", self._log_batch, params=params[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [
            Metric(metric_name(k), float(v), now, step)
            for k, v in metrics.items()
            if v is not None and v == v  # skip NaN
        ]
        for i in range(0, len(entries), 1000):
            self._guard("metrics", self._log_batch, metrics=entries[i : i + 1000])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self._guard("tags", self._log_batch, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._client is not None:
            self._guard(
                f"artifact {Path(path).name}",
                self._client.log_artifact,
                self.run_id,
                str(path),
                artifact_path,
            )

    # -- internals --------------------------------------------------------------------------

    def _log_batch(self, **kwargs: Any) -> None:
        self._client.log_batch(self.run_id, **kwargs)

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self._client is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            self._fail(what, exc)

    def _fail(self, what: str, exc: BaseException) -> None:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self.not_logged.append(f"{what} ({reason[:200]})")


def connect(uri: str, experiment: str, artifact_location: str) -> tuple[Any, str]:
    """An MLflow client on ``uri`` and the id of ``experiment`` (created if missing)."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return client, found.experiment_id
    location = artifact_location
    if "://" not in location:
        Path(location).mkdir(parents=True, exist_ok=True)
        location = Path(location).resolve().as_uri()
    return client, client.create_experiment(experiment, artifact_location=location)


@contextmanager
def tracked_run(tracking: Mapping[str, Any] | None, tags: Mapping[str, str]) -> Iterator[Tracker]:
    """A started tracker, finished with FAILED if the body raises."""
    tracker = Tracker(tracking)
    tracker.start(tags)
    try:
        yield tracker
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")


class SweepCallback(Callback):
    """Hydra callback: a multirun gets one MLflow parent run; each job becomes its child."""

    def __init__(self) -> None:
        self.client: Any = None
        self.parent_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracking = OmegaConf.to_container(config.get("tracking"), resolve=True) or {}
        tracker = Tracker(tracking)  # type: ignore[arg-type]
        if not tracker.enabled:
            return
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(tracker.timeout_s))
        try:
            self.client, experiment_id = connect(
                tracker.uri, tracker.experiment, tracker.artifact_location
            )
            sweep_dir = str(config.hydra.sweep.dir)
            run = self.client.create_run(
                experiment_id,
                tags={"craterlab.sweep": sweep_dir, "craterlab.role": "sweep"},
                run_name=f"sweep {Path(sweep_dir).parent.name}/{Path(sweep_dir).name}",
            )
        except Exception as exc:
            log.warning("Tracking: could not create the sweep's parent run (%s)", exc)
            self.client = None
            return
        self.parent_id = run.info.run_id
        os.environ[PARENT_RUN_ENV] = self.parent_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.client is not None and self.parent_id is not None:
            try:
                self.client.set_terminated(self.parent_id, "FINISHED")
            except Exception as exc:
                log.warning("Tracking: could not close the sweep's parent run (%s)", exc)
        os.environ.pop(PARENT_RUN_ENV, None)
