"""Encode crater crops exactly as an experiment does: registry components, the feature cache,
and the same pooling / token methods applied in the same batches as an experiment
(:mod:`craterlab.pipeline`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from craterlab.backbones.extract import extract_features
from craterlab.checks import check_features, check_tokens, check_vectors
from craterlab.devices import resolve_device
from craterlab.errors import ConfigError
from craterlab.pipeline import TOKEN_BATCH, apply_batched
from craterlab.plugins import get_registry
from craterlab.results import is_untrained
from craterlab.types import Fittable, Tokens
from craterlab.workflows.items import ItemSet

log = logging.getLogger("craterlab")


@dataclass
class Encoded:
    """Single vectors (N, D) and token sets (N, K, D) of a set of items, in item order."""

    vectors: torch.Tensor
    tokens: Tokens
    cache_hit: bool
    seconds: float


class Encoder:
    """Backbone + pooling + token method (+ the quantizer and matcher of the index) built
    through the registry from one resolved config."""

    def __init__(self, config: dict[str, Any]) -> None:
        registry = get_registry()
        seed = int(config.get("seed", 0))
        self.config = config
        self.seed = seed
        self.device = resolve_device(str(config.get("device", "auto")))
        self.pooling = registry.build("pooling", config["pooling"], seed=seed)
        selector = registry.build("selector", config["selector"], seed=seed)
        aggregator = registry.build("aggregator", config["aggregator"], seed=seed)
        self.selector_or_aggregator = selector if aggregator is None else aggregator
        self.quantizer_config = config["quantizer"]
        self.matcher = registry.build("matcher", config["matcher"], seed=seed)
        token_method = ("token method", self.selector_or_aggregator)
        for name, component in (("pooling", self.pooling), token_method):
            if isinstance(component, Fittable):
                raise ConfigError(
                    f"The {name} {type(component).__name__} learns from the gallery (fit), and "
                    "an index cannot yet save what it learned, so queries and added items "
                    "could not be encoded the same way. Choose a pooling and token method "
                    "without fitting (pooling=gem|cls|mean|max, aggregator=instance|kmeans|"
                    "medoids|none)."
                )
        self.backbone = registry.build("backbone", config["backbone"], seed=seed)

    def new_quantizer(self) -> Any:
        """A fresh quantizer of the index's config (fit it on the gallery tokens)."""
        return get_registry().build("quantizer", self.quantizer_config, seed=self.seed)

    @property
    def weights_status(self) -> str:
        return str(getattr(self.backbone, "weights_status", "unknown"))

    def identity(self) -> dict[str, Any]:
        """What the index records about the encoder: backbone identity and weights."""
        weights = self.weights_status
        return {
            "backbone": self.backbone.identity(),
            "weights_status": weights,
            "untrained": is_untrained(weights),
        }

    def encode(self, items: ItemSet, *, progress: bool = True) -> Encoded:
        """Vectors and tokens of every item (through the feature cache when enabled)."""
        cache = self.config.get("cache") or {}
        feats, info = extract_features(
            self.backbone,
            items,
            "gallery",
            device=self.device,
            batch_size=int(self.config.get("batch_size", 32)),
            num_workers=int(self.config.get("num_workers", 0)),
            cache_dir=str(cache.get("dir")) if cache.get("enabled", True) else None,
            progress=progress,
        )
        check_features(feats, items.name)  # NaN stops; all-identical features are warned
        vectors = apply_batched(self.pooling, feats, self.device, TOKEN_BATCH)
        check_vectors(vectors, items.name)
        tokens = apply_batched(self.selector_or_aggregator, feats, self.device, TOKEN_BATCH)
        check_tokens(tokens, items.name)
        return Encoded(vectors.float(), tokens, bool(info.cache_hit), float(info.seconds))
