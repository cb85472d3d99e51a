"""The tracker interface and the one place a run is started: :func:`tracked_run`.

A tracker implements :class:`Tracker` (``start``, ``log_params``, ``log_metrics``,
``log_artifact``, ``set_tags``, ``finish``); :func:`make_tracker` builds the one a ``tracking``
config selects through the registry. :func:`tracked_run` starts a run, or joins it to its
sweep's parent run (:data:`PARENT_RUN_ENV`, set by the sweep callback,
:class:`craterlab.sweeps.callback.SweepCallback`), and closes it FINISHED, FAILED or KILLED.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from craterlab.plugins import get_registry
from craterlab.results import FinishedRun

log = logging.getLogger("craterlab")

PARENT_RUN_ENV = "CRATERLAB_PARENT_RUN_ID"


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

    def log_datasets(self, dataset: Any, config: Mapping[str, Any]) -> None:
        """Record the run's gallery and queries as dataset inputs (``config``: its dataset
        config: name, path or root)."""

    def summarize_sweep(self, sweep_dir: str | Path, swept: Sequence[str] = ()) -> None:
        """On a sweep's parent run, when the sweep ends: its constant and varied parameters,
        the best child per key metric, ``summary.csv`` and the children's datasets.
        ``swept``: the override keys the sweep varied (``aggregator``, ``k``)."""

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run with ``status`` (FINISHED, FAILED or KILLED)."""

    def find_finished(self, tags: Mapping[str, str]) -> FinishedRun | None:
        """The newest FINISHED run of this tracker's experiment carrying all ``tags``, as a
        :class:`craterlab.results.FinishedRun`; None when there is none (or the tracker
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


def make_tracker(tracking: Mapping[str, Any] | None) -> Tracker:
    """The tracker a ``tracking`` config selects, built through the registry."""
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
