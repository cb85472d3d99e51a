"""What a run's results are: metric names, the ``results.json`` record and the tag names.

The lowest floor of craterlab: tracking, sweeps, reports and workflows all read it, and it
imports nothing of craterlab. One rule set each:

- Metric names. A run measures metrics per retrieval mode (``{"two_stage": {"R@1": ...}}``)
  plus storage and timings; flat, they are ``mode/metric``, ``storage/...`` and ``time/...``
  (:func:`flatten_metrics`), MLflow spells ``@`` as ``_at_`` (:func:`metric_name`), and
  :func:`split_metrics` is the one decoder (prefixes that are not retrieval modes:
  :data:`NON_MODE_PREFIXES`).
- The record every run writes beside its metrics, ``results.json`` (:class:`ResultsRecord`,
  written by :func:`write_results`, read by :func:`read_results`), so reports and resumed
  sweeps work on a directory without MLflow.
- The tags a run carries (``craterlab.*``) and where runs are logged by default.
- Whether weights are untrained, decided from the weights status (:func:`is_untrained`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
CONFIG_FILE = "resolved_config.yaml"

# ----------------------------------------------------------------------------- tag names

DATASET_TAG = "craterlab.dataset"
BACKBONE_TAG = "craterlab.backbone"
TOKENS_TAG = "craterlab.tokens"
RUN_DIR_TAG = "craterlab.run_dir"
IDENTITY_TAG = "craterlab.config_hash"  # a job's identity (resuming sweeps)
OVERRIDES_TAG = "craterlab.overrides"  # its command-line overrides, as JSON
WEIGHTS_TAG = "craterlab.weights"  # the weights status
UNTRAINED_TAG = "craterlab.untrained_weights"  # "true" for untrained (random) weights
PRECISION_TAG = "craterlab.precision"
ROLE_TAG = "craterlab.role"  # "sweep" on a sweep's parent run
SWEEP_TAG = "craterlab.sweep"  # the sweep directory, on its parent run
PID_TAG, HOST_TAG, END_TAG = "craterlab.pid", "craterlab.host", "craterlab.end_reason"
CHECKPOINT_TAG = "craterlab.checkpoint"  # craterlab.checkpoint.<which>[.sha256|.artifact]

# ----------------------------------------------------------------------------- the store

DEFAULT_STORE = Path("outputs") / "mlflow.db"
DEFAULT_ARTIFACTS = Path("outputs") / "mlartifacts"


def default_uri() -> str:
    """The embedded SQLite store under outputs/ (an absolute path, so cwd doesn't matter)."""
    return f"sqlite:///{DEFAULT_STORE.resolve()}"


# ----------------------------------------------------------------------------- weights


def is_untrained(weights: str | Sequence[Mapping[str, Any]]) -> bool:
    """True when the backbone's weights are untrained (random), however the run got them.

    ``weights`` is a weights status (``random (requested)``, ``random + fine-tuned (...)``,
    ``pretrained ...``) or a lineage (its steps, origin first: untrained when the origin is
    ``random``, through any number of fine-tunings, unless a self-supervised ``pretrain`` step
    trained them: "self-supervised on <data>, from random init" is a trained model). The one
    place this is decided.
    """
    if not isinstance(weights, str):
        return (
            bool(weights)
            and weights[0].get("kind") == "random"
            and not any(step.get("kind") == "pretrain" for step in weights)
        )
    text = weights.strip().lower()
    return text.startswith("random") or "untrained" in text


# ----------------------------------------------------------------------------- metric names

MAX_PARAM_LENGTH = 500  # MLflow 3 accepts 6,000; shorter keeps the UI's tables readable
# First parts of flat metric names that are not retrieval modes.
NON_MODE_PREFIXES = frozenset({"storage", "time", "train", "val", "model", "system", "center"})


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"aggregator.k": "32", ...}; long values are shortened, not dropped."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
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


