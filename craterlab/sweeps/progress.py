"""Sweep progress: ``job i/N`` with elapsed time and ETA, and a summary table at the end.

State lives in the sweep directory (``<sweep dir>/.craterlab/``), not in one process, so it
is right whatever the launcher: jobs run one after another in the launching process, in joblib
workers, or as Slurm array tasks on other machines (the sweep directory is then on a shared
filesystem). ``sweep.json`` holds the job count and the start time; each job writes
``jobs/<num>.json`` (its overrides, status, seconds and metrics) when it ends. The summary
lists the overrides and the metrics that vary between jobs, and is also written as
``<sweep dir>/summary.csv`` with every metric.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from craterlab.results import read_results

log = logging.getLogger("craterlab")

STATE_DIR = ".craterlab"
SUMMARY_CSV = "summary.csv"
# Metrics the printed table shows (per mode) when they vary; the CSV holds all of them.
TABLE_METRICS = ("mAP", "R@1", "bytes_per_image", "ms_per_query")


def count_jobs(task_overrides: Sequence[str], sweeper: Mapping[str, Any]) -> int | None:
    """How many jobs a sweep launches: the product of the sweep overrides' lengths for Hydra's
    basic sweeper (command line and ``hydra.sweeper.params``), ``n_trials`` for an optimizing
    sweeper (Optuna); None when it can't be told."""
    if "n_trials" in sweeper:
        return int(sweeper["n_trials"])
    if "BasicSweeper" not in str(sweeper.get("_target_", "BasicSweeper")):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    try:
        overrides = OverridesParser.create().parse_overrides([*params, *task_overrides])
    except Exception:
        return None
    values: dict[str, int] = {}
    for override in overrides:
        key = override.get_key_element()
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                return None
            values[key] = len(list(override.sweep_string_iterator()))
        else:
            values[key] = 1
    return math.prod(values.values())


def swept_keys(task_overrides: Sequence[str], sweeper: Mapping[str, Any]) -> list[str]:
    """The keys a sweep varies (``k`` of ``k=16,32``), from the command line and the sweeper's
    ``params``; [] when they can't be parsed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    try:
        overrides = OverridesParser.create().parse_overrides([*params, *task_overrides])
    except Exception:
        return []
    return list(dict.fromkeys(o.get_key_element() for o in overrides if o.is_sweep_override()))


def state_dir(sweep_dir: str | Path) -> Path:
    return Path(sweep_dir) / STATE_DIR


def start_sweep(sweep_dir: str | Path, total: int | None, keys: Sequence[str] = ()) -> None:
    """Record the sweep's job count, swept keys and start time (forgetting the jobs of a
    previous launch into the same directory)."""
    state = state_dir(sweep_dir)
    (state / "jobs").mkdir(parents=True, exist_ok=True)
    for old in (state / "jobs").glob("*.json"):
        old.unlink()
    state_file = state / "sweep.json"
    state_file.write_text(json.dumps({"total": total, "started": time.time(), "keys": list(keys)}))
    print(f"Sweep: {total if total is not None else 'an unknown number of'} jobs -> {sweep_dir}")


def sweep_state(sweep_dir: str | Path) -> dict[str, Any]:
    try:
        return json.loads((state_dir(sweep_dir) / "sweep.json").read_text())
    except (OSError, ValueError):
        return {}


def of_total(num: int, total: int | None) -> str:
    return f"job {num + 1}/{total}" if total else f"job {num + 1}"


def job_started(sweep_dir: str | Path, num: int, overrides: Sequence[str]) -> None:
    """Print ``job i/N: overrides`` (the swept ones, when the sweep recorded them)."""
    state = sweep_state(sweep_dir)
    keys = set(state.get("keys") or ())
    shown = [o for o in overrides if o.partition("=")[0].lstrip("+~") in keys] or overrides
    text = " ".join(shown) or "(no overrides)"
    print(f"[sweep] {of_total(num, state.get('total'))}: {text}", flush=True)


def job_metrics(run_dir: str | Path) -> dict[str, float]:
    """A finished job's metrics (``mode/metric``, ``storage/...``) from its results.json."""
    try:
        return read_results(run_dir).flat_metrics()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def job_finished(
    sweep_dir: str | Path,
    num: int,
    overrides: Sequence[str],
    status: str,
    seconds: float,
    run_dir: str | Path,
) -> str:
    """Record job ``num`` and print ``job i/N <status> in s; d/N done, elapsed, ETA``."""
    jobs = state_dir(sweep_dir) / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    if (Path(run_dir) / "skipped.json").is_file():
        status = "skipped"
    record = {
        "num": num,
        "overrides": list(overrides),
        "status": status,
        "seconds": seconds,
        "metrics": job_metrics(run_dir),
    }
    tmp = jobs / f".{num}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, jobs / f"{num}.json")
    state = sweep_state(sweep_dir)
    total, started = state.get("total"), state.get("started")
    done = len(list(jobs.glob("*.json")))
    line = f"[sweep] {of_total(num, total)} {status} in {seconds:.1f} s"
    if started:
        elapsed = time.time() - started
        line += f"; {done}/{total or '?'} done, elapsed {duration(elapsed)}"
        if total and done < total:
            line += f", ETA {duration(elapsed / done * (total - done))}"
    print(line, flush=True)
    return line


