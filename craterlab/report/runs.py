"""Run records for reports, loaded from a multirun directory, an MLflow sweep or an experiment.

A record holds a run's flattened resolved config, its metrics per retrieval mode, how its
weights were loaded and its backbone's parameter count. :meth:`RunRecord.view` derives the
few readable fields (backbone, token method, K, quantizer, S, ...) that tables, figures and
the paper's numbers are keyed by, so a run read from disk and the same run read from MLflow
look the same.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from craterlab.errors import CraterlabError
from craterlab.results import (
    CONFIG_FILE,
    RESULTS_FILE,
    ROLE_TAG,
    UNTRAINED_TAG,
    WEIGHTS_TAG,
    flatten_config,
    is_untrained,
    read_results,
    split_metrics,
)

# Fields of RunRecord.view, in the order tables show them.
VIEW_FIELDS = (
    "backbone",
    "pooling",
    "tokens",
    "selector",
    "aggregator",
    "seeds",
    "assign",
    "k",
    "quantizer",
    "shortlist",
    "train",
    "augment",
    "dataset",
    "depth",
)


@dataclass
class RunRecord:
    """One run as a report sees it."""

    name: str
    config: dict[str, str]
    results: dict[str, dict[str, float]]
    weights: str = "unknown"
    parameters: float | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def untrained(self) -> bool:
        return is_untrained(self.weights)

    def view(self) -> dict[str, str]:
        """Readable fields keyed like the paper's numbers (see :data:`VIEW_FIELDS`)."""
        return run_view(self.config)


def run_view(config: Mapping[str, str]) -> dict[str, str]:
    """Derived fields of a flattened config (values as strings, '-' when not applicable)."""
    c = {k: str(v) for k, v in config.items()}

    def get(key: str) -> str:
        value = c.get(key)
        return "-" if value in (None, "None", "null", "") else value

    if get("backbone.model") != "-":
        tag = get("backbone.pretrained_tag")
        backbone = get("backbone.model") + ("" if tag == "-" else f".{tag}")
    else:
        size = get("backbone.size")
        backbone = get("backbone.name") + ("" if size == "-" else f"_{size}")
    aggregator = get("aggregator.name")
    selector = get("selector.name")
    seeds = get("aggregator.seeds") if aggregator == "instance" else "-"
    assign = get("aggregator.assign") if aggregator == "instance" else "-"
    if aggregator == "none":
        tokens = f"{selector} selection"
    elif aggregator == "instance":
        tokens = f"instance ({seeds})"
    else:
        tokens = aggregator
    quantizer = get("quantizer.name")
    if quantizer == "pq":
        quantizer = f"pq{get('quantizer.m')}"
    elif quantizer == "residual":  # the config options residual1 / residual2
        quantizer = f"residual{get('quantizer.nbits')}"
    train = get("train.name")
    pooling = get("pooling.name")
    if pooling == "instance":  # instance tokens pooled into one vector (conf/pooling)
        pooling = f"instance_{get('pooling.reduce')}"
    return {
        "backbone": backbone,
        "pooling": pooling,
        "tokens": tokens,
        "selector": selector,
        "aggregator": aggregator,
        "seeds": seeds,
        "assign": assign,
        "k": get("k"),
        "quantizer": quantizer,
        "shortlist": get("shortlist"),
        "train": train,
        "augment": get("train.augment") if train != "none" else "-",
        "dataset": _dataset(get("dataset.name"), get("dataset.size")),
        "depth": get("depth"),
        "pooling_seeds": get("pooling.seeds"),
        "pooling_assign": get("pooling.assign"),
    }


def _dataset(name: str, size: str) -> str:
    """The dataset a run measured, with its size when it has one ("synthetic-tiny")."""
    return name if size == "-" else f"{name}-{size}"


def varying_fields(records: Iterable[RunRecord]) -> list[str]:
    """View fields whose value differs between the records (what a sweep varied)."""
    views = [r.view() for r in records]

    def varies(f: str, ignore: frozenset[str] = frozenset()) -> bool:
        return len({v[f] for v in views} - ignore) > 1

    fields = [f for f in VIEW_FIELDS if varies(f)]
    if "tokens" in fields:  # the token label already names selector, aggregator and seeds
        implied = {"selector", "aggregator", "seeds"}
        implied |= {"assign"} if not varies("assign", frozenset({"-"})) else set()
        fields = [f for f in fields if f not in implied]
    return fields


