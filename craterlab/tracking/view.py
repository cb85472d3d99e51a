"""What the MLflow UI shows of craterlab's runs: experiment kind, key columns, sweep summaries.

- The experiment is created as a *model-development* experiment (MLflow 3's
  ``mlflow.experimentKind`` tag, "Machine learning" in the UI's experiment list). The UI's
  "GenAI | Model training" switch is kept per browser; :func:`view_url` sets it.
- MLflow chooses no columns by default. Each sweep (and each run) saves a *shared view* of
  the experiment (an ``mlflow.sharedViewState.<key>`` experiment tag, what the UI's "Share"
  button writes) that shows the key columns: per mode mAP, R@1, bytes per image and ms per
  query, and K, quantizer, token method, shortlist, backbone, dataset and the swept keys.
  ``view_url`` is its address; the key ``craterlab`` always holds the latest one.
- A sweep's parent run gets its sweep's constant parameters (same names as its children's),
  the varied ones (``sweep.varied`` and each key's values), the best child per key metric
  (``best/<metric>`` and a ``best/<metric>`` tag naming the child), ``summary.csv`` and the
  children's dataset inputs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"
VIEW_TAG = "mlflow.sharedViewState."
LATEST_VIEW = "craterlab"
MAX_COLUMNS = 40

KEY_METRICS = ("mAP", "R_at_1", "bytes_per_image", "ms_per_query")
"""Per mode; ``bytes_per_image`` and ``ms_per_query`` are better when lower."""
LOWER_IS_BETTER = ("bytes_per_image", "ms_per_query", "latency")
KEY_PARAMS = (
    "dataset.name",
    "backbone.model",
    "pooling.name",
    "selector.name",
    "aggregator.name",
    "k",
    "quantizer.name",
    "shortlist",
)
MODE_ORDER = ("two_stage", "single", "exhaustive")


def column(kind: str, name: str) -> str:
    """The UI's column id: ``metrics.`two_stage/mAP```, ``params.`k```."""
    return f"{kind}.`{name}`"


def key_metric_names(metrics: Iterable[str]) -> list[str]:
    """The key metrics among ``metrics`` (``<mode>/mAP`` ...), the study's modes first."""
    found = [m for m in metrics if m.count("/") == 1 and m.split("/")[1] in KEY_METRICS]
    modes = sorted({m.split("/")[0] for m in found}, key=lambda x: (x not in MODE_ORDER, x))
    order = {m: i for i, m in enumerate(MODE_ORDER)}
    modes.sort(key=lambda m: order.get(m, len(order)))
    return [f"{mode}/{k}" for k in KEY_METRICS for mode in modes if f"{mode}/{k}" in found]


def key_columns(
    metrics: Iterable[str], params: Iterable[str], varied: Sequence[str] = ()
) -> list[str]:
    """Column ids of the key metrics present, the swept keys, then the key params present."""
    params = set(params)
    names = list(dict.fromkeys([*varied, *(p for p in KEY_PARAMS if p in params)]))
    return (
        [column("attributes", "Dataset")]  # the runs' dataset inputs (tracking.datasets)
        + [column("metrics", m) for m in key_metric_names(metrics)]
        + [column("params", p) for p in names if p in params or p in varied]
    )


def save_view(
    client: Any,
    experiment_id: str,
    columns: Sequence[str],
    expanded: Sequence[str] = (),
    key: str = LATEST_VIEW,
    merge: bool = False,
) -> str:
    """Store a shared view (``columns`` shown, ``expanded`` parent runs open); its key.

    ``merge`` adds the columns to the view already stored under ``key`` (a single run keeps
    the sweep's columns and adds its own)."""
    state: dict[str, Any] = {"selectedColumns": list(columns), "runsExpanded": {}}
    if merge:
        experiment = client.get_experiment(experiment_id)
        try:
            old = json.loads(experiment.tags.get(VIEW_TAG + key, "{}"))
        except ValueError:
            old = {}
        state["selectedColumns"] = list(dict.fromkeys([*old.get("selectedColumns", []), *columns]))
        state["runsExpanded"] = dict(old.get("runsExpanded", {}))
    state["selectedColumns"] = state["selectedColumns"][:MAX_COLUMNS]
    state["runsExpanded"].update({run_id: True for run_id in expanded})
    client.set_experiment_tag(experiment_id, VIEW_TAG + key, json.dumps(state))
    return key


def view_url(
    experiment_id: str, key: str = LATEST_VIEW, base: str = "http://127.0.0.1:5000"
) -> str:
    """The ``mlflow ui`` address of a shared view of the experiment's runs table.

    ``workflowType=machine_learning`` is the UI's "Model training" switch: MLflow 3's UI keeps
    that switch per browser (GenAI by default) whatever the experiment's kind."""
    query = f"viewStateShareKey={key}&workflowType=machine_learning"
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def better(metric: str) -> Any:
    """``max`` for accuracies, ``min`` for costs (bytes, milliseconds)."""
    return min if any(k in metric for k in LOWER_IS_BETTER) else max


