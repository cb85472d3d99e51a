"""Experiment tracking: where a run is logged from.

Tracking is a plugin kind like the others. A tracker implements :class:`Tracker` (``start``,
``log_params``, ``log_metrics``, ``log_artifact``, ``set_tags``, ``finish``) and is registered
through the ``register_trackers`` hook; the ``tracking`` config group picks one
(``tracking=mlflow``, the default, or ``tracking=none``). :func:`tracked_run` is the one place a
run is started, or joined to its sweep's parent run; observer hooks (``run_started``,
``run_finished``) receive the active tracker and can log metrics and artifacts through it.

Tracking never sinks a run: a tracker records what it could not log in ``not_logged`` instead
of raising, and the summary at the end of the run says what was not logged and why.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from craterlab.hookspecs import hookimpl

log = logging.getLogger("craterlab")

PARENT_RUN_ENV = "CRATERLAB_PARENT_RUN_ID"
MAX_PARAM_LENGTH = 500  # MLflow 3 accepts 6,000; shorter keeps the UI's tables readable


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
    """The tracker interface, and the tracker that logs nothing (``tracking=none``).

    Implementations override the methods; none of them may raise on tracking trouble: append
    ``"what (why)"`` to ``not_logged`` instead. ``start`` receives ``parent``, the run id of the
    sweep this run belongs to (None outside a sweep), and sets ``run_id`` when a run exists.
    """

    name = "none"

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.not_logged: list[str] = []

    def start(
        self, tags: Mapping[str, str], run_name: str | None = None, parent: str | None = None
    ) -> None:
        """Open a run (a child of ``parent`` when given) tagged with ``tags``."""

    def log_params(self, config: Mapping[str, Any]) -> None:
        """Record a (nested) config as parameters."""

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Record metrics; NaN values are recorded as NaN, never dropped."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Attach a file to the run."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set tags on the run."""

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run with ``status`` (FINISHED, FAILED or KILLED)."""

    def find_finished(self, tags: Mapping[str, str]) -> Any:
        """The newest FINISHED run of this tracker's experiment carrying all ``tags``, as a
        :class:`craterlab.sweeps.resume.FinishedRun`; None when there is none (or the tracker
        can't look runs up: then resuming a sweep reruns every job)."""
        return None

    def summary(self) -> str:
        """One line for the end of the run: where it was logged, or what was not."""
        if self.not_logged:
            return f"Tracking: not logged: {'; '.join(self.not_logged)}"
        return ""


def no_tracking() -> Tracker:
    """No tracking: results are printed and written to the run directory only."""
    return Tracker()


@hookimpl
def register_trackers(register: Any) -> None:
    from craterlab.mlflow_tracker import MlflowTracker

    register("none", no_tracking)
    register("mlflow", MlflowTracker, description="MLflow runs, grouped under a run per sweep")


def plan_command(argv: list[str]) -> int:
    """``plan --bytes-per-image B --ms-per-query T``: Pareto front of measured runs and the
    best configuration within the budget (:mod:`craterlab.sweeps.plan`)."""
    from craterlab.sweeps.plan import main

    return main(argv)


@hookimpl
def register_commands(register: Any) -> None:
    register("plan", plan_command, "Pareto front of tracked runs; best config within a budget")


def make_tracker(tracking: Mapping[str, Any] | None) -> Tracker:
    """The tracker a ``tracking`` config selects, built through the registry."""
    from craterlab.plugins import get_registry

    config = dict(tracking or {"name": "none"})
    config.pop("run_name", None)  # chosen per run (tracked_run), not a tracker setting
    return get_registry().build("tracking", config)


def end_status(exc: BaseException) -> str:
    """KILLED for an interruption (Ctrl-C, SIGTERM), FAILED for an error."""
    return "KILLED" if isinstance(exc, KeyboardInterrupt | SystemExit) else "FAILED"


@contextmanager
def terminate_as_exit() -> Iterator[None]:
    """While the body runs, SIGTERM raises SystemExit, so an open run is closed as KILLED."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def tracked_run(
    tracking: Mapping[str, Any] | Tracker | None, tags: Mapping[str, str]
) -> Iterator[Tracker]:
    """The one place a run is started (or joined to its sweep): a started tracker, finished
    FINISHED, FAILED if the body raises, KILLED if it is interrupted."""
    tracker = tracking if isinstance(tracking, Tracker) else make_tracker(tracking)
    run_name = None if isinstance(tracking, Tracker) else (tracking or {}).get("run_name")
    tracker.start(tags, run_name=run_name, parent=os.environ.get(PARENT_RUN_ENV) or None)
    try:
        with terminate_as_exit():
            yield tracker
    except BaseException as exc:
        tracker.finish(end_status(exc))
        raise
    tracker.finish("FINISHED")


def is_multirun_job(config: DictConfig) -> bool:
    """Whether ``config`` (with its ``hydra`` node) is a job of a multirun."""
    from hydra.types import RunMode

    try:
        return config.hydra.mode == RunMode.MULTIRUN
    except Exception:  # no hydra node (a config composed outside Hydra's run)
        return False


class SweepCallback(Callback):
    """Hydra callback: a multirun gets one parent run; each job becomes its child.

    The parent is closed KILLED at exit when the sweep is interrupted before it ends.
    """

    def __init__(self) -> None:
        self.tracker: Tracker | None = None
        self.job_started_at = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from craterlab.report.sweep import announce_sweep

        announce_sweep(config)  # child runs are named by the keys the sweep varies
        from craterlab.sweeps.progress import count_jobs, start_sweep, swept_keys

        sweeper: Any = OmegaConf.to_container(
            OmegaConf.select(config, "hydra.sweeper", default=OmegaConf.create({})), resolve=False
        )
        overrides = list(OmegaConf.select(config, "hydra.overrides.task", default=[]))
        total, keys = count_jobs(overrides, sweeper), swept_keys(overrides, sweeper)
        start_sweep(str(config.hydra.sweep.dir), total, keys)
        tracking = OmegaConf.to_container(config.get("tracking"), resolve=True) or {}
        tracking.pop("run_name", None)  # type: ignore[union-attr]
        sweep_dir = str(config.hydra.sweep.dir)
        tracker = make_tracker(tracking)  # type: ignore[arg-type]
        tracker.start(
            {"craterlab.sweep": sweep_dir, "craterlab.role": "sweep"},
            run_name=f"sweep {Path(sweep_dir).parent.name}/{Path(sweep_dir).name}",
        )
        if tracker.run_id is None:
            if tracker.not_logged:
                log.warning("Tracking: no parent run for the sweep: %s", tracker.not_logged[0])
            return
        self.tracker = tracker
        os.environ[PARENT_RUN_ENV] = tracker.run_id
        atexit.register(self._close, "KILLED")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Print ``job i/N`` (multirun jobs only; in the process that runs the job)."""
        from craterlab.sweeps.progress import job_started

        self.job_started_at = time.time()
        if is_multirun_job(config):
            job_started(config.hydra.sweep.dir, config.hydra.job.num, config.hydra.overrides.task)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Record the job for the sweep's progress line and summary table."""
        from hydra.core.utils import JobStatus

        from craterlab.sweeps.progress import job_finished

        if not is_multirun_job(config):
            return
        status = "finished" if job_return.status == JobStatus.COMPLETED else "failed"
        job_finished(
            config.hydra.sweep.dir,
            config.hydra.job.num,
            list(config.hydra.overrides.task),
            status,
            time.time() - self.job_started_at,
            config.hydra.runtime.output_dir,
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from craterlab.report.sweep import SWEEP_VARIES_ENV, finish_sweep
        from craterlab.sweeps.progress import end_of_sweep

        end_of_sweep(str(config.hydra.sweep.dir))  # counts, resume skips, table, summary.csv
        atexit.unregister(self._close)
        finish_sweep(str(config.hydra.sweep.dir), self.tracker)  # table + figures, run name
        os.environ.pop(SWEEP_VARIES_ENV, None)
        self._close("FINISHED")

    def _close(self, status: str) -> None:
        if self.tracker is not None:
            self.tracker.finish(status)
            self.tracker = None
        os.environ.pop(PARENT_RUN_ENV, None)
