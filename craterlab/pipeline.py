"""The steps of one experiment, each a plain function with a typed result.

:func:`craterlab.experiment.run` composes them: build the components, encode the images, represent
them (single vectors, token sets, the quantized token store), search with every retrieval
stage and evaluate the rankings. The workflows (``index``, ``search``) reuse the same steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from craterlab.backbones.extract import ExtractInfo, extract_features
from craterlab.checks import check_features, check_scores, check_tokens, check_vectors
from craterlab.errors import ConfigError
from craterlab.kinds import STAGE_PREFIX
from craterlab.metrics import confidence_intervals, evaluate, resolve_depth
from craterlab.registry import Registry
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
SPLITS = ("gallery", "query")


@dataclass
class Components:
    """Every component of a run, built from its config group before any expensive work."""

    dataset: CraterDataset
    backbone: Backbone
    pooling: Any
    selector_or_aggregator: Any  # what makes the K tokens: the aggregator, else the selector
    token_method: str
    matcher: Any
    quantizer: Any
    stages: dict[str, Any]


@dataclass
class Representation:
    """Single vectors and token sets of both splits, and the gallery's quantized token store
    (tokens and store are None when the run has no token method: selector=none)."""

    gallery_vectors: torch.Tensor
    query_vectors: torch.Tensor
    gallery_tokens: Tokens | None
    query_tokens: Tokens | None
    store: Any
    storage: dict[str, float]
    seconds: float


@dataclass
class Evaluation:
    """Per retrieval mode: its metrics, its ranking and its stage's report."""

    results: dict[str, dict[str, float]]
    rankings: dict[str, Ranking]
    reports: dict[str, StageReport]


def cache_dir(config: Mapping[str, Any]) -> str | None:
    """The feature cache dir of a config (its ``cache`` node), or None when caching is off."""
    cache = config.get("cache") or {}
    return str(cache.get("dir")) if cache.get("enabled", True) else None


def build_token_methods(
    config: Mapping[str, Any], registry: Registry, seed: int
) -> tuple[Any, Any, str]:
    """The pooling, what makes the K tokens (the aggregator, else the selector) and its name,
    built from the config's ``pooling``, ``selector`` and ``aggregator`` (in that order)."""
    pooling = registry.build("pooling", config["pooling"], seed=seed)
    selector = registry.build("selector", config["selector"], seed=seed)
    aggregator = registry.build("aggregator", config["aggregator"], seed=seed)
    if aggregator is None:
        return pooling, selector, str(config["selector"]["name"])
    return pooling, aggregator, str(config["aggregator"]["name"])


def build_components(cfg: DictConfig, registry: Registry, seed: int) -> Components:
    """Every component from the registry: config mistakes surface in a second. (Built in the
    order a run has always built them, so seeded components draw the same numbers.)"""
    dataset = registry.build("dataset", cfg.dataset, seed=seed)
    pooling, selector_or_aggregator, token_method = build_token_methods(cfg, registry, seed)
    matcher = registry.build("matcher", cfg.matcher, seed=seed)
    # cache_dir: where a PQ codebook is kept for the other jobs of a sweep
    quantizer = registry.build("quantizer", cfg.quantizer, seed=seed, cache_dir=cache_dir(cfg))
    stages = {
        label: registry.build("stage", stage_cfg, group=f"{STAGE_PREFIX}{label}", seed=seed)
        for label, stage_cfg in (cfg.retrieval.get("stages") or {}).items()
    }
    if not stages:
        raise ConfigError("retrieval.stages is empty: choose retrieval=all, single, ... ")
    if selector_or_aggregator is None:
        _check_vector_only(cfg)
    return Components(
        dataset=dataset,
        pooling=pooling,
        selector_or_aggregator=selector_or_aggregator,
        token_method=token_method,
        matcher=matcher,
        quantizer=quantizer,
        stages=stages,
        backbone=registry.build("backbone", cfg.backbone, seed=seed),
    )


def _check_vector_only(cfg: DictConfig) -> None:
    """selector=none and aggregator=none give no tokens: only single-vector stages can run."""
    stages = cfg.retrieval.get("stages") or {}
    need = [label for label, st in stages.items() if str(st.get("name")) != "single"]
    if need:
        raise ConfigError(
            f"selector=none with aggregator=none computes no tokens, but retrieval mode(s) "
            f"{', '.join(need)} match tokens. Use retrieval=single for single-vector tables, "
            "or choose a token method (selector=attention, aggregator=instance, ...)."
        )


def encode(
    backbone: Backbone, dataset: CraterDataset, cfg: DictConfig, device: torch.device
) -> tuple[dict[str, Features], dict[str, float]]:
    """Features of the gallery and the queries (through the feature cache), checked finite,
    and the encode timings."""
    features: dict[str, Features] = {}
    timings: dict[str, float] = {}
    for split in SPLITS:
        feats, info = encode_split(backbone, dataset, split, cfg, device)
        check_features(feats, split)
        features[split] = feats
        timings[f"encode_{split}_seconds"] = float(info.seconds)
        timings[f"encode_{split}_cache_hit"] = float(info.cache_hit)
        state = "feature cache hit" if info.cache_hit else "encoded"
        log.info("%s: %d images, %s in %.1f s", split, len(feats), state, info.seconds)
    return features, timings


def encode_split(
    backbone: Backbone,
    dataset: CraterDataset,
    split: str,
    config: Mapping[str, Any],
    device: torch.device,
    *,
    progress: bool = True,
) -> tuple[Features, ExtractInfo]:
    """Features of one split (through the feature cache the config names), with the config's
    ``batch_size`` and ``num_workers``."""
    return extract_features(
        backbone,
        dataset,
        split,
        device=device,
        batch_size=int(config.get("batch_size", 32)),
        num_workers=int(config.get("num_workers", 0)),
        cache_dir=cache_dir(config),
        progress=progress,
    )


