"""The MLflow tracker (``tracking=mlflow``): one MLflow run per job, children of a sweep's run.

Every call to the store runs under ``timeout_s``: a store that does not answer (a stalled
server, a SQLite file it cannot write) costs at most that long once, then tracking is off for
the rest of the run and the summary says what was not logged. A SQLite store whose folder
cannot be written is refused before MLflow is asked at all. Creating a new SQLite store runs
MLflow's schema migrations (about 10 s on a busy 2-core machine), so a start that must create
one is allowed ``NEW_STORE_S`` instead.

Each run is tagged with the process id and host that run it. When a run starts, runs of the
same experiment still RUNNING whose process on this host is gone (a killed job, a sweep
interrupted with SIGKILL) are closed as KILLED, with the reason in ``craterlab.end_reason``.

Parallel jobs on one store lose nothing: a write that meets "database is locked" waits and
is retried; a tag that two jobs create at the same moment (MLflow's tag write is a read, then
an insert: the second insert fails with "UNIQUE constraint failed") is written again, now as
an update. The shared view's read-merge-write runs under a file lock beside a local SQLite
store, so one job's columns are never overwritten by another's stale copy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from craterlab.locks import exclusive
from craterlab.results import (
    DEFAULT_ARTIFACTS,
    END_TAG,
    HOST_TAG,
    PID_TAG,
    FinishedRun,
    default_uri,
    flatten_config,
    metric_name,
)
from craterlab.tracking.base import Tracker
from craterlab.tracking.view import EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT

log = logging.getLogger("craterlab")

NEW_STORE_S = 120.0  # time allowed to create a new SQLite store (schema migrations)
# A SQLite store serializes writers: under parallel jobs a write can fail with "database is
# locked" after SQLite's own busy wait. Such a write is retried (backoff with jitter) for up
# to LOCKED_RETRY_S before it counts as not logged.
LOCKED_RETRY_S = 120.0
LOOKUP_S = 60.0  # time allowed to look up a finished run when resuming a sweep
LOCKED_MESSAGES = ("database is locked", "database table is locked", "database is busy")
# Two writers inserting the same new key: the loser's retry finds the row and updates it.
RACE_MESSAGES = ("unique constraint failed", "duplicate key value violates unique constraint")
RACE_RETRIES = 3


class StoreError(Exception):
    """The tracking store can't be used; the message says why and what to do."""


def mentions(exc: BaseException | None, messages: Sequence[str]) -> bool:
    """Whether ``exc``, or an exception it wraps, says one of ``messages`` (lower case)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(m in str(exc).lower() for m in messages):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_locked_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it wraps) is SQLite's "database is locked"."""
    return mentions(exc, LOCKED_MESSAGES)


def is_insert_race(exc: BaseException) -> bool:
    """Whether ``exc`` is a unique-key insert lost to a parallel writer of the same key."""
    return mentions(exc, RACE_MESSAGES)


