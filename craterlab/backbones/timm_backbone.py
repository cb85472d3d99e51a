"""Frozen timm backbones: ViTs (CLS, patch tokens, last-block CLS->patch attention) and CNNs
(final feature map as tokens, its global average as the global vector, no attention).

The image transform is the model's own pretrained preprocessing (timm's resolve_data_config +
create_transform: size, crop, mean, std, interpolation). Weights come from the timm hub, a
local checkpoint, an ``hf-hub:`` id or a seeded random init; see :mod:`.weights`. The config
keys are :class:`~craterlab.backbones.options.TimmOptions`. The forward runs in the precision
:func:`craterlab.devices.resolve_precision` picks on the current device (``auto``: bf16
autocast on CUDA and on CPUs where a cached probe measured bf16 faster, fp32 elsewhere);
features come out as float32 either way, and ``identity()`` names the precision used, so the
feature cache keeps precisions apart.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import timm
import torch
from PIL import Image

from craterlab.backbones import weights as W
from craterlab.backbones.lineage import describe_checkpoint, is_run_reference, resolve_run_weights
from craterlab.backbones.options import TimmOptions
from craterlab.data.images import to_rgb8
from craterlab.devices import autocast, check_precision, resolve_precision
from craterlab.errors import CraterlabError
from craterlab.hashing import file_sha256
from craterlab.types import Features

log = logging.getLogger(__name__)

EXTRACTOR_VERSION = "1"
"""Bump when the way features are computed from a model changes (invalidates the cache)."""


def resolve_weights(weights: str) -> str:
    """Normalize the ``weights`` config value: 'pretrained', 'random', 'hf-hub:...' or a path."""
    w = (weights or "").strip()
    if w in ("pretrained", "random") or w.startswith("hf-hub:"):
        return w
    if not w:
        raise ValueError(
            "weights is empty: use 'pretrained', 'random', a checkpoint path or 'hf-hub:ORG/NAME'"
        )
    return w


class TimmBackbone:
    """Common parts of the timm backbones: model creation, weights, transform, identity."""

    has_attention: bool = False
    kind: str = "timm"
    sized_model: bool = False  # whether the architecture takes img_size (ViTs) or not (CNNs)

    def __init__(
        self,
        options: TimmOptions,
        label: str | None = None,
        unavailable_reason: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        model, pretrained_tag = options.model, options.pretrained_tag
        image_size = options.image_size
        self.options = options
        self.model_name = model
        self.pretrained_tag = pretrained_tag or None
        self.full_name = f"{model}.{pretrained_tag}" if pretrained_tag else model
        self.label = label or self.full_name
        self.precision = options.precision
        check_precision(self.precision)  # an unknown value fails here
        self.image_size = image_size
        self.seed = seed = options.seed
        weights = resolve_weights(options.weights)
        if not timm.is_model(model):
            raise ValueError(
                f"timm has no model {model!r}; list them with "
                f"`python -c \"import timm; print(timm.list_models('{model.split('_')[0]}*'))\"`"
            )
        kwargs: dict[str, Any] = {"num_classes": 0, **(model_kwargs or {})}
        if image_size is not None and self.sized_model:
            kwargs["img_size"] = image_size
        self._weights_id: dict[str, Any]
        self._device = torch.device("cpu")
        self._moved = False  # whether to() placed the model (else it stays where it was made)
        # Random weights are made when the model is first used (a cached run never uses it);
        # until then ``_model`` is the same architecture on the meta device (no memory, no init).
        self._materialize: Callable[[], torch.nn.Module] | None = None
        self._model = self._create(
            weights,
            options.allow_random_weights,
            seed,
            options.checkpoint_key,
            kwargs,
            unavailable_reason,
        )
        self._model.eval().requires_grad_(False)
        data_cfg_args: dict[str, Any] = {}
        if image_size is not None:
            data_cfg_args["input_size"] = (3, image_size, image_size)
        self.data_config = timm.data.resolve_data_config(data_cfg_args, model=self._model)
        self._transform = timm.data.create_transform(**self.data_config, is_training=False)
        self._prepare(self._model)

    @property
    def model(self) -> torch.nn.Module:
        """The timm model; seeded random weights are initialized here, on first use."""
        if self._materialize is not None:
            model = self._materialize()
            self._materialize = None
            model.eval().requires_grad_(False)
            self._prepare(model)
            self._model = model.to(self._device) if self._moved else model
        return self._model

    @model.setter
    def model(self, model: torch.nn.Module) -> None:
        self._materialize = None
        self._model = model

    @property
    def materialized(self) -> bool:
        """Whether the model's weights exist yet (False: random weights not yet needed)."""
        return self._materialize is None

    def _prepare(self, model: torch.nn.Module) -> None:
        """Read the architecture and set up hooks on ``model`` (meta or real)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ weights

    def _create(
        self,
        weights: str,
        allow_random: bool,
        seed: int,
        checkpoint_key: str,
        kwargs: dict[str, Any],
        unavailable_reason: str | None,
    ) -> torch.nn.Module:
        if weights == "random":
            self.weights_status = "random (requested)"
            self._weights_id = {"weights": "random", "seed": seed}
            return self._deferred_random(seed, kwargs)
        if weights == "pretrained":
            try:
                if unavailable_reason:
                    raise W.WeightsUnavailable(unavailable_reason)
                if not self.pretrained_tag:
                    raise W.WeightsUnavailable(
                        f"no pretrained tag is configured for {self.model_name}"
                    )
                cfg = timm.models.get_pretrained_cfg(self.full_name)
                if cfg is None:
                    raise ValueError(f"timm has no pretrained weights {self.full_name!r}")
                overlay = W.pretrained_source(cfg.to_dict())
                model = timm.create_model(
                    self.full_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
                )
                self.weights_status = "pretrained"
                self._weights_id = {"weights": "pretrained", "tag": self.full_name}
                return model
            except W.WeightsUnavailable as exc:
                return self._fallback(str(exc), allow_random, seed, kwargs)
        # a checkpoint: an MLflow run's (run:<id>), hf-hub id or local path
        if is_run_reference(weights):
            weights = resolve_run_weights(weights)
        if weights.startswith("hf-hub:"):
            spec = weights[len("hf-hub:") :]
            parts = spec.split("/")
            repo, rev = W.split_repo("/".join(parts[:2]))
            files = ("/".join(parts[2:]),) if len(parts) > 2 else W.CHECKPOINT_HUB_FILES
            try:
                path = W.download_hub_file(repo, files, rev)
            except W.WeightsUnavailable as exc:
                return self._fallback(str(exc), allow_random, seed, kwargs)
            source = weights
        else:
            path = weights
            source = f"checkpoint:{path}"
            if not os.path.isfile(path):
                raise CraterlabError(
                    f"Checkpoint file {path!r} for backbone {self.label} does not exist. Pass an "
                    "existing file (backbone.weights=/path/to/checkpoint.pth), an "
                    "'hf-hub:ORG/NAME' id, 'pretrained' or 'random'."
                )
        model = self._random(seed, kwargs)
        W.load_checkpoint_into(model, path, key=checkpoint_key, label=self.label)
        self.weights_status, self.lineage = describe_checkpoint(path, source)
        self._weights_id = {
            "weights": "checkpoint",
            "source": source,
            "sha256": file_sha256(path),
            "checkpoint_key": checkpoint_key,
        }
        return model

    def _random(self, seed: int, kwargs: dict[str, Any]) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return timm.create_model(self.full_name, pretrained=False, **kwargs)

    def _deferred_random(self, seed: int, kwargs: dict[str, Any]) -> torch.nn.Module:
        """The architecture on the meta device; :attr:`model` makes the seeded weights when
        first used. Falls back to making them now if the model cannot be built on meta."""
        try:
            with torch.device("meta"):
                skeleton = timm.create_model(self.full_name, pretrained=False, **kwargs)
        except Exception:  # an architecture whose construction computes with its tensors
            return self._random(seed, kwargs)
        self._materialize = lambda: self._random(seed, kwargs)
        return skeleton

    def _fallback(
        self, reason: str, allow_random: bool, seed: int, kwargs: dict[str, Any]
    ) -> torch.nn.Module:
        if not allow_random:
            raise CraterlabError(
                f"Pretrained weights for backbone {self.label} are unavailable: {reason}. "
                "Fix: connect to the internet once (the weights are then cached), or pre-download "
                "them into the Hugging Face cache (huggingface-cli download ...), or pass a local "
                "checkpoint (backbone.weights=/path/to/file), or run with untrained weights "
                "(allow_random_weights=true; results are then meaningless for retrieval quality)."
            )
        self.weights_status = (
            f"random (fallback: pretrained weights for {self.label} unreachable: {reason})"
        )
        log.warning(
            "!!! USING RANDOM WEIGHTS for %s: pretrained weights unreachable (%s). Features are "
            "untrained; retrieval metrics will not reflect the model. Set "
            "allow_random_weights=false to make this an error.",
            self.label,
            reason,
        )
        self._weights_id = {"weights": "random", "seed": seed}
        return self._deferred_random(seed, kwargs)

    # ------------------------------------------------------------------ protocol

    @property
    def device(self) -> torch.device:
        return self._device

    def transform(self, image: Image.Image) -> torch.Tensor:
        """One PIL image to a normalized (3, H, W) tensor (the model's own preprocessing).

        16-bit and float images are stretched by their own range, never clipped
        (:func:`craterlab.data.images.to_rgb8`)."""
        if image.mode != "RGB":
            image = to_rgb8(image)
        return self._transform(image)

    def to(self, device: torch.device | str) -> TimmBackbone:
        self._device = torch.device(device)
        self._moved = True
        if self._materialize is None:  # else the model is made on this device when first used
            self._model.to(self._device)
        return self

    def effective_precision(self) -> str:
        """The precision the forward uses on the current device ('auto' resolved)."""
        return resolve_precision(self.precision, self._device)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast(self.effective_precision(), self._device)

    def encode(self, images: torch.Tensor) -> Features:
        """(B, 3, H, W) on the model's device -> float32 Features, no gradients, eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                return self._features(images)
        finally:
            self.model.train(was_training)

    def forward_features(self, images: torch.Tensor) -> Features:
        """Like :meth:`encode` but differentiable (for fine-tuning); keeps the train/eval mode."""
        return self._features(images)

    def _features(self, images: torch.Tensor) -> Features:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """Everything that determines the features; the feature cache hashes it."""
        return {
            "kind": self.kind,
            "model": self.model_name,
            "pretrained_tag": self.pretrained_tag,
            "label": self.label,
            "weights": self._weights_id,
            "image_size": self.image_size,
            "transform": {
                k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()
            },
            "precision": self.effective_precision(),
            "extractor_version": EXTRACTOR_VERSION,
            "timm": timm.__version__,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label}, dim={self.dim}, weights={self.weights_status})"


