"""Resumable sweeps: a job whose identical configuration already finished is skipped.

A job's *identity* is a hash of its resolved config minus the keys that are local to one
launch (:data:`RUN_LOCAL_KEYS`: output directories, tracking settings and run names, the cache
location, decode workers, ``resume`` itself, the sharding of extraction). It is recorded on the
run as the tag ``craterlab.config_hash``. When a multirun job starts with ``resume=true`` (the
default), the tracker is asked for a FINISHED run with the same identity in the same
experiment; if there is one the job is skipped and returns that run's metrics. FAILED and
KILLED runs never count, so relaunching reruns them; ``resume=false`` reruns everything.
Single runs (no ``-m``) always run.

The earlier run's directory (tag ``craterlab.run_dir``) is data from the store: its results,
rankings and page are only copied when it resolves inside the folder this sweep was launched
from or the folder holding this sweep's folder (:func:`earlier_run_dir`). A tag naming anything
else (``../..``, ``/etc``, a link out) makes the earlier run not reusable: a warning names the
tag and path, nothing there is read, and the job runs again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from craterlab.errors import DataError
from craterlab.hashing import file_sha256, stable_hash
from craterlab.results import (
    CONFIG_FILE,
    IDENTITY_TAG,
    OVERRIDES_TAG,
    RESULTS_FILE,
    RUN_DIR_TAG,
    FinishedRun,
    write_results,
)
from craterlab.safepaths import contained
from craterlab.tracking.base import make_tracker

log = logging.getLogger("craterlab")

__all__ = ["IDENTITY_TAG", "OVERRIDES_TAG", "FinishedRun", "previous_run", "record_skip"]

SKIPPED_FILE = "skipped.json"
# Dotted keys (a group drops all of its keys) that don't change what a job computes.
RUN_LOCAL_KEYS = (
    "output_dir",
    "resume",
    "tracking",
    "cache",
    "num_workers",
    "extract",
    "report.page_queries",
)


def strip_keys(config: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``config`` without the dotted ``keys``."""
    out = dict(config)
    for key in keys:
        head, _, rest = key.partition(".")
        if head not in out:
            continue
        if rest and isinstance(out[head], Mapping):
            out[head] = strip_keys(out[head], (rest,))
        elif not rest:
            del out[head]
    return out


def config_identity(config: Mapping[str, Any]) -> str:
    """The job identity: a 20-hex hash of the resolved config minus :data:`RUN_LOCAL_KEYS`,
    and of the content of the files it names (:func:`content_identity`): a checkpoint replaced
    at the same ``backbone.weights`` path, or a dataset whose files changed, is a new job."""
    kept = strip_keys(config, RUN_LOCAL_KEYS)
    return stable_hash({"config": kept, "content": content_identity(kept)}, 20)


MAX_LISTED_FILES = 200_000
"""A folder with more files than this is identified by its metadata files only (csv, json,
txt, yaml): listing millions of images at every job start would cost more than a job."""
METADATA_SUFFIXES = (".csv", ".json", ".txt", ".yaml", ".yml", ".parquet", ".tsv")


def content_identity(config: Mapping[str, Any]) -> dict[str, str]:
    """``{dotted key: identity}`` of every config value that names an existing file (its
    sha256, memoized on path, size and mtime) or folder (a hash of the relative path, size and
    mtime of each file in it: a dataset's images, manifests and split files)."""
    out: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list | tuple):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")
        elif isinstance(node, str) and node and "://" not in node and len(node) < 4096:
            path = Path(node).expanduser()
            try:
                if path.is_file():
                    out[key] = "file:" + file_sha256(path)
                elif path.is_dir() and path.resolve() != Path.cwd().resolve():
                    out[key] = "folder:" + folder_identity(path)
            except OSError:
                return

    walk(config, "")
    return out


def folder_identity(path: Path) -> str:
    """A hash over (relative path, size, mtime) of the files under ``path`` (see
    :data:`MAX_LISTED_FILES`)."""
    listed: list[tuple[str, int, int]] = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            listed.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
        if len(listed) > MAX_LISTED_FILES:
            listed = [e for e in listed if e[0].lower().endswith(METADATA_SUFFIXES)]
            break
    return stable_hash(listed, 20)


