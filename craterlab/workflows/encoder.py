"""Encode crater crops exactly as an experiment does: the experiment's own steps
(:mod:`craterlab.pipeline`: the components built from the registry, the feature cache, the same
pooling and token method applied in the same batches).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from craterlab.checks import check_features, check_tokens, check_vectors
from craterlab.devices import resolve_device
from craterlab.errors import ConfigError
from craterlab.pipeline import build_token_methods, encode_split, make_tokens, pool
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
        self.pooling, self.selector_or_aggregator, self.token_method = build_token_methods(
            config, registry, seed
        )
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
        feats, info = encode_split(
            self.backbone, items, "gallery", self.config, self.device, progress=progress
        )
        check_features(feats, items.name)  # NaN stops; all-identical features are warned
        vectors = pool(self.pooling, feats, self.device)
        check_vectors(vectors, items.name)
        tokens = make_tokens(self.selector_or_aggregator, feats, self.device)
        check_tokens(tokens, items.name)
        return Encoded(vectors.float(), tokens, bool(info.cache_hit), float(info.seconds))