class TimmViT(TimmBackbone):
    """A timm Vision Transformer: CLS, patch tokens (prefix/register tokens dropped), and the
    last block's CLS->patch attention averaged over heads, renormalized over patch tokens."""

    has_attention = True
    kind = "timm_vit"
    sized_model = True

    def _prepare(self, m: torch.nn.Module) -> None:
        if not hasattr(m, "blocks") or not hasattr(m, "num_prefix_tokens"):
            raise ValueError(f"{self.model_name} is not a ViT (no blocks / prefix tokens)")
        self.dim = int(m.num_features)
        self.num_prefix_tokens = int(m.num_prefix_tokens)
        self.has_class_token = getattr(m, "cls_token", None) is not None
        self.grid = tuple(int(g) for g in m.patch_embed.grid_size)  # type: ignore[union-attr]
        attn = m.blocks[-1].attn  # type: ignore[index]
        if not hasattr(attn, "fused_attn") or not hasattr(attn, "attn_drop"):
            raise ValueError(
                f"{self.model_name}: the last block's attention ({type(attn).__name__}) does not "
                "expose its weights (no fused_attn / attn_drop)"
            )
        # The fused SDPA kernel never materializes the weights: compute the last block
        # explicitly and read softmax(qk^T) where it passes through attn_drop.
        attn.fused_attn = False
        self._captured: torch.Tensor | None = None
        attn.attn_drop.register_forward_hook(self._capture)

    def _capture(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        # (B, H, N, N) -> CLS row only, (B, H, N)
        self._captured = output[:, :, 0, :]

    def _features(self, images: torch.Tensor) -> Features:
        self._captured = None
        with self._autocast():
            x = self.model.forward_features(images)
        npt = self.num_prefix_tokens
        tokens = x[:, npt:, :].float()
        if self.has_class_token:
            cls = x[:, 0, :].float()
        else:
            with self._autocast():
                cls = self.model.forward_head(x, pre_logits=True).float()
        rows, cols = self.grid
        if tokens.shape[1] != rows * cols:
            raise RuntimeError(f"{tokens.shape[1]} patch tokens for a {rows}x{cols} grid")
        if self._captured is None:
            raise RuntimeError("the attention hook did not fire")
        a = self._captured.float().mean(dim=1)[:, npt:]
        attn = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        self._captured = None
        return Features(cls=cls, tokens=tokens, attn=attn, grid=(rows, cols))


class TimmCNN(TimmBackbone):
    """A timm CNN: the final feature map's cells are the tokens, their mean the global vector."""

    has_attention = False
    kind = "timm_cnn"

    def _prepare(self, m: torch.nn.Module) -> None:
        size = self.data_config["input_size"]
        device = next(m.parameters()).device  # the meta device runs the forward on shapes only
        with torch.inference_mode():
            fmap = m.forward_features(torch.zeros(1, *size, device=device))  # type: ignore[operator]
        if fmap.ndim != 4:
            raise ValueError(
                f"{self.model_name}: forward_features gave {tuple(fmap.shape)}, not NCHW"
            )
        self.dim = int(fmap.shape[1])
        self.grid = (int(fmap.shape[2]), int(fmap.shape[3]))

    def _features(self, images: torch.Tensor) -> Features:
        with self._autocast():
            fmap = self.model.forward_features(images)
        tokens = fmap.float().flatten(2).transpose(1, 2)
        cls = tokens.mean(dim=1)
        return Features(cls=cls, tokens=tokens, attn=None, grid=(fmap.shape[2], fmap.shape[3]))
