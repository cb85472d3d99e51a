"""Built-in token methods: poolings, selectors, instance-token aggregation and its baselines.

Registered as plugins through the same hooks third-party packages use.
"""

from __future__ import annotations

from craterlab.hookspecs import Register, hookimpl
from craterlab.tokens import aggregation, baselines, pooling, selection


@hookimpl
def register_poolings(register: Register) -> None:
    register("cls", pooling.ClsPooling, "CLS token (or a CNN's pooled vector)")
    register("mean", pooling.MeanPooling, "global average pooling (GAP) of the patch tokens")
    register("max", pooling.MaxPooling, "per-dimension max over the patch tokens")
    register("gem", pooling.GeMPooling, "GeM pooling of the patch tokens (p=3, clamped at eps)")
    register(
        "instance",
        pooling.InstancePooling,
        "mean or max of the K instance tokens, as one vector",
    )
    register(
        "netvlad",
        baselines.NetVLADPooling,
        "NetVLAD-style soft VLAD on gallery centroids + PCA-whitening to one D-dim vector (fit)",
    )


@hookimpl
def register_selectors(register: Register) -> None:
    register("attention", selection.AttentionSelector, "top-K patch tokens by CLS->patch attention")
    register("norm", selection.NormSelector, "top-K patch tokens by L2 norm")
    register(
        "norm_attention", selection.NormAttentionSelector, "top-K patch tokens by norm x attention"
    )
    register("random", selection.RandomSelector, "K random patch tokens per image (seeded)")
    register("grid", selection.GridSelector, "K patch tokens spread uniformly over the grid")
    register(
        "cls_similarity", selection.ClsSimilaritySelector, "top-K patch tokens most similar to CLS"
    )
    register(
        "cls_distance", selection.ClsDistanceSelector, "top-K patch tokens least similar to CLS"
    )
    register("all", selection.AllSelector, "every patch token (K = number of patches)")
    register(
        "none", selection.no_selector, "no tokens: single-vector retrieval only (retrieval=single)"
    )


@hookimpl
def register_aggregators(register: Register) -> None:
    register("none", aggregation.no_aggregator, "use the selector's tokens unchanged")
    register(
        "instance",
        aggregation.InstanceAggregator,
        "instance tokens: K seeds (attention or FPS) + mean of their cosine-assigned tokens",
    )
    register(
        "kmeans", baselines.KMeansAggregator, "per-image K-means (20 Lloyd iterations), centroids"
    )
    register(
        "medoids",
        baselines.MedoidAggregator,
        "per-image K-means, the real token nearest each centroid",
    )
    register(
        "vlad",
        baselines.VLADAggregator,
        "VLAD residuals to K global centroids learned on the gallery (fit), one token per centroid",
    )
