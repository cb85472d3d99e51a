"""Test-split retrieval of a (fine-tuned) backbone's single vector, for before/after checks.

The same path a frozen run takes for its ``single`` mode, without the rest of the pipeline:
features from :func:`craterlab.backbones.extract.extract_features`, CLS or GeM from the pooling
module, exact cosine ranking (:func:`craterlab.metrics.rank_scores`) and
:func:`craterlab.metrics.evaluate` with the queries' cluster-tolerant relevance.
"""

from __future__ import annotations

import torch

from craterlab.backbones.extract import extract_features
from craterlab.metrics import evaluate, rank_scores
from craterlab.train.finetune import embedding_pooling
from craterlab.types import Backbone, CraterDataset


def retrieval_metrics(
    backbone: Backbone,
    dataset: CraterDataset,
    embedding: str = "cls",
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    depth: int | None = None,
) -> dict[str, float]:
    """R@k and mAP of the query split against the gallery with one pooled vector per image."""
    pooling = embedding_pooling(embedding)
    vectors = {}
    for split in ("gallery", "query"):
        feats, _ = extract_features(
            backbone, dataset, split, device=device, batch_size=batch_size, progress=False
        )
        vectors[split] = pooling(feats)
    scores = vectors["query"] @ vectors["gallery"].T
    gallery_ids = [r.crater_id for r in dataset.records("gallery")]
    relevant = [r.relevant_ids for r in dataset.records("query")]
    ranked = rank_scores(scores, depth=depth or len(gallery_ids))
    return dict(evaluate(ranked, gallery_ids, relevant).metrics)
