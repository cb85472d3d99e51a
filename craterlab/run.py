"""One experiment: dataset -> backbone -> features -> vectors / tokens -> store -> stages.

Every component comes from the registry, built from its config group before any expensive
work, so a config mistake fails in a second, not after feature extraction.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from craterlab.backbones.extract import extract_features
from craterlab.checks import (
    check_features,
    check_run_settings,
    check_scores,
    check_tokens,
    check_vectors,
)
from craterlab.devices import resolve_device
from craterlab.errors import ConfigError
from craterlab.metrics import confidence_intervals, evaluate, resolve_depth
from craterlab.plugins import get_manager, get_registry
from craterlab.registry import Registry
from craterlab.report.outputs import write_run_outputs
from craterlab.report.sweep import child_run_name
from craterlab.report.tables import format_run_table
from craterlab.retrieval.index import GalleryIndex
from craterlab.retrieval.vector_index import Stage1Settings
from craterlab.sweeps.resume import identity_tags, previous_run, record_skip
from craterlab.sweeps.shards import run_extract_shard, shard_of
from craterlab.tracking import Tracker, tracked_run
from craterlab.train.config import validate_train_config
from craterlab.train.finetune import best_checkpoint, finetune, finetune_dir
from craterlab.train.lineage import (
    is_untrained,
    lineage_of,
    lineage_params,
    record_checkpoints,
)
from craterlab.types import (
    Backbone,
    CraterDataset,
    Features,
    Fittable,
    Ranking,
    RetrievalInputs,
    StageReport,
    Tokens,
)

log = logging.getLogger("craterlab")

TOKEN_BATCH = 64  # images per token-method call (memory-bound: batches of ~32-64 beat 250)


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


def apply_batched(
    fn: Callable[[Features], Any], features: Features, device: torch.device, batch: int
) -> Any:
    """Apply a token method to features in float32 chunks on ``device``; results on CPU."""
    outputs = []
    for start in range(0, len(features), batch):
        chunk = features[start : start + batch].to(device, torch.float32)
        outputs.append(fn(chunk))
    if not outputs:
        raise ConfigError("There are no images to process: the dataset split is empty.")
    if isinstance(outputs[0], Tokens):
        masks = [o.mask for o in outputs]
        mask = (
            None
            if all(m is None for m in masks)
            else torch.cat(
                [
                    m.cpu() if m is not None else torch.ones(o.vectors.shape[:2], dtype=torch.bool)
                    for o, m in zip(outputs, masks, strict=True)
                ]
            )
        )
        return Tokens(torch.cat([o.vectors.cpu() for o in outputs]), mask)
    return torch.cat([o.cpu() for o in outputs])


def run(cfg: DictConfig) -> RunResult:
    """Run one configured experiment and return (and log) what it measured."""
    registry = get_registry()
    pm = get_manager()
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
        record_skip(run_dir, done)
        return RunResult(*done.split(), done.tags.get("craterlab.weights", "unknown"), run_dir)

    # Build every component first: config mistakes surface before any expensive work.
    dataset = registry.build("dataset", cfg.dataset, seed=seed)
    pooling = registry.build("pooling", cfg.pooling, seed=seed)
    selector = registry.build("selector", cfg.selector, seed=seed)
    aggregator = registry.build("aggregator", cfg.aggregator, seed=seed)
    matcher = registry.build("matcher", cfg.matcher, seed=seed)
    quantizer = registry.build(  # cache_dir: where a PQ codebook is kept for the sweep
        "quantizer", cfg.quantizer, seed=seed, cache_dir=_cache_dir(cfg)
    )
    stages = {
        label: registry.build("stage", stage_cfg, seed=seed)
        for label, stage_cfg in (cfg.retrieval.get("stages") or {}).items()
    }
    if not stages:
        raise ConfigError("retrieval.stages is empty: choose retrieval=all, single, ... ")
    tokenizer = selector if aggregator is None else aggregator
    token_method = cfg.selector.name if aggregator is None else cfg.aggregator.name
    backbone = registry.build("backbone", cfg.backbone, seed=seed)
    validate_train_config(cfg.train)

    backbone_name = str(cfg.backbone.get("model") or cfg.backbone.name)
    tags = {
        "craterlab.dataset": str(cfg.dataset.name),
        "craterlab.backbone": backbone_name,
        "craterlab.tokens": str(token_method),
        "craterlab.run_dir": str(run_dir),
        **identity_tags(config),  # how a relaunched sweep recognizes this job (resume)
    }
    tracking = dict(config.get("tracking") or {})
    tracking["run_name"] = tracking.get("run_name") or _run_name(cfg, backbone_name, token_method)
    with tracked_run(tracking, tags) as tracker:
        tracker.log_params(config)
        _save_config(cfg, run_dir, tracker)
        pm.hook.run_started(config=config, run_dir=str(run_dir), tracker=tracker)

        if cfg.train.name != "none":
            backbone = _finetune(cfg, registry, backbone, dataset, device, tracker)
        weights = str(getattr(backbone, "weights_status", "unknown"))
        lineage = lineage_of(backbone)  # origin and every fine-tuning step of these weights
        tracker.set_tags({"craterlab.weights": weights})
        tracker.log_params(lineage_params(lineage, weights))
        if weights.startswith("random") or is_untrained(lineage):
            tracker.set_tags({"craterlab.untrained_weights": "true"})
            log.warning(
                "Backbone weights: %s. These numbers are NOT a pretrained model's.", weights
            )
        else:
            log.info("Backbone weights: %s", weights)

        backbone = backbone.to(device)
        # The forward precision actually used on this device (precision=auto resolved).
        precision = str(backbone.identity().get("precision", "unknown"))
        tracker.set_tags({"craterlab.precision": precision})
        features: dict[str, Features] = {}
        timings: dict[str, float] = {}
        for split in ("gallery", "query"):
            feats, info = extract_features(
                backbone,
                dataset,
                split,
                device=device,
                batch_size=int(cfg.batch_size),
                num_workers=int(cfg.num_workers),
                cache_dir=str(cfg.cache.dir) if cfg.cache.enabled else None,
            )
            check_features(feats, split)
            features[split] = feats
            timings[f"encode_{split}_seconds"] = float(info.seconds)
            timings[f"encode_{split}_cache_hit"] = float(info.cache_hit)
            log.info(
                "%s: %d images, %s in %.1f s",
                split,
                len(feats),
                "feature cache hit" if info.cache_hit else "encoded",
                info.seconds,
            )

        gallery, query = features["gallery"], features["query"]
        for component in (pooling, tokenizer):
            if isinstance(component, Fittable):
                component.fit(gallery)

        t0 = time.perf_counter()
        g_vectors = apply_batched(pooling, gallery, device, TOKEN_BATCH)
        q_vectors = apply_batched(pooling, query, device, TOKEN_BATCH)
        g_tokens = apply_batched(tokenizer, gallery, device, TOKEN_BATCH)
        q_tokens = apply_batched(tokenizer, query, device, TOKEN_BATCH)
        timings["tokens_seconds"] = time.perf_counter() - t0
        for split, vecs, toks in (("gallery", g_vectors, g_tokens), ("query", q_vectors, q_tokens)):
            check_vectors(vecs, split, f"pooling ({cfg.pooling.name})")
            check_tokens(toks, split, f"tokens ({token_method})")
        quantizer.fit(g_tokens)
        store = quantizer.encode(g_tokens)
        storage = {
            "tokens_per_image": float(g_tokens.vectors.shape[1]),
            "token_bytes_per_image": float(store.bytes_per_image()),
            "token_store_bytes": float(store.nbytes),
            "vector_bytes_per_image": float(g_vectors.shape[1] * g_vectors.element_size()),
        }

        gallery_ids = [r.crater_id for r in dataset.records("gallery")]
        relevant = [r.relevant_ids for r in dataset.records("query")]
        inputs = RetrievalInputs(
            query_vectors=q_vectors,
            gallery_vectors=g_vectors,
            query_tokens=q_tokens,
            gallery_store=store,
            matcher=matcher,
            depth=resolve_depth(cfg.depth, len(gallery_ids)),
        )
        results: dict[str, dict[str, float]] = {}
        rankings: dict[str, Ranking] = {}
        reports: dict[str, StageReport] = {}
        for label, stage in stages.items():
            log.info("retrieval: %s", label)
            ranking = stage.search(inputs)
            check_scores(ranking, label)
            evaluation = evaluate(
                ranking.indices, gallery_ids, relevant, shortlist=ranking.shortlist
            )
            metrics = dict(evaluation.metrics)
            metrics.update(confidence_intervals(evaluation, seed=seed))
            metrics.update(depth=float(inputs.depth), gallery_size=float(len(gallery_ids)))
            # A stage without its own report (a plugin) is charged vectors + tokens.
            report = ranking.stage_report(
                default_bytes=storage["vector_bytes_per_image"] + storage["token_bytes_per_image"]
            )
            metrics.update({k: float(v) for k, v in ranking.extra.items()})
            metrics.update(report.metrics())  # latencies, ms_per_query, bytes_per_image
            results[label], rankings[label], reports[label] = metrics, ranking, report
        _recovery(results, reports)
        if cfg.get("save_index"):
            built_by = {
                "dataset": str(cfg.dataset.name),
                "backbone": backbone_name,
                "weights": weights,
                "pooling": str(cfg.pooling.name),
                "tokens": str(token_method),
                "k": int(cfg.k),
                "quantizer": str(cfg.quantizer.name),
            }
            _save_index(dataset, g_vectors, store, run_dir, reports, built_by)

        flat = {f"{mode}/{k}": v for mode, m in results.items() for k, v in m.items()}
        flat.update({f"storage/{k}": v for k, v in storage.items()})
        flat.update({f"time/{k}": v for k, v in timings.items()})
        tracker.log_metrics(flat)
        _save_rankings(rankings, dataset, run_dir, tracker)
        write_run_outputs(
            cfg, run_dir, tracker, results, storage, timings, weights, backbone=backbone,
            dataset=dataset, rankings=rankings, features=features, tokens=(q_tokens, g_tokens),
        )  # fmt: skip
        print(format_results(results, weights, backbone_name, token_method))
        pm.hook.run_finished(config=config, run_dir=str(run_dir), results=results, tracker=tracker)
    if summary := tracker.summary():
        print(summary)
    return RunResult(results, storage, timings, weights, run_dir)


def _run_name(cfg: DictConfig, backbone: str, tokens: str) -> str:
    """A readable MLflow run name: the job's command-line overrides, else what it ran."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()  # in a sweep, only the overrides the sweep varies
        overrides = child_run_name(list(hydra_cfg.overrides.task)) or hydra_cfg.job.override_dirname
        if overrides:
            return overrides
    return f"{cfg.dataset.name} {backbone} {tokens} k={cfg.k}"


