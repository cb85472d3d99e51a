"""What every run writes for reports: ``results.json`` and the HTML retrieval page.

``results.json`` holds the run's metrics per mode, storage, timings, weights status and
backbone parameter count, so ``python -m craterlab report`` works on a multirun directory
without MLflow. ``results.html`` is the page of :mod:`craterlab.report.pages`. Both are also
logged as MLflow artifacts, and the parameter count as the metric ``model/parameters``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from craterlab.report.pages import build_run_page, config_title
from craterlab.report.runs import run_view
from craterlab.results import ResultsRecord, flatten_config, write_results

log = logging.getLogger("craterlab")
PAGE_FILE = "results.html"


def count_parameters(backbone: Any) -> float | None:
    """Parameters of the backbone's network (its ``model`` attribute, or itself), or None."""
    module = getattr(backbone, "model", backbone)
    parameters = getattr(module, "parameters", None)
    if not callable(parameters):
        return None
    return float(sum(p.numel() for p in parameters()))


def job_name(run_dir: Path) -> str:
    """The job's command-line overrides (Hydra), else the run directory's name."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized() and HydraConfig.get().job.override_dirname:
            return str(HydraConfig.get().job.override_dirname)
    except Exception:  # outside Hydra, or a Hydra without a job config
        pass
    return Path(run_dir).name


def stage_roles(cfg: DictConfig, labels: list[str]) -> tuple[str | None, str | None]:
    """(mode label before reranking, mode label after) among the run's retrieval modes."""
    stages = cfg.retrieval.get("stages") or {}
    names = {label: str(stages[label].name) for label in labels if label in stages}
    before = next((lbl for lbl, n in names.items() if n == "single"), None)
    after = next((lbl for lbl, n in names.items() if n == "two_stage"), None)
    after = after or next((lbl for lbl, n in names.items() if n == "exhaustive"), None)
    return before, after


def write_run_outputs(
    cfg: DictConfig,
    run_dir: Path,
    tracker: Any,
    results: Mapping[str, Mapping[str, float]],
    storage: Mapping[str, float],
    timings: Mapping[str, float],
    weights: str,
    *,
    backbone: Any,
    dataset: Any,
    rankings: Mapping[str, Any],
    features: Mapping[str, Any],
    tokens: tuple[Any, Any],
) -> None:
    """Write (and log) ``results.json`` and, when ``report.page_queries`` > 0, the page."""
    parameters = count_parameters(backbone)
    if parameters is not None:
        tracker.log_metrics({"model/parameters": parameters})
    record = ResultsRecord(
        job_name(run_dir),
        {m: dict(v) for m, v in results.items()},
        dict(storage),
        dict(timings),
        weights,
        parameters=parameters,
    )
    tracker.log_artifact(write_results(run_dir, record))

    n_queries = int(OmegaConf.select(cfg, "report.page_queries", default=6) or 0)
    if n_queries <= 0:
        return
    before, after = stage_roles(cfg, list(rankings))
    try:
        html = build_run_page(
            dataset,
            rankings,
            before=before,
            after=after,
            query_tokens=tokens[0],
            gallery_tokens=tokens[1],
            query_features=features["query"],
            gallery_features=features["gallery"],
            n_queries=n_queries,
            title=_page_title(cfg, dataset, record.name or Path(run_dir).name),
            weights=weights,
        )
    except Exception as exc:  # the page is a view of finished results; never sink the run
        log.warning("The retrieval page was not written: %s: %s", type(exc).__name__, exc)
        return
    page = Path(run_dir) / PAGE_FILE
    page.write_text(html, encoding="utf-8")
    tracker.log_artifact(page)
    log.info("retrieval page: %s", page)


def _page_title(cfg: DictConfig, dataset: Any, name: str) -> str:
    """The page's title: the run's configuration, then its job name."""
    config = OmegaConf.to_container(cfg, resolve=True)
    view = run_view(flatten_config(config if isinstance(config, dict) else {}))
    where = str(getattr(dataset, "name", "") or view.get("dataset", ""))
    size = OmegaConf.select(cfg, "dataset.size", default=None)
    label = f"{where}-{size}" if size and not where.endswith(str(size)) else where
    return f"{config_title(view, label)} — {name}"
