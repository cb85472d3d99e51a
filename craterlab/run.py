"""One experiment: dataset -> backbone -> features -> vectors / tokens -> store -> stages.

Every component comes from the registry, built from its config group before any expensive
work, so a config mistake fails in a second, not after feature extraction.
"""

from __future__ import annotations

import json
import logging
import math
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
from craterlab.devices import resolve_device
from craterlab.errors import ConfigError
from craterlab.metrics import evaluate
from craterlab.plugins import get_manager, get_registry
from craterlab.registry import Registry
from craterlab.retrieval.index import GalleryIndex
from craterlab.tracking import Tracker, tracked_run
from craterlab.train.config import validate_train_config
from craterlab.train.finetune import finetune, finetune_dir
from craterlab.types import (
    Backbone,
    CraterDataset,
    Features,
    Fittable,
    Ranking,
    RetrievalInputs,
    Tokens,
)

log = logging.getLogger("craterlab")

TOKEN_BATCH = 64  # images per token-method call (memory-bound; see MEASUREMENTS.md)


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


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else math.nan


def stage_timings(ranking: Ranking) -> dict[str, float]:
    """p50/p95 per-query latency of each timed part of a stage, and their total mean."""
    out: dict[str, float] = {}
    for part, values in ranking.timings_ms.items():
        out[f"latency_{part}_p50_ms"] = percentile(values, 50)
        out[f"latency_{part}_p95_ms"] = percentile(values, 95)
    timings = ranking.timings_ms
    if "total" in timings:  # a stage that times its parts also reports their sum
        out["ms_per_query"] = float(np.mean(timings["total"])) if timings["total"] else math.nan
    else:
        parts = [v for k, v in timings.items() if not k.endswith("_single") and v]
        out["ms_per_query"] = float(sum(np.mean(v) for v in parts)) if parts else math.nan
    return out


def run(cfg: DictConfig) -> RunResult:
    """Run one configured experiment and return (and log) what it measured."""
    registry = get_registry()
    pm = get_manager()
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    run_dir = Path(str(cfg.get("output_dir") or "outputs/runs/latest"))
    run_dir.mkdir(parents=True, exist_ok=True)
    seed = int(cfg.seed)
    seed_everything(seed)
    device = resolve_device(str(cfg.device))

    # Build every component first: config mistakes surface before any expensive work.
    dataset = registry.build("dataset", cfg.dataset, seed=seed)
    pooling = registry.build("pooling", cfg.pooling, seed=seed)
    selector = registry.build("selector", cfg.selector, seed=seed)
    aggregator = registry.build("aggregator", cfg.aggregator, seed=seed)
    matcher = registry.build("matcher", cfg.matcher, seed=seed)
    quantizer = registry.build("quantizer", cfg.quantizer, seed=seed)
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
    }
    tracking = dict(config.get("tracking") or {})
    tracking["run_name"] = tracking.get("run_name") or _run_name(cfg, backbone_name, token_method)
    with tracked_run(tracking, tags) as tracker:
        tracker.log_params(config)
        _save_config(cfg, run_dir, tracker)
        pm.hook.run_started(config=config, run_dir=str(run_dir))

        if cfg.train.name != "none":
            backbone = _finetune(cfg, registry, backbone, dataset, device, tracker)
        weights = str(getattr(backbone, "weights_status", "unknown"))
        tracker.set_tags({"craterlab.weights": weights})
        if weights.startswith("random"):
            tracker.set_tags({"craterlab.untrained_weights": "true"})
            log.warning(
                "Backbone weights: %s. These numbers are NOT a pretrained model's.", weights
            )
        else:
            log.info("Backbone weights: %s", weights)

        backbone = backbone.to(device)
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
            depth=min(int(cfg.depth), len(gallery_ids)),
        )
        results: dict[str, dict[str, float]] = {}
        rankings: dict[str, Ranking] = {}
        for label, stage in stages.items():
            log.info("retrieval: %s", label)
            ranking = stage.search(inputs)
            evaluation = evaluate(
                ranking.indices, gallery_ids, relevant, shortlist=ranking.shortlist
            )
            metrics = dict(evaluation.metrics)
            metrics.update(stage_timings(ranking))
            metrics.update({k: float(v) for k, v in ranking.extra.items()})
            metrics["bytes_per_image"] = _bytes_per_image(
                label, cfg, storage, ranking, len(gallery_ids)
            )
            results[label] = metrics
            rankings[label] = ranking
        _recovery(results, cfg)
        if cfg.get("save_index"):
            _save_index(cfg, dataset, g_vectors, store, run_dir)

        flat = {f"{mode}/{k}": v for mode, m in results.items() for k, v in m.items()}
        flat.update({f"storage/{k}": v for k, v in storage.items()})
        flat.update({f"time/{k}": v for k, v in timings.items()})
        tracker.log_metrics(flat)
        _save_rankings(rankings, dataset, run_dir, tracker)
        print(format_results(results, weights, backbone_name, token_method))
        pm.hook.run_finished(config=config, run_dir=str(run_dir), results=results)
    if tracker.not_logged:
        print(f"Tracking: not logged: {'; '.join(tracker.not_logged)}")
    elif tracker.run_id:
        print(f"MLflow run {tracker.run_id} ({tracker.uri})")
    return RunResult(results, storage, timings, weights, run_dir)


