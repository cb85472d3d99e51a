"""The Hydra callback of a multirun: a parent run, progress lines, the end-of-sweep report.

``conf/config.yaml`` installs :class:`SweepCallback` in every Hydra run. In a multirun it
opens one parent run for the sweep (each job's run becomes its child, :data:`PARENT_RUN_ENV`),
prints ``job i/N`` lines and the ETA (:mod:`craterlab.sweeps.progress`), and at the end
writes the sweep's summary and report (:mod:`craterlab.sweeps.report`) and closes the parent
run; a sweep interrupted before its end closes it KILLED at exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from craterlab.results import ROLE_TAG, SWEEP_TAG
from craterlab.sweeps.orphans import remember_launcher, watch_launcher
from craterlab.sweeps.progress import (
    count_jobs,
    end_of_sweep,
    job_finished,
    job_started,
    start_sweep,
    swept_keys,
)
from craterlab.sweeps.report import (
    SWEEP_VARIES_ENV,
    announce_sweep,
    finish_sweep,
    sweep_varied_keys,
)
from craterlab.tracking.base import PARENT_RUN_ENV, Tracker, make_tracker

log = logging.getLogger("craterlab")


def is_multirun_job(config: DictConfig) -> bool:
    """Whether ``config`` (with its ``hydra`` node) is a job of a multirun."""
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
        announce_sweep(config)  # child runs are named by the keys the sweep varies
        remember_launcher()  # workers (joblib) exit when this process dies
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
            {SWEEP_TAG: sweep_dir, ROLE_TAG: "sweep"},
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
        self.job_started_at = time.time()
        watch_launcher()  # a pool worker never outlives a killed launcher
        if is_multirun_job(config):
            job_started(config.hydra.sweep.dir, config.hydra.job.num, config.hydra.overrides.task)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Record the job for the sweep's progress line and summary table."""
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
        end_of_sweep(str(config.hydra.sweep.dir))  # counts, resume skips, table, summary.csv
        atexit.unregister(self._close)
        finish_sweep(str(config.hydra.sweep.dir), self.tracker)  # table + figures, run name
        if self.tracker is not None:  # constant/varied params, best child, CSV, datasets
            swept = sweep_varied_keys(config)
            self.tracker.summarize_sweep(str(config.hydra.sweep.dir), swept)
        os.environ.pop(SWEEP_VARIES_ENV, None)
        self._close("FINISHED")

    def _close(self, status: str) -> None:
        if self.tracker is not None:
            self.tracker.finish(status)
            self.tracker = None
        os.environ.pop(PARENT_RUN_ENV, None)