def duration(seconds: float) -> str:
    """3725 -> '1h02m05s', 65 -> '1m05s', 5.2 -> '5s'."""
    s = int(round(seconds))
    h, m, s = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def load_jobs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The job records of the sweep, by job number."""
    jobs = []
    for path in state_dir(sweep_dir).joinpath("jobs").glob("*.json"):
        try:
            jobs.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(jobs, key=lambda j: j["num"])


def varying(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[str]:
    """The keys whose values differ between rows (all keys when there is one row)."""
    if len(rows) <= 1:
        return list(keys)
    return [k for k in keys if len({repr(r.get(k)) for r in rows}) > 1]


def override_dict(overrides: Sequence[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        key, _, value = o.partition("=")
        out[key.lstrip("+~")] = value
    return out


def summarize(sweep_dir: str | Path) -> tuple[str, Path | None]:
    """The summary table (printed) and the CSV written to ``<sweep dir>/summary.csv``."""
    jobs = load_jobs(sweep_dir)
    if not jobs:
        return "", None
    rows = []
    for job in jobs:
        row: dict[str, Any] = {"job": job["num"], "status": job["status"]}
        row.update(override_dict(job["overrides"]))
        row["seconds"] = round(job["seconds"], 2)
        row.update(job["metrics"])
        rows.append(row)
    override_keys = list(dict.fromkeys(k for j in jobs for k in override_dict(j["overrides"])))
    metric_keys = sorted({k for j in jobs for k in j["metrics"]})
    path = Path(sweep_dir) / SUMMARY_CSV
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["job", "status", *override_keys, "seconds", *metric_keys])
        writer.writeheader()
        writer.writerows(rows)
    shown = varying(rows, override_keys)
    shown_metrics = [k for k in metric_keys if k.partition("/")[2] in TABLE_METRICS]
    shown_metrics = varying(rows, shown_metrics)
    columns = ["job", "status", *shown, "seconds", *shown_metrics]
    table = format_table(rows, columns)
    return table, path


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def end_of_sweep(sweep_dir: str | Path) -> str:
    """The lines printed when a sweep ends: counts (with resume skips), the table, the CSV."""
    jobs = load_jobs(sweep_dir)
    total = sweep_state(sweep_dir).get("total") or len(jobs)
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job["status"]] = counts.get(job["status"], 0) + 1
    lines = [
        f"Sweep done: {len(jobs)}/{total} jobs ended ("
        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + ")"
    ]
    if counts.get("skipped"):
        lines.append(
            f"Resume: skipped {counts['skipped']} of {total} jobs whose identical configuration "
            "had already finished (resume=false reruns them)."
        )
    table, path = summarize(sweep_dir)
    if table:
        lines += [table, f"Summary CSV: {path}"]
    text = "\n".join(lines)
    print(text, flush=True)
    return text