def flatten_metrics(
    results: Mapping[str, Mapping[str, Any]],
    storage: Mapping[str, Any] | None = None,
    timings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``{"two_stage": {"R@1": .5}}`` (+ storage, timings) -> ``{"two_stage/R@1": .5,
    "storage/...": ..., "time/...": ...}``."""
    flat = {f"{mode}/{k}": v for mode, m in results.items() for k, v in m.items()}
    flat.update({f"storage/{k}": v for k, v in (storage or {}).items()})
    flat.update({f"time/{k}": v for k, v in (timings or {}).items()})
    return flat


def split_metrics(
    metrics: Mapping[str, float],
) -> tuple[dict[str, dict[str, float]], dict[str, float], dict[str, float]]:
    """Flat metric names (as logged, ``two_stage/R_at_1``) -> (results per mode, storage,
    timings); names without a mode and those under :data:`NON_MODE_PREFIXES` are no mode."""
    results: dict[str, dict[str, float]] = {}
    storage: dict[str, float] = {}
    timings: dict[str, float] = {}
    for key, value in metrics.items():
        head, sep, name = key.partition("/")
        if not sep:
            continue
        if head == "storage":
            storage[name] = value
        elif head == "time":
            timings[name] = value
        elif head not in NON_MODE_PREFIXES:
            results.setdefault(head, {})[name.replace("_at_", "@")] = value
    return results, storage, timings


# ----------------------------------------------------------------------------- results.json


@dataclass
class ResultsRecord:
    """What ``results.json`` holds: the run's name, metrics per mode, storage, timings, weights
    status, whether they are untrained and the backbone's parameter count."""

    name: str
    results: dict[str, dict[str, Any]]
    storage: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    weights: str = "unknown"
    untrained: bool | None = None
    """None: decided from ``weights`` (:func:`is_untrained`)."""
    parameters: float | None = None

    def to_json(self) -> str:
        untrained = is_untrained(self.weights) if self.untrained is None else self.untrained
        return json.dumps(
            {
                "name": self.name,
                "results": {m: dict(v) for m, v in self.results.items()},
                "storage": dict(self.storage),
                "timings": dict(self.timings),
                "weights": self.weights,
                "untrained": untrained,
                "parameters": self.parameters,
            },
            indent=1,
            default=float,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], default_name: str = "") -> ResultsRecord:
        """A record from the parsed JSON (missing optional fields get their defaults)."""
        return cls(
            name=str(data.get("name") or default_name),
            results={m: dict(r) for m, r in data["results"].items()},
            storage=dict(data.get("storage") or {}),
            timings=dict(data.get("timings") or {}),
            weights=str(data.get("weights", "unknown")),
            untrained=data.get("untrained"),
            parameters=data.get("parameters"),
        )

    def flat_metrics(self) -> dict[str, float]:
        """``mode/metric`` and ``storage/...`` values that are numbers (for sweep summaries)."""
        flat = flatten_metrics(self.results, self.storage)
        return {k: float(v) for k, v in flat.items() if isinstance(v, int | float)}


def write_results(run_dir: str | Path, record: ResultsRecord) -> Path:
    """Write ``<run_dir>/results.json``; its path."""
    path = Path(run_dir) / RESULTS_FILE
    path.write_text(record.to_json())
    return path


def read_results(run_dir: str | Path) -> ResultsRecord:
    """The record of ``<run_dir>/results.json`` (OSError when missing, ValueError or KeyError
    when it is not one)."""
    path = Path(run_dir) / RESULTS_FILE
    return ResultsRecord.from_dict(json.loads(path.read_text()), Path(run_dir).name)


# ----------------------------------------------------------------------------- finished runs


@dataclass
class FinishedRun:
    """A finished run a tracker found (by identity, to resume a sweep): id, metrics, tags."""

    run_id: str
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)

    def split(self) -> tuple[dict[str, dict[str, float]], dict[str, float], dict[str, float]]:
        """(results per mode, storage, timings) from the flat metric names a run logs."""
        return split_metrics(self.metrics)

    def record(self) -> ResultsRecord:
        """The ``results.json`` record of this run, rebuilt from what the tracker kept."""
        results, storage, timings = self.split()
        return ResultsRecord(
            name=",".join(json.loads(self.tags.get(OVERRIDES_TAG) or "[]")) or self.run_id,
            results=results,
            storage=storage,
            timings=timings,
            weights=self.tags.get(WEIGHTS_TAG, "unknown"),
            untrained=self.tags.get(UNTRAINED_TAG) == "true",
            parameters=self.metrics.get("model/parameters"),
        )