def job_overrides() -> list[str]:
    """The job's command-line overrides (Hydra), [] outside a Hydra job."""
    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (``-m``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def identity_tags(config: Mapping[str, Any]) -> dict[str, str]:
    """Tags that let a relaunch recognize this job and the planner rebuild its command line."""
    return {
        IDENTITY_TAG: config_identity(config),
        OVERRIDES_TAG: json.dumps(job_overrides()),
    }


def previous_run(config: Mapping[str, Any]) -> FinishedRun | None:
    """The FINISHED run of this job's identity, when resuming a multirun job; else None.

    It is looked up through the tracker the config selects (``tracking``); a tracker that
    keeps no runs (``tracking=none``) finds none, so every job runs.
    """
    if not config.get("resume", True) or not in_multirun():
        return None
    tracker = make_tracker(config.get("tracking"))
    found = tracker.find_finished({IDENTITY_TAG: config_identity(config)})
    if found is None:
        return None
    run_dir = Path(str(config.get("output_dir") or "outputs/runs/latest"))
    try:
        earlier_run_dir(found, run_dir)
    except DataError as err:
        log.warning("Resume: run %s is not reused, the job runs again. %s", found.run_id, err)
        return None
    return found


def allowed_roots(run_dir: Path) -> list[Path]:
    """Where an earlier run's directory may lie: the folder the sweep was launched from (Hydra's
    relative ``outputs/`` lives there) and the folder holding this job's sweep folder (another
    launch with its own ``hydra.sweep.dir`` beside this one). A filesystem root (a sweep
    launched from ``/``) is never one: it would let a tag name any folder."""
    roots = [Path.cwd(), run_dir.absolute().parent.parent]
    return [r for r in roots if Path(os.path.realpath(r)) != Path(r.anchor)]


def earlier_run_dir(found: FinishedRun, run_dir: Path) -> Path | None:
    """The earlier run's directory named by its ``craterlab.run_dir`` tag, checked: None when
    the tag is empty or the folder is gone (its results are rebuilt from the run's metrics);
    a DataError when it resolves outside :func:`allowed_roots` or one of its record files is a
    link out of it. Nothing is read before this check."""
    tag = found.tags.get(RUN_DIR_TAG, "")
    if not tag:
        return None
    what = f"The tag {RUN_DIR_TAG}={tag!r} of the earlier run {found.run_id}"
    earlier = Path(tag)
    real = Path(os.path.realpath(earlier))
    roots = allowed_roots(run_dir)
    for root in roots:
        base = Path(os.path.realpath(root))
        if real != base and real.is_relative_to(base):
            if not real.is_dir():
                return None
            try:  # realpath above: the folder itself is inside; now each file it holds
                for name in (RESULTS_FILE, *RECORD_FILES):
                    contained(real, name, what)
            except DataError:
                break
            return real
    raise DataError(
        f"{what} names a folder outside the sweep's outputs ({' or '.join(map(str, roots))}) "
        "or one whose files lead out of it: the store was edited or crafted, so nothing "
        "there is read."
    )


# What a finished job leaves besides results.json, copied from the earlier run when present.
RECORD_FILES = ("rankings.json", "results.html")


def record_skip(run_dir: Path, found: FinishedRun, config: Mapping[str, Any] | None = None) -> None:
    """Mark the job directory as skipped and give it the whole record of a job that ran: the
    earlier run's results.json (rebuilt from its metrics when its directory is gone), this
    job's resolved config (``config``; the same computation, as its identity is equal), and
    the earlier run's rankings and page when they still exist. A resumed sweep therefore
    reports exactly as an uninterrupted one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SKIPPED_FILE).write_text(
        json.dumps({"run_id": found.run_id, IDENTITY_TAG: found.tags.get(IDENTITY_TAG, "")})
    )
    try:
        earlier = earlier_run_dir(found, run_dir)
    except DataError as err:  # checked by previous_run; a direct caller reads nothing there
        log.warning("Resume: %s", err)
        earlier = None
    target = run_dir / RESULTS_FILE
    source = earlier / RESULTS_FILE if earlier is not None else None
    same = source is not None and source.is_file() and source.resolve() == target.resolve()
    if source is not None and source.is_file() and not same:
        shutil.copyfile(source, target)
    elif not target.is_file():
        write_results(run_dir, found.record())
    if config is not None:
        (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(dict(config))))
    for name in RECORD_FILES:
        if earlier is None or same:
            break
        if (earlier / name).is_file() and not (run_dir / name).exists():
            shutil.copyfile(earlier / name, run_dir / name)
    log.info(
        "Resume: skipped, this configuration already finished as run %s (resume=false reruns it)",
        found.run_id,
    )
