"""One experiment: dataset -> backbone -> features -> vectors / tokens -> store -> stages.

Every component comes from the registry, built from its config group before any expensive
work, so a config mistake fails in a second, not after feature extraction.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from craterlab.backbones.lineage import (
    lineage_of,
    lineage_params,
    record_checkpoints,
)
from craterlab.checks import check_run_settings
from craterlab.devices import resolve_device
from craterlab.pipeline import (
    Representation,
    build_components,
    encode,
    represent,
    search_and_evaluate,
)
from craterlab.plugins import get_manager, get_registry
from craterlab.registry import Registry
from craterlab.report.outputs import write_run_outputs
from craterlab.report.tables import format_run_table
from craterlab.results import (
    BACKBONE_TAG,
    DATASET_TAG,
    PRECISION_TAG,
    RUN_DIR_TAG,
    TOKENS_TAG,
    UNTRAINED_TAG,
    WEIGHTS_TAG,
    flatten_metrics,
    is_untrained,
)
from craterlab.retrieval.index import EncodedGallery
from craterlab.retrieval.vector_index import Stage1Settings
from craterlab.sweeps.report import child_run_name
from craterlab.sweeps.resume import identity_tags, previous_run, record_skip
from craterlab.sweeps.shards import run_extract_shard, shard_of
from craterlab.tracking.base import Tracker, tracked_run
from craterlab.tracking.view import launch_local
from craterlab.train.config import validate_train_config
from craterlab.train.finetune import best_checkpoint, finetune, finetune_dir
from craterlab.types import Backbone, CraterDataset, Ranking, StageReport

log = logging.getLogger("craterlab")


@dataclass
class RunResult:
    """What a run measured: metrics per retrieval mode, storage and timing, how weights loaded."""

    results: dict[str, dict[str, float]]
    storage: dict[str, float]
    timings: dict[str, float]
    weights_status: str
    run_dir: Path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(cfg: DictConfig) -> RunResult:
    """Run one configured experiment and return (and log) what it measured: build, encode,
    represent, search and evaluate (:mod:`craterlab.pipeline`), then report."""
    registry, pm = get_registry(), get_manager()
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    run_dir = Path(str(cfg.get("output_dir") or "outputs/runs/latest"))
    run_dir.mkdir(parents=True, exist_ok=True)
    check_run_settings(cfg)
    seed = int(cfg.seed)
    seed_everything(seed)
    device = resolve_device(str(cfg.device))
    if shard_of(cfg) is not None:  # extract.shard=i: this job only extracts one shard
        return RunResult({}, {}, run_extract_shard(cfg, device), "n/a", run_dir)
    if (done := previous_run(config)) is not None:  # resume: this job already finished
        record_skip(run_dir, done, config)
        return RunResult(*done.split(), done.tags.get(WEIGHTS_TAG, "unknown"), run_dir)

    parts = build_components(cfg, registry, seed)
    validate_train_config(cfg.train)
    backbone_name = str(cfg.backbone.get("model") or cfg.backbone.name)
    tags = {
        DATASET_TAG: str(cfg.dataset.name),
        BACKBONE_TAG: backbone_name,
        TOKENS_TAG: parts.token_method,
        RUN_DIR_TAG: str(run_dir),
        **identity_tags(config),  # how a relaunched sweep recognizes this job (resume)
    }
    tracking = dict(config.get("tracking") or {})
    tracking["run_name"] = tracking.get("run_name") or _run_name(
        cfg, backbone_name, parts.token_method
    )
    with tracked_run(tracking, tags) as tracker:
        tracker.log_params(config)
        tracker.log_datasets(parts.dataset, config.get("dataset") or {})
        _save_config(cfg, run_dir, tracker)
        pm.hook.run_started(config=config, run_dir=str(run_dir), tracker=tracker)
        backbone = parts.backbone
        if cfg.train.name != "none":
            backbone = _finetune(cfg, registry, backbone, parts.dataset, device, tracker)
        weights = _record_weights(backbone, tracker)
        backbone = backbone.to(device)
        # The forward precision actually used on this device (precision=auto resolved).
        tracker.set_tags({PRECISION_TAG: str(backbone.identity().get("precision", "?"))})

        features, timings = encode(backbone, parts.dataset, cfg, device)
        rep = represent(parts, features, device, str(cfg.pooling.name))
        timings["tokens_seconds"] = rep.seconds
        evaluation = search_and_evaluate(parts, rep, cfg.depth, seed)
        results = evaluation.results
        if cfg.get("save_index"):
            built_by = {
                "dataset": str(cfg.dataset.name),
                "backbone": backbone_name,
                "weights": weights,
                "pooling": str(cfg.pooling.name),
                "tokens": parts.token_method,
                "k": int(cfg.k),
                "quantizer": str(cfg.quantizer.name),
            }
            _save_index(parts.dataset, rep, run_dir, evaluation.reports, built_by)

        tracker.log_metrics(flatten_metrics(results, rep.storage, timings))
        _save_rankings(evaluation.rankings, parts.dataset, run_dir, tracker)
        write_run_outputs(
            cfg, run_dir, tracker, results, rep.storage, timings, weights, backbone=backbone,
            dataset=parts.dataset, rankings=evaluation.rankings, features=features,
            tokens=(rep.query_tokens, rep.gallery_tokens),
        )  # fmt: skip
        print(format_results(results, weights, backbone_name, parts.token_method))
        pm.hook.run_finished(config=config, run_dir=str(run_dir), results=results, tracker=tracker)
    if summary := tracker.summary():
        print(summary)
    return RunResult(results, rep.storage, timings, weights, run_dir)


def _record_weights(backbone: Backbone, tracker: Tracker) -> str:
    """Tag and log where the backbone's weights came from (through any fine-tuning); warn
    loudly when they are untrained. Returns the weights status."""
    weights = str(getattr(backbone, "weights_status", "unknown"))
    lineage = lineage_of(backbone)  # origin and every fine-tuning step of these weights
    tracker.set_tags({WEIGHTS_TAG: weights})
    tracker.log_params(lineage_params(lineage, weights))
    if is_untrained(weights) or is_untrained(lineage):
        tracker.set_tags({UNTRAINED_TAG: "true"})
        log.warning("Backbone weights: %s. These numbers are NOT a pretrained model's.", weights)
    else:
        log.info("Backbone weights: %s", weights)
    return weights


def _run_name(cfg: DictConfig, backbone: str, tokens: str) -> str:
    """A readable MLflow run name: the job's command-line overrides, else what it ran."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()  # in a sweep, only the overrides the sweep varies
        task = list(hydra_cfg.overrides.task)
        overrides = child_run_name(task) or ",".join(o for o in task if not launch_local(o))
        if overrides:
            return overrides
    return f"{cfg.dataset.name} {backbone} {tokens} k={cfg.k}"


