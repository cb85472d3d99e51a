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
from craterlab.retrieval.late_interaction import late_interaction
from craterlab.tokens.aggregation import InstanceAggregator
from craterlab.train.finetune import embedding_pooling
from craterlab.types import Backbone, CraterDataset, Tokens


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


def late_interaction_scores(queries: Tokens, gallery: Tokens, chunk: int = 16) -> torch.Tensor:
    """(Nq, Ng) Eq. 1 scores from the reference function, a few queries at a time (the
    reference materializes (Nq, Ng, Kq, Kg))."""
    return torch.cat(
        [late_interaction(queries[i : i + chunk], gallery) for i in range(0, len(queries), chunk)]
    )


def retrieval_suite(
    backbone: Backbone,
    dataset: CraterDataset,
    k: int = 32,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> dict[str, float]:
    """Test-split mAP and R@1 of GeM (single vector) and of late interaction over K instance
    tokens (attention seeds, hard assignment), from one feature extraction.

    Keys: ``gem_mAP``, ``gem_R@1``, ``li_mAP``, ``li_R@1``. K is capped at the token count.
    """
    feats = {
        split: extract_features(
            backbone, dataset, split, device=device, batch_size=batch_size, progress=False
        )[0]
        for split in ("gallery", "query")
    }
    gallery_ids = [r.crater_id for r in dataset.records("gallery")]
    relevant = [r.relevant_ids for r in dataset.records("query")]
    gem = embedding_pooling("gem")
    out: dict[str, float] = {}
    scores = {"gem": gem(feats["query"]) @ gem(feats["gallery"]).T}
    k = min(k, feats["gallery"].tokens.shape[1])
    if feats["gallery"].attn is not None:
        agg = InstanceAggregator(k=k)
        scores["li"] = late_interaction_scores(agg(feats["query"]), agg(feats["gallery"]))
    for name, s in scores.items():
        m = evaluate(rank_scores(s, depth=len(gallery_ids)), gallery_ids, relevant).metrics
        out[f"{name}_mAP"] = float(m["mAP"])
        out[f"{name}_R@1"] = float(m["R@1"])
    return out
