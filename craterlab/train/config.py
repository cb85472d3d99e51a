"""The ``train`` config group: its schema and validation.

``train`` is not a registry kind (there is one training loop), so its keys are checked here,
with the registry's own type checks and error style: an unknown key names the valid keys, a
wrong type names the expected type. The ``loss`` sub-config is validated by the registry
(kind ``loss``). ``name: none`` means a frozen backbone and needs no other key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from craterlab.errors import ConfigError, closest
from craterlab.hashing import stable_hash
from craterlab.registry import Registry, check_value, schema_params, to_plain, type_name


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning settings (conf/train/*.yaml). Defaults follow the study's baselines."""

    name: str = "none"
    loss: dict[str, Any] | None = None
    epochs: int = 30
    lr: float = 1.0e-5  # backbone learning rate (AdamW)
    head_lr: float = 1.0e-3  # learnable loss parameters (ArcFace class weights)
    weight_decay: float = 0.05
    batch_size: int = 64  # images per step = classes_per_batch x images per class
    classes_per_batch: int = 16  # P of the P x K class-balanced sampler
    steps_per_epoch: int | None = None  # default: train images // batch_size
    augment: Literal["none", "single_crop", "multi_crop"] = "multi_crop"
    embedding: Literal["cls", "gem"] = "cls"
    gem_p: float = 3.0
    global_crops: int = 2  # multi_crop: views at crop_scale
    local_crops: int = 4  # multi_crop: extra views at local_scale
    crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    flip: bool = True
    color_jitter: float = 0.4  # brightness / contrast strength (saturation half of it)

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    @property
    def images_per_class(self) -> int:
        """K of the P x K sampler."""
        return self.batch_size // self.classes_per_batch

    @property
    def views_per_image(self) -> int:
        if self.augment == "multi_crop":
            return self.global_crops + self.local_crops
        return 1


VALID_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig))


def validate_train_config(cfg: Any, registry: Registry | None = None) -> TrainConfig:
    """Check a ``train`` config (dict or DictConfig) and return it typed.

    Raises :class:`ConfigError` for an unknown key, a wrong type, an impossible value, or a
    loss config the ``loss`` registry rejects. Call it at run start to fail before encoding.
    """
    values = to_plain(cfg)
    kwargs: dict[str, Any] = {}
    params = {p.name: p for p in schema_params(TrainConfig)}
    for key, value in values.items():
        param = params.get(key)
        if param is None:
            raise ConfigError(
                f"train has no config key {key!r}.{closest(key, VALID_KEYS)} Valid keys: "
                f"{', '.join(VALID_KEYS)}. Fix the key in conf/train/ or override "
                "(e.g. train.epochs=10)."
            )
        if key == "loss" and isinstance(value, str):
            value = {"name": value}
        ok, converted = check_value(param.annotation, value)
        if not ok:
            raise ConfigError(
                f"train: key {key!r} must be {type_name(param.annotation)}, got {value!r} "
                f"({type(value).__name__}). Fix it in conf/train/ or override train.{key}=VALUE."
            )
        kwargs[key] = converted
    config = TrainConfig(**kwargs)
    if config.enabled:
        _check_values(config)
        _check_loss(config, registry)
    return config


def _check_values(c: TrainConfig) -> None:
    problems = []
    if c.loss is None:
        problems.append("'loss' is missing (e.g. loss: {name: supcon})")
    for key in ("epochs", "batch_size", "global_crops"):
        if getattr(c, key) < 1:
            problems.append(f"{key} must be >= 1")
    if c.local_crops < 0:
        problems.append("local_crops must be >= 0")
    if c.steps_per_epoch is not None and c.steps_per_epoch < 1:
        problems.append("steps_per_epoch must be >= 1 or null")
    for key in ("lr", "head_lr", "gem_p"):
        if not getattr(c, key) > 0:
            problems.append(f"{key} must be > 0")
    if c.weight_decay < 0 or c.color_jitter < 0:
        problems.append("weight_decay and color_jitter must be >= 0")
    if c.classes_per_batch < 2:
        problems.append("classes_per_batch must be >= 2 (a batch needs negatives)")
    elif c.images_per_class < 2:
        problems.append(
            f"batch_size ({c.batch_size}) must be at least 2 x classes_per_batch "
            f"({c.classes_per_batch}) so every identity in a batch has a positive"
        )
    for key in ("crop_scale", "local_scale"):
        lo_hi = getattr(c, key)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            problems.append(f"{key} must be [low, high] with 0 < low <= high <= 1")
    if problems:
        raise ConfigError(
            f"train {c.name!r} has invalid values: {'; '.join(problems)}. "
            "Fix them in conf/train/ or on the command line (train.KEY=VALUE)."
        )


def _check_loss(c: TrainConfig, registry: Registry | None) -> None:
    if registry is None:
        from craterlab.plugins import get_registry

        registry = get_registry()
    registry.build("loss", c.loss)  # raises ConfigError naming the valid loss keys


def run_key(c: TrainConfig, backbone_identity: Any, dataset_identity: Any, seed: int) -> str:
    """A short hash of everything that determines a fine-tuning run except ``epochs``.

    A run with more epochs but the same key continues the shorter one, so the lead can use
    ``outputs/finetune/<run_key>`` as ``out_dir`` and get resumption and reuse for free.
    """
    payload = dataclasses.asdict(c)
    payload.pop("epochs")
    return stable_hash(
        {
            "train": payload,
            "backbone": backbone_identity,
            "dataset": dataset_identity,
            "seed": seed,
        }
    )
