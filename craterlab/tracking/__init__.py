"""Experiment tracking: where a run is logged from.

Tracking is a plugin kind like the others. A tracker implements
:class:`~craterlab.tracking.base.Tracker` and is registered through the ``register_trackers``
hook; the ``tracking`` config group picks one (``tracking=mlflow``, the default, or
``tracking=none``).

- :mod:`~craterlab.tracking.base`: the Tracker interface (and the tracker that logs nothing),
  :func:`~craterlab.tracking.base.tracked_run`, the one place a run is started.
- :mod:`~craterlab.tracking.mlflow`: the MLflow tracker; one run per job, children of a
  sweep's parent run.

Tracking never sinks a run: a tracker records what it could not log in ``not_logged`` instead
of raising, and the summary at the end of the run says what was not logged and why. Observer
hooks (``run_started``, ``run_finished``) receive the active tracker.
"""

from __future__ import annotations

from craterlab.hookspecs import Register, hookimpl
from craterlab.lazy import lazy_exports
from craterlab.tracking.base import PARENT_RUN_ENV, Tracker, make_tracker, no_tracking, tracked_run

__all__ = ["PARENT_RUN_ENV", "MlflowTracker", "Tracker", "make_tracker", "tracked_run"]
__getattr__ = lazy_exports(__name__, {"MlflowTracker": "craterlab.tracking.mlflow"})


@hookimpl
def register_trackers(register: Register) -> None:
    register("none", no_tracking)
    register(
        "mlflow",
        "craterlab.tracking.mlflow:MlflowTracker",
        description="MLflow runs, grouped under a run per sweep",
    )
