"""Built-in token methods: poolings, selectors, instance-token aggregation and its baselines.

Registered as plugins through the same hooks third-party packages use, each factory named as
``"module:attribute"`` so that listing them imports no torch.
"""

from __future__ import annotations

from craterlab.hookspecs import Register, hookimpl


@hookimpl
def register_poolings(register: Register) -> None:
    register("cls", "craterlab.tokens.pooling:ClsPooling", "CLS token (or a CNN's pooled vector)")
    register(
        "mean",
        "craterlab.tokens.pooling:MeanPooling",
        "global average pooling (GAP) of the patch tokens",
    )
    register(
        "max", "craterlab.tokens.pooling:MaxPooling", "per-dimension max over the patch tokens"
    )
    register(
        "gem",
        "craterlab.tokens.pooling:GeMPooling",
        "GeM pooling of the patch tokens (p=3, clamped at eps)",
    )
    register(
        "instance",
        "craterlab.tokens.pooling:InstancePooling",
        "mean or max of the K instance tokens, as one vector",
    )
    register(
        "netvlad",
        "craterlab.tokens.baselines:NetVLADPooling",
        "NetVLAD-style soft VLAD on gallery centroids + PCA-whitening to one D-dim vector (fit)",
    )


@hookimpl
def register_selectors(register: Register) -> None:
    register(
        "attention",
        "craterlab.tokens.selection:AttentionSelector",
        "top-K patch tokens by CLS->patch attention",
    )
    register("norm", "craterlab.tokens.selection:NormSelector", "top-K patch tokens by L2 norm")
    register(
        "norm_attention",
        "craterlab.tokens.selection:NormAttentionSelector",
        "top-K patch tokens by norm x attention",
    )
    register(
        "random",
        "craterlab.tokens.selection:RandomSelector",
        "K random patch tokens per image (seeded)",
    )
    register(
        "grid",
        "craterlab.tokens.selection:GridSelector",
        "K patch tokens spread uniformly over the grid",
    )
    register(
        "cls_similarity",
        "craterlab.tokens.selection:ClsSimilaritySelector",
        "top-K patch tokens most similar to CLS",
    )
    register(
        "cls_distance",
        "craterlab.tokens.selection:ClsDistanceSelector",
        "top-K patch tokens least similar to CLS",
    )
    register(
        "all", "craterlab.tokens.selection:AllSelector", "every patch token (K = number of patches)"
    )
    register(
        "none",
        "craterlab.tokens.selection:no_selector",
        "no tokens: single-vector retrieval only (retrieval=single)",
    )


@hookimpl
def register_aggregators(register: Register) -> None:
    register(
        "none", "craterlab.tokens.aggregation:no_aggregator", "use the selector's tokens unchanged"
    )
    register(
        "instance",
        "craterlab.tokens.aggregation:InstanceAggregator",
        "instance tokens: K seeds (attention or FPS) + mean of their cosine-assigned tokens",
    )
    register(
        "kmeans",
        "craterlab.tokens.baselines:KMeansAggregator",
        "per-image K-means (20 Lloyd iterations), centroids",
    )
    register(
        "medoids",
        "craterlab.tokens.baselines:MedoidAggregator",
        "per-image K-means, the real token nearest each centroid",
    )
    register(
        "vlad",
        "craterlab.tokens.baselines:VLADAggregator",
        "VLAD residuals to K global centroids learned on the gallery (fit), one token per centroid",
    )