def format_results(
    results: Mapping[str, Mapping[str, float]], weights: str, backbone: str, tokens: str
) -> str:
    """The results table printed at the end of a run (see :mod:`craterlab.report.tables`)."""
    return format_run_table(results, weights, backbone, tokens)


def _save_config(cfg: DictConfig, run_dir: Path, tracker: Tracker) -> None:
    path = run_dir / "resolved_config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker.log_artifact(path)


def _save_rankings(rankings: dict[str, Ranking], dataset: Any, run_dir: Path, tracker: Tracker):
    """Top-10 gallery image ids per query and mode, as JSON (for inspection and diffing)."""
    gallery = [r.image_id for r in dataset.records("gallery")]
    queries = [r.image_id for r in dataset.records("query")]
    out = {
        mode: {
            q: [gallery[i] for i in row[:10].tolist() if i >= 0]
            for q, row in zip(queries, ranking.indices, strict=True)
        }
        for mode, ranking in rankings.items()
    }
    path = run_dir / "rankings.json"
    path.write_text(json.dumps(out))
    tracker.log_artifact(path)


def _save_index(
    dataset: Any,
    rep: Representation,
    run_dir: Path,
    reports: Mapping[str, StageReport],
    built_by: dict[str, Any],
) -> None:
    """Write the gallery (ids, stage-1 index with the run's stage-1 settings, token store, what
    built it) so it can be queried without the backbone:
    ``EncodedGallery.load(dir).search(...)``."""
    stage1 = next((r.stage1 for r in reports.values() if r.stage1 is not None), None)
    index = EncodedGallery(
        [r.image_id for r in dataset.records("gallery")],
        rep.gallery_vectors,
        rep.store,
        stage1=Stage1Settings.from_dict(stage1 or {}),
        metadata=built_by,
    )
    index.save(run_dir / "index")
    log.info("gallery index saved to %s", run_dir / "index")


def _finetune(
    cfg: DictConfig,
    registry: Registry,
    backbone: Backbone,
    dataset: CraterDataset,
    device: torch.device,
    tracker: Tracker,
) -> Backbone:
    """Fine-tune the backbone on the train split, record its checkpoints in the run, then
    rebuild the backbone from the last one (its lineage sidecar carries the weights' origin)."""
    train_cfg = OmegaConf.to_container(cfg.train, resolve=True)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def on_validation(step: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics({f"val/{k.removeprefix('val_')}": v for k, v in metrics.items()}, step)

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        log.info("fine-tune epoch %d: %s", epoch, metrics)
        tracker.log_metrics({f"train/epoch_{k}": v for k, v in metrics.items()}, step=epoch)

    checkpoint = finetune(
        train_cfg,
        backbone,
        dataset,
        device=device,
        seed=int(cfg.seed),
        out_dir=finetune_dir(Path("outputs") / "finetune", cfg.train, backbone, dataset, cfg.seed),
        on_epoch_end=on_epoch_end,
        on_step=on_step,
        on_validation=on_validation,
        run_id=tracker.run_id,
    )
    record_checkpoints(
        tracker,
        {"last": checkpoint, "best": best_checkpoint(checkpoint)},
        mode=str(cfg.train.get("log_checkpoints", "auto")),
        max_mb=float(cfg.train.get("artifact_max_mb", 100.0)),
        staging=Path(str(cfg.get("output_dir") or "outputs/runs/latest")) / "checkpoints",
    )
    backbone_cfg = OmegaConf.to_container(cfg.backbone, resolve=True)
    backbone_cfg["weights"] = str(checkpoint)
    return registry.build("backbone", backbone_cfg, seed=int(cfg.seed))
