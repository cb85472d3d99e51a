"""The end of a multirun: its report in the sweep directory and on the parent MLflow run.

Called by :class:`craterlab.sweeps.callback.SweepCallback`. When a sweep starts,
:func:`announce_sweep` tells its jobs which keys vary, so each child run is named by those
alone (:func:`child_run_name`). When it ends, :func:`finish_sweep` writes
``<sweep dir>/report/`` (table and figures), attaches it to the sweep's parent run and names
that run by what the sweep varied. Trouble here is logged, never raised: the jobs' results
are already safe.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from craterlab.errors import CraterlabError
from craterlab.report.build import sweep_name, table_name, write_report
from craterlab.report.runs import load_sweep_dir
from craterlab.sweeps.progress import swept_keys
from craterlab.tracking.view import launch_local

log = logging.getLogger("craterlab")


def finish_sweep(sweep_dir: str | Path, tracker: Any = None) -> Path | None:
    """Write the sweep's report; log it to ``tracker`` (the parent run) and rename that run."""
    sweep_dir = Path(sweep_dir)
    try:
        records = load_sweep_dir(sweep_dir)
    except CraterlabError as exc:
        log.warning("Sweep report not written: %s", exc)
        return None
    out = sweep_dir / "report"
    try:
        table = table_name(records)
        paths, _ = write_report(records, out, table)
    except Exception as exc:  # a report problem must not fail a finished sweep
        log.warning("Sweep report not written: %s: %s", type(exc).__name__, exc)
        return None
    log.info("Sweep report: %s", out)
    if tracker is not None:
        for path in paths:
            tracker.log_artifact(path, "report")
        tracker.set_tags({"mlflow.runName": sweep_name(records, table)})
    return out


SWEEP_VARIES_ENV = "CRATERLAB_SWEEP_VARIES"


def sweep_varied_keys(config: Any) -> list[str]:
    """Config keys a multirun varies: its sweeper params and its multi-valued overrides."""
    sweeper = OmegaConf.select(config, "hydra.sweeper", default=None) or {}
    overrides = [
        str(o)
        for o in OmegaConf.select(config, "hydra.overrides.task", default=None) or []
        if not str(o).startswith("hydra.")
    ]
    return [k.lstrip("+~") for k in swept_keys(overrides, sweeper)]


def announce_sweep(config: Any) -> None:
    """Tell the sweep's jobs what varies (read by :func:`child_run_name`)."""
    os.environ[SWEEP_VARIES_ENV] = ",".join(sweep_varied_keys(config))


def child_run_name(overrides: list[str]) -> str | None:
    """A job's name from only the overrides its sweep varies (None outside a sweep)."""
    varied = [k for k in os.environ.get(SWEEP_VARIES_ENV, "").split(",") if k]
    picked = [
        o for o in overrides if o.partition("=")[0].lstrip("+~") in varied and not launch_local(o)
    ]
    return ",".join(picked) or None
