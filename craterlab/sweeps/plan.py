"""Budget planner: ``python -m craterlab plan --bytes-per-image B --ms-per-query T``.

Reads the measured runs of an MLflow experiment (FINISHED job runs, not sweep parents). Each
retrieval mode of each run is one candidate: (mAP, bytes per image, ms per query), described by
K, quantizer, aggregator (the selector when ``aggregator=none``), S (two-stage only), the
backbone, its weights status and the dataset (name and size). Runs on different datasets are
never ranked together: it prints one Pareto front per dataset (no other candidate has higher
or equal mAP with no more bytes and no more time, and is better in one of them), and chooses
only within one dataset (``--dataset``, needed when the runs span several): the best
candidate within the budget (highest mAP; ties go to fewer bytes, then less time), as the
command line that runs it: the run's recorded overrides, with ``retrieval=`` set to the mode.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from craterlab.errors import CraterlabError
from craterlab.plugins import config_dir
from craterlab.results import (
    OVERRIDES_TAG,
    ROLE_TAG,
    UNTRAINED_TAG,
    WEIGHTS_TAG,
    is_untrained,
)

MODES_WITH_SHORTLIST = ("two_stage", "muvera", "token_ivf")
"""Stages that rerank a top-S shortlist: the pooled-vector one and the multi-vector
candidate generators (their bytes per image include the generator's index)."""
RUN_LOCAL_PREFIXES = ("tracking.", "hydra.", "output_dir", "cache.", "resume")


@dataclass
class Candidate:
    """One retrieval mode of one measured run."""

    run_id: str
    mode: str
    map: float
    bytes_per_image: float
    ms_per_query: float
    setting: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    def dominates(self, other: Candidate) -> bool:
        no_worse = (
            self.map >= other.map
            and self.bytes_per_image <= other.bytes_per_image
            and self.ms_per_query <= other.ms_per_query
        )
        better = (
            self.map > other.map
            or self.bytes_per_image < other.bytes_per_image
            or self.ms_per_query < other.ms_per_query
        )
        return no_worse and better

    def command(self) -> str:
        """The command line that runs this candidate again."""
        keep = [
            o
            for o in self.overrides
            if not o.lstrip("+~").startswith(RUN_LOCAL_PREFIXES) and not o.startswith("retrieval=")
        ]
        retrieval = [f"retrieval={self.mode}"] if retrieval_option(self.mode) else []
        return " ".join(["python -m craterlab", *map(shlex.quote, keep + retrieval)])


def retrieval_option(mode: str) -> bool:
    """Whether ``retrieval=<mode>`` is a config option (conf/retrieval/<mode>.yaml)."""
    return (Path(config_dir()) / "retrieval" / f"{mode}.yaml").is_file()


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other candidate dominates, by mAP (best first)."""
    front = [c for c in candidates if not any(o.dominates(c) for o in candidates)]
    return sorted(front, key=lambda c: (-c.map, c.bytes_per_image, c.ms_per_query))


def best_within(
    candidates: Sequence[Candidate], bytes_per_image: float, ms_per_query: float
) -> Candidate | None:
    """The highest-mAP candidate within both budgets (ties: fewer bytes, then less time)."""
    fits = [
        c
        for c in candidates
        if c.bytes_per_image <= bytes_per_image and c.ms_per_query <= ms_per_query
    ]
    return min(fits, key=lambda c: (-c.map, c.bytes_per_image, c.ms_per_query), default=None)


def candidates_of_run(run: Any) -> list[Candidate]:
    """The candidates of one MLflow run (one per mode that logged mAP, bytes and time)."""
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    aggregator = params.get("aggregator.name", "")
    method = aggregator if aggregator not in ("", "none") else f"{params.get('selector.name')}"
    try:
        overrides = json.loads(tags.get(OVERRIDES_TAG) or "null")
    except ValueError:
        overrides = None
    if not isinstance(overrides, list):  # runs logged before the tag: the run name
        overrides = [o for o in (run.info.run_name or "").split(",") if "=" in o]
    out = []
    modes = {k.partition("/")[0] for k in metrics if k.endswith("/mAP")}
    for mode in sorted(modes):
        values = [metrics.get(f"{mode}/{m}") for m in ("mAP", "bytes_per_image", "ms_per_query")]
        if any(v is None or not math.isfinite(v) for v in values):
            continue
        size = params.get("dataset.size")
        dataset = params.get("dataset.name", "?")
        weights = tags.get(WEIGHTS_TAG, "unknown")
        untrained = tags.get(UNTRAINED_TAG) == "true" or is_untrained(weights)
        setting = {
            "dataset": dataset if size in (None, "", "None") else f"{dataset}-{size}",
            "weights": "untrained" if untrained else weights.split(" (")[0] or "unknown",
            "backbone": params.get("backbone.model", params.get("backbone.name", "")),
            "K": params.get("k", ""),
            "quantizer": quantizer_label(params),
            "tokens": method,
            "S": params.get("shortlist", "") if mode in MODES_WITH_SHORTLIST else "-",
        }
        out.append(Candidate(run.info.run_id, mode, *values, setting, list(overrides)))  # type: ignore[arg-type]
    return out


def read_candidates(uri: str, experiment: str, timeout_s: float) -> list[Candidate]:
    """:func:`load_candidates` through the experiments' tracking path: every store call under
    ``timeout_s`` (an unreachable server is not a hang), a locked SQLite store retried, and any
    failure one paragraph naming the store (never MLflow's or SQLAlchemy's traceback)."""
    import os

    from craterlab.tracking.mlflow import call_with_timeout, retry_locked

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(math.ceil(timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        return retry_locked(
            lambda: call_with_timeout(
                lambda: load_candidates(uri, experiment), timeout_s, "reading measured runs"
            )
        )
    except CraterlabError:
        raise
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        first = lines[0][:300] if lines else type(exc).__name__
        raise CraterlabError(
            f"Could not read the MLflow store {uri}: {first}. Check --tracking-uri (a server "
            "that is running and reachable, or a sqlite:///path/to/mlflow.db file that MLflow "
            "wrote) and try again; --timeout-s sets how long to wait for an answer."
        ) from None


def quantizer_label(params: dict[str, str]) -> str:
    """The quantizer as its config option names it: residual stores with their bits
    (``residual2``), PQ with its sub-quantizers (``pq48``), the others by name."""
    name = params.get("quantizer.name", "")
    if name == "residual":
        return f"residual{params.get('quantizer.nbits', '')}"
    if name == "pq" and params.get("quantizer.m"):
        return f"pq{params['quantizer.m']}"
    return name


def group_by_dataset(candidates: Sequence[Candidate]) -> dict[str, list[Candidate]]:
    """Candidates per dataset (name and size), in name order: fronts never mix datasets."""
    groups: dict[str, list[Candidate]] = {}
    for c in sorted(candidates, key=lambda c: c.setting.get("dataset", "?")):
        groups.setdefault(c.setting.get("dataset", "?"), []).append(c)
    return groups


def load_candidates(uri: str, experiment: str) -> list[Candidate]:
    """Every candidate of the experiment's FINISHED job runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise CraterlabError(
            f"The MLflow store {uri} has no experiment {experiment!r}. Run experiments first "
            "(python -m craterlab -m k=16,32 quantizer=fp32,int8), or point the planner at "
            "your store and experiment with --tracking-uri and --experiment."
        )
    runs = client.search_runs(
        [found.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=50000
    )
    out = []
    for run in runs:
        if run.data.tags.get(ROLE_TAG) != "sweep":
            out.extend(candidates_of_run(run))
    return out