def _run_name(cfg: DictConfig, backbone: str, tokens: str) -> str:
    """A readable MLflow run name: the job's command-line overrides, else what it ran."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        overrides = HydraConfig.get().job.override_dirname
        if overrides:
            return overrides
    return f"{cfg.dataset.name} {backbone} {tokens} k={cfg.k}"


def _bytes_per_image(
    label: str, cfg: DictConfig, storage: dict[str, float], ranking: Ranking, n_gallery: int
) -> float:
    """Storage a deployment of this mode keeps per gallery image (index + token store)."""
    stage_name = str(cfg.retrieval.stages[label].name)
    vector = storage["vector_bytes_per_image"]
    if "index_bytes" in ranking.extra:
        vector = float(ranking.extra["index_bytes"]) / n_gallery
    tokens = storage["token_bytes_per_image"]
    if stage_name == "single":
        return vector
    if stage_name == "exhaustive":
        return tokens
    return vector + tokens


def _recovery(results: dict[str, dict[str, float]], cfg: DictConfig) -> None:
    """Share of exhaustive late-interaction mAP that two-stage retrieval recovers."""
    names = {label: str(cfg.retrieval.stages[label].name) for label in results}
    exhaustive = [lbl for lbl, n in names.items() if n == "exhaustive"]
    if not exhaustive or results[exhaustive[0]].get("mAP", 0) <= 0:
        return
    full = results[exhaustive[0]]["mAP"]
    for label, name in names.items():
        if name == "two_stage":
            results[label]["mAP_recovered"] = results[label]["mAP"] / full


def format_results(
    results: Mapping[str, Mapping[str, float]], weights: str, backbone: str, tokens: str
) -> str:
    """The results table printed at the end of a run."""
    columns = ["R@1", "R@5", "R@10", "mAP", "R@S", "bytes/img", "ms/query"]
    header = f"{'mode':<12}" + "".join(f"{c:>11}" for c in columns)
    lines = [
        "",
        f"Results — backbone {backbone} [{weights.split(' (')[0].split(':')[0]} weights], "
        f"tokens {tokens}",
        header,
        "-" * len(header),
    ]
    for mode, m in results.items():
        cells = [m.get("R@1"), m.get("R@5"), m.get("R@10"), m.get("mAP"), m.get("R@S")]
        row = "".join(f"{v:>11.3f}" if v is not None else f"{'-':>11}" for v in cells)
        row += (
            f"{m.get('bytes_per_image', math.nan):>11.0f}{m.get('ms_per_query', math.nan):>11.3f}"
        )
        lines.append(f"{mode:<12}{row}")
    if weights.startswith("random"):
        lines.append("NOTE: untrained (random) backbone weights; not comparable to the study.")
    return "\n".join(lines)


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


def _save_index(cfg: DictConfig, dataset: Any, vectors: torch.Tensor, store: Any, run_dir: Path):
    """Write the gallery (ids, stage-1 index, token store) so it can be queried without the
    backbone: ``GalleryIndex.load(dir).search(...)``."""
    stage1 = next((s for s in cfg.retrieval.stages.values() if "index" in s), {"index": "Flat"})
    index = GalleryIndex(
        [r.image_id for r in dataset.records("gallery")], vectors, store, index=str(stage1["index"])
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
    """Fine-tune the backbone on the train split, then rebuild it from the checkpoint."""
    train_cfg = OmegaConf.to_container(cfg.train, resolve=True)

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        log.info("fine-tune epoch %d: %s", epoch, metrics)
        tracker.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=epoch)

    checkpoint = finetune(
        train_cfg,
        backbone,
        dataset,
        device=device,
        seed=int(cfg.seed),
        out_dir=finetune_dir(Path("outputs") / "finetune", cfg.train, backbone, dataset, cfg.seed),
        on_epoch_end=on_epoch_end,
    )
    backbone_cfg = OmegaConf.to_container(cfg.backbone, resolve=True)
    backbone_cfg["weights"] = str(checkpoint)
    return registry.build("backbone", backbone_cfg, seed=int(cfg.seed))