def retry_locked(
    fn: Callable[[], Any],
    budget_s: float = LOCKED_RETRY_S,
    *,
    first_wait_s: float = 0.05,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """``fn()``, called again while it fails with "database is locked", for up to ``budget_s``
    seconds (waits double from ``first_wait_s`` to 2 s, with jitter), and up to
    ``RACE_RETRIES`` times when it lost a unique-key insert race; other errors propagate."""
    import random

    deadline = time.monotonic() + budget_s
    wait = first_wait_s
    races = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if is_insert_race(exc) and races < RACE_RETRIES:
                races += 1
                log.debug("Tracking: another writer created the same key first; writing again")
                continue
            if not is_locked_error(exc) or time.monotonic() + wait > deadline:
                raise
            log.debug("Tracking: store locked by another writer; retrying in %.2f s", wait)
        sleep(wait * random.uniform(0.5, 1.5))
        wait = min(wait * 2, 2.0)


@contextlib.contextmanager
def view_lock(uri: str, timeout_s: float) -> Iterator[None]:
    """Exclusive lock for the shared view's read-merge-write on a local SQLite store (file
    ``<db>.view.lock`` beside it), waited for up to ``timeout_s`` (then TimeoutError). Other
    stores are not locked: a server offers no lock, and a lost view costs columns, not data."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = uri.removeprefix("sqlite:///") + ".view.lock"
    with open(lock, "a+") as f, exclusive(f, timeout_s=timeout_s):
        yield


def call_with_timeout(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """``fn()`` in a daemon thread; StoreError if it has not returned within ``timeout_s``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=f"craterlab-tracking {what}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise StoreError(f"the tracking store did not answer within {timeout_s:g} s ({what})")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def check_local_store(uri: str, artifact_location: str) -> None:
    """Refuse a SQLite store or local artifact folder this process cannot write (StoreError)."""
    places = []
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        places.append(("store", db.parent, db))
    if "://" not in artifact_location:
        places.append(("artifact folder", Path(artifact_location), None))
    for label, folder, file in places:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".craterlab-write-probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
            if file is not None and file.exists() and not os.access(file, os.W_OK):
                raise PermissionError(f"{file} is read-only")
        except OSError as exc:
            raise StoreError(
                f"the MLflow {label} {folder} is not writable ({exc.strerror or exc}); point "
                "tracking.uri / tracking.artifact_location at a writable place, or turn "
                "tracking off with tracking=none"
            ) from None


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def close_orphaned_runs(client: Any, experiment_id: str, host: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process is gone; their ids.

    Runs without a pid tag (logged elsewhere, or by older versions) are left as they are.
    """
    closed = []
    runs = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    for run in runs:
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if tags.get(HOST_TAG) != host or not pid.isdigit() or int(pid) == os.getpid():
            continue
        if process_alive(int(pid)):
            continue
        client.set_tag(
            run.info.run_id, END_TAG, f"process {pid} on {host} ended without closing the run"
        )
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    if closed:
        log.warning(
            "Tracking: marked %d run(s) KILLED whose process had died while RUNNING: %s",
            len(closed),
            ", ".join(closed),
        )
    return closed


def connect(uri: str, experiment: str, artifact_location: str) -> tuple[Any, str]:
    """An MLflow client on ``uri`` and the id of ``experiment`` (created if missing)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if EXPERIMENT_KIND_TAG not in found.tags:  # made before craterlab set its kind
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
        return client, found.experiment_id
    location = artifact_location
    if "://" not in location:
        location = Path(location).resolve().as_uri()
    try:
        # a model-development experiment: the UI opens on its runs table (tracking.view)
        tags = {EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT}
        return client, client.create_experiment(experiment, location, tags=tags)
    except Exception:  # a parallel job created it first: use theirs
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return client, found.experiment_id


class MlflowTracker(Tracker):
    """Logs to MLflow; every call is guarded and time-limited, so trouble is reported, never
    fatal. ``uri`` null is the embedded SQLite store outputs/mlflow.db."""

    name = "mlflow"

    def __init__(
        self,
        uri: str | None = None,
        experiment: str = "craterlab",
        artifact_location: str | None = None,
        run_name: str | None = None,
        timeout_s: float = 10,
        locked_retry_s: float = LOCKED_RETRY_S,
    ) -> None:
        super().__init__()
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.uri = uri or default_uri()
        self.experiment = experiment
        self.artifact_location = artifact_location or str(DEFAULT_ARTIFACTS.resolve())
        self.run_name = run_name
        self.timeout_s = float(timeout_s)
        self.locked_retry_s = float(locked_retry_s)
        self._client: Any = None
        self.experiment_id: str | None = None
        self.is_sweep = False
        self._columns: tuple[set[str], set[str]] = (set(), set())  # metric, param names

    # -- lifecycle --------------------------------------------------------------------------

    def start_budget(self) -> float:
        """Seconds ``start`` may take: ``timeout_s``, more when a new SQLite store is made."""
        new = self.uri.startswith("sqlite:///") and not Path(self.uri[10:]).exists()
        return max(self.timeout_s, NEW_STORE_S) if new else self.timeout_s

    def start(
        self, tags: Mapping[str, str], run_name: str | None = None, parent: str | None = None
    ) -> None:
        import mlflow.tracking  # noqa: F401 (imported before the clock starts: seconds)

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(math.ceil(self.timeout_s))))
        host = socket.gethostname()
        run_tags = {**tags, PID_TAG: str(os.getpid()), HOST_TAG: host}
        if parent:
            run_tags["mlflow.parentRunId"] = parent

        gave_up = threading.Event()

        def open_run() -> tuple[Any, Any]:
            client, experiment_id = connect(self.uri, self.experiment, self.artifact_location)
            try:
                close_orphaned_runs(client, experiment_id, host)
            except Exception as exc:  # housekeeping must not block the run
                log.debug("Tracking: could not look for orphaned runs (%s)", exc)
            run = client.create_run(
                experiment_id, tags=run_tags, run_name=run_name or self.run_name
            )
            if gave_up.is_set():  # the store answered after the run stopped waiting
                client.set_terminated(run.info.run_id, "FAILED")
            return client, run

        try:
            check_local_store(self.uri, self.artifact_location)
            # Each attempt gets the stall budget; only "database is locked" (another writer,
            # answering quickly) is retried, so a store that does not answer costs one timeout.
            client, run = retry_locked(
                lambda: call_with_timeout(open_run, self.start_budget(), "starting a run"),
                self.locked_retry_s,
            )
        except Exception as exc:  # tracking must not sink the run
            gave_up.set()
            self._fail("the whole run (could not start an MLflow run)", exc)
            log.warning("Tracking: %s. The run goes on without tracking.", self.not_logged[-1])
            return
        self._client = client
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        self.is_sweep = tags.get("craterlab.role") == "sweep"
        log.info("MLflow run %s in %s (experiment %r)", self.run_id, self.uri, self.experiment)

    def finish(self, status: str = "FINISHED") -> None:
        if self._client is not None and status == "FINISHED" and not self.is_sweep:
            self._guard("the key columns view", self._save_view)
        if self._client is not None:
            self._guard("the run status", self._client.set_terminated, self.run_id, status)
            self._client = None
        if self.not_logged:
            log.warning(
                "Tracking: not logged to %s: %s. Check that the tracking store is reachable "
                "and writable (tracking.uri=...), or turn tracking off with tracking=none.",
                self.uri,
                "; ".join(self.not_logged),
            )

    def find_finished(self, tags: Mapping[str, str]) -> FinishedRun | None:
        """The newest FINISHED run of the experiment with all ``tags`` (see :class:`Tracker`);
        a store that can't be asked is reported in the log and counts as "none"."""
        from mlflow.tracking import MlflowClient  # imported before the clock starts: seconds

        def search() -> Any:
            client = MlflowClient(tracking_uri=self.uri)
            found = client.get_experiment_by_name(self.experiment)
            if found is None:
                return None
            where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
            runs = client.search_runs(
                [found.experiment_id],
                filter_string=f"{where} and attributes.status = 'FINISHED'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            return runs[0] if runs else None

        if self.uri.startswith("sqlite:///") and not Path(self.uri[10:]).exists():
            return None  # no store yet: nothing finished
        # A missed lookup reruns a finished job (a duplicate, never a loss): allow the first
        # connection of a fresh job process (engine, schema check) more than one call's time.
        budget = max(self.timeout_s, LOOKUP_S)
        try:
            run = retry_locked(
                lambda: call_with_timeout(search, budget, "looking up finished runs"),
                self.locked_retry_s,
            )
        except Exception as exc:
            log.warning("Resume: could not look up finished runs in %s (%s)", self.uri, exc)
            return None
        if run is None:
            return None
        return FinishedRun(run.info.run_id, dict(run.data.metrics), dict(run.data.tags))

    def summary(self) -> str:
        if self.not_logged or not self.run_id:
            return super().summary()
        return f"MLflow run {self.run_id} ({self.uri})"

    # -- what the UI shows (tracking.view, tracking.datasets) ---------------------------------

    def log_datasets(self, dataset: Any, config: Mapping[str, Any]) -> None:
        from craterlab.tracking.datasets import dataset_inputs

        try:
            inputs = dataset_inputs(dataset, config)
        except Exception as exc:  # a dataset that can't describe itself is not worth a run
            self._fail("dataset inputs", exc)
            return
        self._guard("dataset inputs", lambda: self._client.log_inputs(self.run_id, inputs))

    def summarize_sweep(self, sweep_dir: str | Path, swept: Sequence[str] = ()) -> None:
        from craterlab.tracking.view import summarize_sweep, view_url

        box: dict[str, str] = {}

        def summarize() -> None:
            box["key"] = summarize_sweep(
                self._client, self.experiment_id, self.run_id, sweep_dir, self._log_batch, swept
            )

        self._guard("the sweep summary", summarize)
        if box.get("key"):
            log.info(
                "MLflow: the sweep's key columns: %s (mlflow ui --backend-store-uri %s)",
                view_url(str(self.experiment_id), box["key"]),
                self.uri,
            )

    def _save_view(self) -> None:
        from craterlab.tracking.view import key_columns, save_view

        metrics, params = self._columns
        if metrics:
            with view_lock(self.uri, self.timeout_s / 2):  # the rest of timeout_s writes it
                columns = key_columns(metrics, params)
                save_view(self._client, self.experiment_id, columns, merge=True)

    # -- logging ----------------------------------------------------------------------------

    def log_params(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten_config(config).items()]
        self._columns[1].update(p.key for p in params)
        for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
            self._guard("params", self._log_batch, params=params[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries, missing = [], []
        for k, v in metrics.items():
            if v is None:
                missing.append(k)
            else:  # NaN and inf are stored as such: a broken number must stay visible
                entries.append(Metric(metric_name(k), float(v), now, step))
        self._columns[0].update(e.key for e in entries)
        if missing:
            self.not_logged.append(f"metrics without a value ({', '.join(missing)})")
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
            retry_locked(
                lambda: call_with_timeout(lambda: fn(*args, **kwargs), self.timeout_s, what),
                self.locked_retry_s,
            )
        except StoreError as exc:  # a store that stalls once is not asked again this run
            self._fail(what, exc)
            self._client = None
        except Exception as exc:
            self._fail(what, exc)

    def _fail(self, what: str, exc: BaseException) -> None:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self.not_logged.append(f"{what} ({reason[:300]})")