def pool(pooling: Any, features: Features, device: torch.device) -> torch.Tensor:
    """Single vectors (N, D) of ``features``, in batches of :data:`TOKEN_BATCH`."""
    return apply_batched(pooling, features, device, TOKEN_BATCH)


def make_tokens(selector_or_aggregator: Any, features: Features, device: torch.device) -> Tokens:
    """Token sets (N, K, D) of ``features``, in batches of :data:`TOKEN_BATCH`."""
    return apply_batched(selector_or_aggregator, features, device, TOKEN_BATCH)


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


def represent(
    components: Components,
    features: Mapping[str, Features],
    device: torch.device,
    pooling_name: str,
) -> Representation:
    """Pool and tokenize both splits (components that learn from the gallery fit first),
    check the results finite, and quantize the gallery's tokens into a store."""
    gallery, query = features["gallery"], features["query"]
    for component in (components.pooling, components.selector_or_aggregator):
        if isinstance(component, Fittable):
            component.fit(gallery)
    t0 = time.perf_counter()
    g_vectors = pool(components.pooling, gallery, device)
    q_vectors = pool(components.pooling, query, device)
    for split, vecs in (("gallery", g_vectors), ("query", q_vectors)):
        check_vectors(vecs, split, f"pooling ({pooling_name})")
    if components.selector_or_aggregator is None:  # no token method: single vectors only
        storage = {
            "tokens_per_image": 0.0,
            "token_bytes_per_image": 0.0,
            "token_store_bytes": 0.0,
            "vector_bytes_per_image": float(g_vectors.shape[1] * g_vectors.element_size()),
        }
        seconds = time.perf_counter() - t0
        return Representation(g_vectors, q_vectors, None, None, None, storage, seconds)
    g_tokens = make_tokens(components.selector_or_aggregator, gallery, device)
    q_tokens = make_tokens(components.selector_or_aggregator, query, device)
    seconds = time.perf_counter() - t0
    for split, toks in (("gallery", g_tokens), ("query", q_tokens)):
        check_tokens(toks, split, f"tokens ({components.token_method})")
    components.quantizer.fit(g_tokens)
    store = components.quantizer.encode(g_tokens)
    storage = {
        "tokens_per_image": float(g_tokens.vectors.shape[1]),
        "token_bytes_per_image": float(store.bytes_per_image()),
        "token_store_bytes": float(store.nbytes),
        "vector_bytes_per_image": float(g_vectors.shape[1] * g_vectors.element_size()),
    }
    return Representation(g_vectors, q_vectors, g_tokens, q_tokens, store, storage, seconds)


def search_and_evaluate(
    components: Components, rep: Representation, depth: Any, seed: int
) -> Evaluation:
    """Run every retrieval stage and evaluate its ranking: the study's metrics with their
    bootstrap intervals, plus what the stage reports of itself (latencies, bytes per image)."""
    dataset = components.dataset
    gallery_ids = [r.crater_id for r in dataset.records("gallery")]
    relevant = [r.relevant_ids for r in dataset.records("query")]
    inputs = RetrievalInputs(
        query_vectors=rep.query_vectors,
        gallery_vectors=rep.gallery_vectors,
        query_tokens=rep.query_tokens,  # type: ignore[arg-type]  # None only for single stages
        gallery_store=rep.store,
        matcher=components.matcher,
        depth=ranked_depth(depth, len(gallery_ids)),
    )
    map_depth = resolve_depth(depth, len(gallery_ids))
    # A stage without its own report (a plugin) is charged vectors + tokens.
    default_bytes = rep.storage["vector_bytes_per_image"] + rep.storage["token_bytes_per_image"]
    out = Evaluation({}, {}, {})
    for label, stage in components.stages.items():
        log.info("retrieval: %s", label)
        ranking = stage.search(inputs)
        check_scores(ranking, label)
        evaluation = evaluate(
            ranking.indices, gallery_ids, relevant, shortlist=ranking.shortlist, map_depth=map_depth
        )
        metrics = dict(evaluation.metrics)
        metrics.update(confidence_intervals(evaluation, seed=seed))
        metrics.update(depth=float(map_depth), gallery_size=float(len(gallery_ids)))
        report = ranking.stage_report(default_bytes=default_bytes)
        metrics.update({k: float(v) for k, v in ranking.extra.items()})
        metrics.update(report.metrics())  # latencies, ms_per_query, bytes_per_image
        out.results[label], out.rankings[label], out.reports[label] = metrics, ranking, report
    add_recovery(out.results, out.reports)
    return out


def ranked_depth(depth: Any, n_gallery: int, ks: Sequence[int] = (1, 5, 10)) -> int:
    """How many ranks to retrieve: ``depth``, but at least the largest k of R@k, so a
    truncated list (``depth=5``) lowers only the mAP family, never R@10."""
    return min(n_gallery, max(resolve_depth(depth, n_gallery), max(ks)))


def add_recovery(results: dict[str, dict[str, float]], reports: Mapping[str, StageReport]) -> None:
    """``mAP_recovered``: the share of the reference stage's mAP (exhaustive late interaction)
    that each stage reporting ``recovers_reference`` (two-stage) reaches."""
    reference = next((label for label, r in reports.items() if r.reference), None)
    if reference is None or results[reference].get("mAP", 0) <= 0:
        return
    full = results[reference]["mAP"]
    for label, report in reports.items():
        if report.recovers_reference:
            results[label]["mAP_recovered"] = results[label]["mAP"] / full