# ------------------------------------------------------------------------ from a directory


def load_run_dir(path: Path) -> RunRecord:
    """The record of one run directory (``resolved_config.yaml`` + ``results.json``)."""
    results_path = path / RESULTS_FILE
    if not results_path.is_file():
        raise CraterlabError(
            f"{path} has no {RESULTS_FILE}: it is not a finished craterlab run (or it was "
            "made by a version that did not write one). Rerun it, or report on its MLflow "
            "parent run instead."
        )
    summary = read_results(path)
    config_path = path / CONFIG_FILE
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    return RunRecord(
        name=summary.name,
        config=flatten_config(config or {}),
        results={m: {k: float(v) for k, v in r.items()} for m, r in summary.results.items()},
        weights=summary.weights,
        parameters=summary.parameters,
        source=str(path),
        extra={"storage": summary.storage},
    )


def load_sweep_dir(path: Path) -> list[RunRecord]:
    """Records of every finished job of a multirun directory (or of one run directory)."""
    path = Path(path)
    if (path / RESULTS_FILE).is_file():
        return [load_run_dir(path)]
    jobs = sorted(
        (p for p in path.iterdir() if p.is_dir() and (p / RESULTS_FILE).is_file()),
        key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name),
    )
    if not jobs:
        raise CraterlabError(
            f"{path} holds no finished runs (no */{RESULTS_FILE}). Pass a multirun directory "
            "such as outputs/multirun/2026-01-01/12-00-00, one run directory, an MLflow parent "
            "run id or an MLflow experiment name."
        )
    return [load_run_dir(p) for p in jobs]


# ------------------------------------------------------------------------ from MLflow


def unflatten_metrics(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """MLflow metrics ('two_stage/R_at_1') -> {'two_stage': {'R@1': ...}} (modes only)."""
    results, _, _ = split_metrics(metrics)
    return {mode: {k: float(v) for k, v in m.items()} for mode, m in results.items()}


def record_from_mlflow(run: Any) -> RunRecord:
    """A record from an ``mlflow.entities.Run``."""
    tags = run.data.tags
    weights = tags.get(WEIGHTS_TAG, "unknown")
    if tags.get(UNTRAINED_TAG) == "true" and not is_untrained(weights):
        weights = f"random ({weights})"
    params = run.data.metrics.get("model/parameters")
    return RunRecord(
        name=run.info.run_name or run.info.run_id,
        config=dict(run.data.params),
        results=unflatten_metrics(run.data.metrics),
        weights=weights,
        parameters=None if params is None or math.isnan(params) else float(params),
        source=f"mlflow:{run.info.run_id}",
    )


def load_mlflow(source: str, tracking_uri: str) -> tuple[list[RunRecord], str]:
    """Records of an MLflow parent run's children, or of an experiment's finished runs.

    Returns the records and a short name for the report.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if re.fullmatch(r"[0-9a-f]{32}", source):
        parent = client.get_run(source)
        runs = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{source}'",
            max_results=10_000,
        )
        name = parent.info.run_name or source
        if not runs:  # a single run
            runs = [parent]
    else:
        experiment = client.get_experiment_by_name(source)
        if experiment is None:
            raise CraterlabError(
                f"{source!r} is neither a directory, an MLflow run id nor an experiment in "
                f"{tracking_uri}. Pass a multirun directory, a parent run id (32 hex digits) "
                "or an experiment name, and --tracking-uri if the store is elsewhere."
            )
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string="attributes.status = 'FINISHED'",
            max_results=10_000,
        )
        runs = [r for r in runs if r.data.tags.get(ROLE_TAG) != "sweep"]
        name = source
    records = [record_from_mlflow(r) for r in runs if unflatten_metrics(r.data.metrics)]
    if not records:
        raise CraterlabError(f"MLflow {source!r} has no finished runs with retrieval metrics.")
    records.sort(key=lambda r: r.name)
    return records, name
