"""The ``pretrain`` config group (conf/pretrain/*.yaml): DINO self-distillation settings.

Checked like the ``train`` group, by the registry's :func:`~craterlab.registry.check_config`:
an unknown key names the valid keys, a wrong type names the expected type, and impossible
values are listed in one paragraph that says where to fix them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from craterlab.errors import ConfigError
from craterlab.hashing import stable_hash
from craterlab.registry import check_config, schema_params, to_plain

# Keys that change what is logged or saved, never the trained weights (left out of run_key).
NON_TRAINING_KEYS = (
    "epochs",
    "eval_every",
    "eval_k",
    "log_checkpoints",
    "artifact_max_mb",
    "progress",
    "images",
    "splits",
    "out_dir",
)
# The patch objective's settings: left out of run_key while it is off, so a run made before
# they existed keeps its key (and resumes).
PATCH_KEYS = ("patch_weight", "patch_head", "mask_ratio", "mask_share", "patch_teacher_temp")
# The token-contrastive objective's settings: likewise left out of run_key while it is off.
TOKEN_KEYS = ("token_weight", "token_temperature")
OPTIONAL_OBJECTIVES = {"patch_loss": PATCH_KEYS, "token_loss": TOKEN_KEYS}
"""Each optional objective's switch and its settings: while the switch is "none", both are
left out of run_key."""


@dataclass(frozen=True)
class PretrainConfig:
    """DINO settings. Defaults follow DINO's ViT recipe, scaled to what fits on one GPU."""

    name: str = "dino"
    # input: a folder of crops or a manifest CSV (null: the dataset group's images)
    images: str | None = None
    splits: list[str] = field(default_factory=lambda: ["train"])  # dataset splits to use
    # paired views: the crops of one place come from different images of it (repeat coverage)
    pair_views: Literal["none", "place", "coordinates"] = "none"
    pair_radius: float | None = None  # coordinates: km for lat/lon, else the dataset's map units
    # schedule
    epochs: int = 100
    steps_per_epoch: int | None = None  # default: images // batch_size
    batch_size: int = 64
    lr: float = 5.0e-4  # peak AdamW lr after the linear warmup (cosine decay to min_lr)
    min_lr: float = 1.0e-6
    warmup: float = 0.1  # share of all steps with a linear lr warmup
    weight_decay: float = 0.04  # cosine-scheduled to weight_decay_end (DINO)
    weight_decay_end: float = 0.4
    grad_clip: float | None = 3.0
    momentum: float = 0.996  # teacher EMA momentum, cosine-scheduled to momentum_end
    momentum_end: float = 1.0
    # DINO head and loss (lightly's DINOProjectionHead and DINOLoss)
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    head_batch_norm: bool = False  # BatchNorm in the head's MLP (against collapse from scratch)
    freeze_last_layer: float = 0.01  # share of steps with the head's last layer frozen
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # reached after teacher_temp_warmup
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup: float = 0.3  # share of steps of the linear teacher-temperature warmup
    center_momentum: float = 0.9
    embedding: Literal["cls", "gem"] = "cls"  # what the head sees
    # token-level objective: iBOT masked patch prediction (lightly's IBOTPatchLoss)
    patch_loss: Literal["none", "ibot"] = "none"
    patch_weight: float = 1.0  # total loss = DINO loss + patch_weight * patch loss
    patch_head: Literal["separate", "shared"] = "separate"  # shared: the DINO head (iBOT)
    mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])  # per masked crop
    mask_share: float = 0.5  # share of the global crops that are masked (DINOv2)
    patch_teacher_temp: float | None = None  # the patch teacher's; null: teacher_temp's schedule
    # token-level objective: contrastive over late-interaction scores of the global crops
    token_loss: Literal["none", "late_interaction"] = "none"
    token_weight: float = 1.0  # total loss = DINO (+ patch) loss + token_weight * token loss
    token_temperature: float = 0.05  # softmax temperature over the batch's LI scores
    # multi-crop views for grey orbital imagery (no colour jitter)
    global_crops: int = 2
    local_crops: int = 6
    global_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    local_size: int | None = None  # pixels; null: 96/224 of the model's input size
    azimuth: Literal["dihedral", "flip", "none"] = "dihedral"  # sun-direction changes
    gamma: list[float] = field(default_factory=lambda: [0.7, 1.4])
    contrast: float = 0.4  # contrast factor drawn from [1 - c, 1 + c]
    brightness: float = 0.2  # additive offset drawn from [-b, b]
    blur_prob: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 1.5])  # pixels
    noise: float = 0.03  # Gaussian noise std drawn from [0, noise] (0..1 grey scale)
    amp: bool = True  # CUDA: fp16 autocast + GradScaler
    # evaluation, logging, checkpoints
    eval_every: int | None = 1  # epochs between retrieval checks on a labelled set (null: off)
    eval_k: int = 32  # tokens per image for the late-interaction check
    cache_mb: float = 1024.0  # decoded grey images kept in memory
    log_checkpoints: Literal["auto", "artifact", "path"] = "auto"
    artifact_max_mb: float = 100.0
    progress: bool = True
    out_dir: str | None = None  # null: outputs/pretrain/<run key>

    @property
    def views(self) -> int:
        return self.global_crops + self.local_crops


PARAMS = schema_params(PretrainConfig)
VALID_KEYS: tuple[str, ...] = tuple(p.name for p in PARAMS)