def split_params(
    children: Sequence[Mapping[str, str]],
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(keys with one value in every child, key -> sorted distinct values of the others)."""
    keys = set().union(*children) if children else set()
    constant, varied = {}, {}
    for key in sorted(keys):
        values = [c.get(key) for c in children]
        distinct = sorted({str(v) for v in values if v is not None})
        if len(distinct) == 1 and None not in values:
            constant[key] = distinct[0]
        else:
            varied[key] = distinct
    return constant, varied


def best_children(children: Sequence[Any], metrics: Sequence[str]) -> dict[str, tuple[float, Any]]:
    """metric -> (best value, child run) among children that logged it (NaN ignored)."""
    out = {}
    for metric in metrics:
        scored = [
            (float(c.data.metrics[metric]), c)
            for c in children
            if metric in c.data.metrics and not math.isnan(float(c.data.metrics[metric]))
        ]
        if scored:
            pick = better(metric)
            value = pick(v for v, _ in scored)
            out[metric] = (value, next(c for v, c in scored if v == value))
    return out


def summarize_sweep(
    client: Any,
    experiment_id: str,
    parent_id: str,
    sweep_dir: str | Path,
    log_batch: Any,
    swept: Sequence[str] = (),
) -> str:
    """Log the sweep's summary onto its parent run (see the module docstring); the view key.

    ``log_batch(params=..., metrics=..., tags=...)`` logs onto the parent (the tracker's
    guarded call, so trouble is reported, never raised); ``swept``: the override keys the
    sweep varied (a config group stands for its ``<group>.name`` column)."""
    import time

    from mlflow.entities import Metric, Param, RunTag

    children = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    if not children:
        return ""
    constant, varied = split_params([c.data.params for c in children])
    varied = {k: v for k, v in varied.items() if not launch_local(k)}
    all_params = set().union(*(c.data.params for c in children))
    swept = [k for k in swept if not launch_local(k)]
    shown = [k if k in all_params else f"{k}.name" for k in swept]
    metric_names = sorted(set().union(*(c.data.metrics for c in children)))
    best = best_children(children, key_metric_names(metric_names))
    params = [Param(k, v) for k, v in constant.items()]
    params.append(Param("sweep.varied", ",".join(swept) or ",".join(varied) or "(nothing)"))
    params += [Param(f"sweep.values.{k}", "|".join(v)[:500]) for k, v in varied.items()]
    params.append(Param("sweep.runs", str(len(children))))
    now = int(time.time() * 1000)
    metrics = [Metric(f"best/{m}", v, now, 0) for m, (v, _) in best.items()]
    tags = [
        RunTag(f"best/{m}", f"{c.info.run_name} ({c.info.run_id})") for m, (_, c) in best.items()
    ]
    for i in range(0, len(params), 100):
        log_batch(params=params[i : i + 100])
    log_batch(metrics=metrics, tags=tags)
    summary = Path(sweep_dir) / "summary.csv"
    if summary.is_file():
        client.log_artifact(parent_id, str(summary))
    inputs = [d for c in children for d in (c.inputs.dataset_inputs if c.inputs else [])]
    unique = {(d.dataset.name, d.dataset.digest, _context(d)): d for d in inputs}
    if unique:
        client.log_inputs(parent_id, datasets=list(unique.values()))
    columns = key_columns(metric_names, all_params, [k for k in shown if k in all_params])
    key = f"sweep-{parent_id[:8]}"
    save_view(client, experiment_id, columns, [parent_id], key=key)
    save_view(client, experiment_id, columns, [parent_id])
    url = view_url(experiment_id, key)
    client.set_tag(
        parent_id,
        "mlflow.note.content",
        f"Sweep of {len(children)} runs varying {', '.join(swept) or 'nothing'}; its key "
        f"columns: {url} (with `mlflow ui` on port 5000). Best per metric: the `best/*` "
        "metrics and tags; the table and figures: the report/ artifacts.",
    )
    return key


def _context(d: Any) -> str:
    return next((t.value for t in d.tags if t.key == "mlflow.data.context"), "")


LAUNCH_LOCAL = re.compile(
    r"^(cache|tracking|hydra|device|num_workers|batch_size|output_dir|extract)(\.|$)"
)
"""Settings of where and how a job runs, not of what it measures: never in run names."""


def launch_local(override: str) -> bool:
    """Whether an override (``cache.dir=/scratch``) or key only says where or how a job runs."""
    return bool(LAUNCH_LOCAL.match(override.partition("=")[0].lstrip("+~")))