def _recovery(results: dict[str, dict[str, float]], reports: Mapping[str, StageReport]) -> None:
    """``mAP_recovered``: the share of the reference stage's mAP (exhaustive late interaction)
    that each stage reporting ``recovers_reference`` (two-stage) reaches."""
    reference = next((label for label, r in reports.items() if r.reference), None)
    if reference is None or results[reference].get("mAP", 0) <= 0:
        return
    full = results[reference]["mAP"]
    for label, report in reports.items():
        if report.recovers_reference:
            results[label]["mAP_recovered"] = results[label]["mAP"] / full


def _cache_dir(cfg: DictConfig) -> str | None:
    """The feature cache dir, or None when caching is off."""
    return str(cfg.cache.dir) if cfg.cache.enabled else None


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
    vectors: torch.Tensor,
    store: Any,
    run_dir: Path,
    reports: Mapping[str, StageReport],
    built_by: dict[str, Any],
) -> None:
    """Write the gallery (ids, stage-1 index with the run's stage-1 settings, token store, what
    built it) so it can be queried without the backbone: ``GalleryIndex.load(dir).search(...)``."""
    stage1 = next((r.stage1 for r in reports.values() if r.stage1 is not None), None)
    index = GalleryIndex(
        [r.image_id for r in dataset.records("gallery")],
        vectors,
        store,
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