def validate_pretrain_config(cfg: Any) -> PretrainConfig:
    """Check a ``pretrain`` config (dict, DictConfig or PretrainConfig) and return it typed
    (ConfigError)."""
    values = dataclasses.asdict(cfg) if isinstance(cfg, PretrainConfig) else to_plain(cfg)
    kwargs = check_config(PARAMS, values, label="pretrain", group="pretrain", skip=frozenset())
    config = PretrainConfig(**kwargs)
    _check_values(config)
    return config


def _check_values(c: PretrainConfig) -> None:
    problems = []
    if c.name != "dino":
        problems.append(f"name must be 'dino' (the only method), got {c.name!r}")
    for key in ("epochs", "batch_size", "global_crops", "out_dim", "hidden_dim", "eval_k"):
        if getattr(c, key) < 1:
            problems.append(f"{key} must be >= 1")
    if c.bottleneck_dim < 1:
        problems.append("bottleneck_dim must be >= 1")
    if c.local_crops < 0:
        problems.append("local_crops must be >= 0")
    if c.views < 2:
        problems.append(
            "DINO needs at least 2 views per image (global_crops + local_crops >= 2): the "
            "student learns to predict the teacher's output for another view"
        )
    if c.batch_size < 2:
        problems.append("batch_size must be >= 2 (centring averages over the batch)")
    for key in ("steps_per_epoch", "eval_every", "local_size"):
        if getattr(c, key) is not None and getattr(c, key) < 1:
            problems.append(f"{key} must be >= 1 or null")
    for key in ("lr", "student_temp", "teacher_temp", "warmup_teacher_temp", "artifact_max_mb"):
        if not getattr(c, key) > 0:
            problems.append(f"{key} must be > 0")
    if not 0 <= c.min_lr <= c.lr:
        problems.append("min_lr must be in [0, lr]")
    if c.grad_clip is not None and not c.grad_clip > 0:
        problems.append("grad_clip must be > 0 or null")
    for key in ("warmup", "teacher_temp_warmup", "freeze_last_layer", "blur_prob"):
        if not 0 <= getattr(c, key) <= 1:
            problems.append(f"{key} must be in [0, 1]")
    for key in ("momentum", "momentum_end", "center_momentum"):
        if not 0 <= getattr(c, key) <= 1:
            problems.append(f"{key} must be in [0, 1]")
    if c.weight_decay < 0 or c.weight_decay_end < 0:
        problems.append("weight_decay and weight_decay_end must be >= 0")
    for key in ("contrast", "brightness", "noise", "cache_mb"):
        if getattr(c, key) < 0:
            problems.append(f"{key} must be >= 0")
    for key in ("global_scale", "local_scale"):
        lo_hi = getattr(c, key)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            problems.append(f"{key} must be [low, high] with 0 < low <= high <= 1")
    for key in ("gamma", "blur_sigma"):
        lo_hi = getattr(c, key)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
            problems.append(f"{key} must be [low, high] with 0 < low <= high")
    if c.pair_radius is not None and not c.pair_radius > 0:
        problems.append("pair_radius must be > 0 or null")
    if c.pair_views == "coordinates" and c.pair_radius is None:
        problems.append(
            "pair_views=coordinates needs pair_radius (how close two images' centres must be "
            "to show one place: km for lat/lon, else the dataset's map units)"
        )
    if not c.patch_weight > 0:
        problems.append(
            "patch_weight must be > 0 (to train without the patch loss: patch_loss=none)"
        )
    if len(c.mask_ratio) != 2 or not 0 < c.mask_ratio[0] <= c.mask_ratio[1] < 1:
        problems.append(
            "mask_ratio must be [low, high] with 0 < low <= high < 1 (the share of a masked "
            "crop's patch tokens; iBOT/DINOv2 use [0.1, 0.5])"
        )
    if c.patch_teacher_temp is not None and not c.patch_teacher_temp > 0:
        problems.append("patch_teacher_temp must be > 0 or null (the DINO teacher's schedule)")
    if not c.token_weight > 0:
        problems.append(
            "token_weight must be > 0 (to train without the token loss: token_loss=none)"
        )
    if not c.token_temperature > 0:
        problems.append("token_temperature must be > 0 (0.05: the fine-tuning loss's default)")
    if not 0 < c.mask_share <= 1:
        problems.append("mask_share must be in (0, 1] (the share of global crops masked)")
    if not c.splits and c.images is None:
        problems.append("splits is empty and no images folder/manifest is given")
    if problems:
        raise ConfigError(
            f"pretrain {c.name!r} has invalid values: {'; '.join(problems)}. "
            "Fix them in conf/pretrain/ or on the command line (pretrain.KEY=VALUE)."
        )


def run_key(c: PretrainConfig, backbone_identity: Any, data_identity: Any, seed: int) -> str:
    """A short hash of everything that determines the pretrained weights but ``epochs``.

    Starting the same run again resumes it; a run with more epochs continues a shorter one.
    """
    payload = dataclasses.asdict(c)
    for key in NON_TRAINING_KEYS:
        payload.pop(key)
    for switch, keys in OPTIONAL_OBJECTIVES.items():
        if getattr(c, switch) == "none":
            for key in (switch, *keys):
                payload.pop(key)
    return stable_hash(
        {"pretrain": payload, "backbone": backbone_identity, "data": data_identity, "seed": seed}
    )
