"""The ``train`` config group: its schema and validation.

``train`` is not a registry kind (there is one training loop), but its keys are checked by the
registry's own :func:`~craterlab.registry.check_config`, so an unknown key names the valid keys
and a wrong type names the expected type exactly as for any component. The ``loss``
sub-config is validated by the registry (kind ``loss``). ``name: none`` means a frozen backbone
and needs no other key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from craterlab.errors import ConfigError
from craterlab.hashing import stable_hash
from craterlab.plugins import get_registry
from craterlab.registry import Registry, check_config, schema_params, to_plain

DEFAULT_IMAGES_PER_CLASS = 4
"""K of the P x K sampler when ``classes_per_batch`` is left null (P = batch_size // K)."""

# Keys that change what is logged or saved, never the trained weights (left out of run_key).
NON_TRAINING_KEYS = ("epochs", "val_every", "log_checkpoints", "artifact_max_mb", "progress")


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning settings (conf/train/*.yaml). Defaults follow the study's baselines."""

    name: str = "none"
    loss: dict[str, Any] | None = None
    epochs: int = 30
    lr: float = 1.0e-5  # backbone learning rate (AdamW), the peak of the schedule
    head_lr: float = 1.0e-3  # learnable loss parameters (ArcFace class weights)
    weight_decay: float = 0.05
    schedule: Literal["cosine", "constant"] = "cosine"  # after the linear warmup
    warmup: float = 0.05  # share of all steps with a linear lr warmup from 0
    grad_clip: float | None = 1.0  # max global gradient norm (null: no clipping)
    amp: bool = True  # CUDA: fp16 autocast + GradScaler; ignored on CPU (fp32)
    batch_size: int = 64  # images per step = classes_per_batch x images per class
    classes_per_batch: int | None = None  # P of the P x K sampler (null: batch_size // 4)
    steps_per_epoch: int | None = None  # default: train images // batch_size
    augment: Literal["none", "single_crop", "multi_crop"] = "multi_crop"
    embedding: Literal["cls", "gem"] = "cls"
    gem_p: float = 3.0
    neck: Literal["none", "bn"] = "none"  # training only: batch-standardize before the loss
    global_crops: int = 2  # multi_crop: views at crop_scale
    local_crops: int = 4  # multi_crop: extra views at local_scale
    crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    flip: bool = True
    color_jitter: float = 0.4  # brightness / contrast strength (saturation half of it)
    train_views: int | None = None  # multi-view: rendered views per train identity (null: data's)
    val_fraction: float = 0.1  # train identities held out for validation mAP (0: none)
    val_every: int | None = None  # validate every N steps (null: at the end of each epoch)
    log_checkpoints: Literal["auto", "artifact", "path"] = "auto"  # how MLflow records them
    artifact_max_mb: float = 100.0  # auto: upload checkpoints up to this size, else path + hash
    progress: bool = True  # a tqdm bar per epoch (loss, images/s)

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    @property
    def classes(self) -> int:
        """P of the P x K sampler (``classes_per_batch``, or ``batch_size // 4``)."""
        if self.classes_per_batch is not None:
            return self.classes_per_batch
        return max(2, self.batch_size // DEFAULT_IMAGES_PER_CLASS)

    @property
    def images_per_class(self) -> int:
        """K of the P x K sampler."""
        return self.batch_size // self.classes

    @property
    def views_per_image(self) -> int:
        if self.augment == "multi_crop":
            return self.global_crops + self.local_crops
        return 1


PARAMS = schema_params(TrainConfig)
VALID_KEYS: tuple[str, ...] = tuple(p.name for p in PARAMS)


def validate_train_config(cfg: Any, registry: Registry | None = None) -> TrainConfig:
    """Check a ``train`` config (dict or DictConfig) and return it typed.

    Raises :class:`ConfigError` for an unknown key, a wrong type (both through the registry's
    ``check_config``), an impossible value, or a loss config the ``loss`` registry rejects.
    Call it at run start to fail before encoding.
    """
    values = to_plain(cfg)
    if isinstance(values.get("loss"), str):
        values["loss"] = {"name": values["loss"]}
    kwargs = check_config(PARAMS, values, label="train", group="train", skip=frozenset())
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
    if c.train_views is not None and c.train_views < 0:
        problems.append("train_views must be >= 0 or null")
    for key in ("steps_per_epoch", "val_every"):
        if getattr(c, key) is not None and getattr(c, key) < 1:
            problems.append(f"{key} must be >= 1 or null")
    for key in ("lr", "head_lr", "gem_p", "artifact_max_mb"):
        if not getattr(c, key) > 0:
            problems.append(f"{key} must be > 0")
    if c.grad_clip is not None and not c.grad_clip > 0:
        problems.append("grad_clip must be > 0 or null")
    if not 0 <= c.warmup < 1:
        problems.append("warmup must be in [0, 1) (a share of all steps)")
    if not 0 <= c.val_fraction < 1:
        problems.append("val_fraction must be in [0, 1)")
    if c.weight_decay < 0 or c.color_jitter < 0:
        problems.append("weight_decay and color_jitter must be >= 0")
    if c.classes < 2:
        problems.append("classes_per_batch must be >= 2 (a batch needs negatives)")
    elif c.images_per_class < 2:
        problems.append(
            f"batch_size ({c.batch_size}) must be at least 2 x classes_per_batch "
            f"({c.classes}) so every identity in a batch has a positive; raise batch_size, "
            "lower classes_per_batch, or set it to null (batch_size // 4 identities)"
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
        registry = get_registry()
    registry.build("loss", c.loss)  # raises ConfigError naming the valid loss keys


def run_key(c: TrainConfig, backbone_identity: Any, dataset_identity: Any, seed: int) -> str:
    """A short hash of everything that determines a fine-tuning run's weights but ``epochs``.

    A run with more epochs but the same key continues the shorter one, so the lead can use
    ``outputs/finetune/<run_key>`` as ``out_dir`` and get resumption and reuse for free.
    Logging-only keys (:data:`NON_TRAINING_KEYS`) are left out too.
    """
    payload = dataclasses.asdict(c)
    for key in NON_TRAINING_KEYS:
        payload.pop(key)
    payload["classes_per_batch"] = c.classes
    if payload["neck"] == "none":  # the key before the neck existed: earlier runs still resume
        del payload["neck"]
    return stable_hash(
        {
            "train": payload,
            "backbone": backbone_identity,
            "dataset": dataset_identity,
            "seed": seed,
        }
    )
