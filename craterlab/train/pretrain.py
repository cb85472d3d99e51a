"""DINO self-distillation of a timm ViT on unlabeled crater images (in-domain pretraining).

A student (the backbone's own model plus a DINO projection head) learns to match, on every
view of an image, the output of an EMA teacher on the image's global views: lightly provides
the DINO head (:class:`~lightly.models.modules.DINOProjectionHead`), the loss with its
centring and sharpening (:class:`~lightly.loss.DINOLoss`), the momentum update and the cosine
schedules; this module feeds them multi-crop views of grey orbital imagery
(:mod:`craterlab.train.ssl_views`) and runs the schedules per step: AdamW learning rate (linear
warmup, cosine decay), weight decay (cosine up), teacher momentum (cosine to 1), teacher
temperature (linear warmup), the head's last layer frozen for the first steps. With
``patch_loss=ibot`` the student also sees its global crops with block-masked patch tokens and
predicts the teacher's projected tokens there (iBOT, :mod:`craterlab.train.ssl_patch`).

The result is the teacher's backbone, saved as a plain ``state_dict`` (``model.pt``) with a
lineage sidecar ("self-supervised on <data>, from <start>"), so ``backbone.weights=<path>`` or
``backbone.weights=run:<id>`` loads it like any checkpoint.

Resumable: after every epoch ``train_state.pt`` holds student, teacher, heads, optimizer,
loss centre and history, and ``model.pt`` the teacher so far; starting the same run again
continues after the last finished epoch (sampling and augmentation randomness derive from
``(seed, epoch)``, the schedules from the global step). A non-finite loss stops the run before
the weights are touched, naming the step; ``model.pt`` then still holds the last good epoch.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from craterlab.backbones.lineage import lineage_of, pretrain_step, start_text, write_lineage
from craterlab.devices import resolve_device
from craterlab.errors import ConfigError, CraterlabError, DataError
from craterlab.train.pretrain_config import PretrainConfig, run_key, validate_pretrain_config
from craterlab.train.ssl_pairs import pick_views, place_groups
from craterlab.train.ssl_patch import (
    block_masks,
    check_grid,
    grid_of,
    masked_encoder,
    patch_loss,
    python_random,
    require_vit,
)
from craterlab.train.ssl_tokens import require_patch_tokens, token_contrast_loss
from craterlab.train.ssl_views import MultiCrop
from craterlab.train.training_state import (
    atomic_save,
    cpu_state,
    epoch_seed,
    read_state,
    rng_devices,
)
from craterlab.types import Backbone, CraterDataset

log = logging.getLogger("craterlab.pretrain")

STATE_FILE = "train_state.pt"
CHECKPOINT_FILE = "model.pt"
STATE_VERSION = 1
LOCAL_FRACTION = 96 / 224  # DINO's local/global crop sizes

MetricsCallback = Callable[[int, dict[str, float]], None]
Evaluator = Callable[[Backbone], dict[str, float]]


class PretrainDiverged(CraterlabError):
    """The loss became non-finite; ``checkpoint`` is the last good one (or None)."""

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


# --------------------------------------------------------------------------- images


class ImageSource:
    """Unlabeled images for pretraining: some splits of a dataset (labels unused), as grey
    uint8 tensors, decoded once and kept in memory up to ``cache_mb``."""

    def __init__(
        self,
        dataset: CraterDataset,
        splits: Sequence[str] = ("train",),
        name: str | None = None,
        cache_mb: float = 1024.0,
    ) -> None:
        self.dataset = dataset
        self.splits = list(splits)
        self.name = name or str(getattr(dataset, "name", type(dataset).__name__))
        self.records = [r for s in self.splits for r in dataset.records(s)]
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._budget = int(cache_mb * 2**20)
        self._bytes = 0
        self.manifest: str | None = None  # the manifest CSV the images were listed in, if any

    def __len__(self) -> int:
        return len(self.records)

    def identity(self) -> dict[str, Any]:
        return {"dataset": self.dataset.identity(), "splits": self.splits}

    def describe(self) -> str:
        """What the weights are 'self-supervised on' (name, splits, image count)."""
        return f"{self.name} [{'+'.join(self.splits)}, {len(self)} images]"

    def grey(self, i: int) -> torch.Tensor:
        """Image ``i`` as a (1, H, W) uint8 tensor (its luminance)."""
        if i in self._cache:
            return self._cache[i]
        image = self.dataset.load_image(self.records[i]).convert("L")
        t = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        t = t.view(1, image.height, image.width)
        if t.numel() <= self._budget:
            self._cache[i] = t
            self._bytes += t.numel()
            while self._bytes > self._budget and self._cache:
                _, old = self._cache.popitem(last=False)
                self._bytes -= old.numel()
        return t

    def sizes(self) -> list[tuple[int, int]]:
        """(width, height) of every image: from file headers, the dataset's fixed size, or by
        decoding (cached) when neither is known."""
        fixed = getattr(self.dataset, "image_size", None)
        if isinstance(fixed, int):
            return [(fixed, fixed)] * len(self)
        out = []
        for i, r in enumerate(self.records):
            path = getattr(r, "path", None)
            if path and os.path.isfile(str(path)):
                from PIL import Image

                with Image.open(str(path)) as im:
                    out.append(im.size)
            else:
                g = self.grey(i)
                out.append((g.shape[2], g.shape[1]))
        return out


def items_source(source: str, cache_mb: float = 1024.0) -> ImageSource:
    """A folder of crops or a manifest CSV (``ingest`` / ``dataset export`` output) as images."""
    from craterlab.workflows.items import ItemSet, load_items

    items = load_items(source)
    out = ImageSource(ItemSet(items, name=str(source)), ["gallery"], str(source), cache_mb)
    if str(source).lower().endswith(".csv"):
        out.manifest = str(source)
    return out


# --------------------------------------------------------------------------- model parts


def _embed(model: torch.nn.Module, x: torch.Tensor, embedding: str) -> torch.Tensor:
    """The vector the DINO head sees: the CLS token (or pre-logits) or GeM over patch tokens."""
    return _pool(model, model.forward_features(x), embedding)


def _pool(model: torch.nn.Module, feats: torch.Tensor, embedding: str) -> torch.Tensor:
    """:func:`_embed` from the model's token outputs ``feats``."""
    npt = int(getattr(model, "num_prefix_tokens", 1))
    if embedding == "gem":
        t = feats[:, npt:].float().clamp(min=1e-6)
        return t.pow(3).mean(1).pow(1 / 3)
    if getattr(model, "cls_token", None) is not None:
        return feats[:, 0]
    return model.forward_head(feats, pre_logits=True)


def copy_without_hooks(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` without its forward hooks (the backbone's attention hook
    belongs to the student; copying it would copy the whole backbone object too)."""
    saved = [(m, dict(m._forward_hooks)) for m in model.modules() if m._forward_hooks]
    for m, _ in saved:
        m._forward_hooks.clear()
    try:
        return copy.deepcopy(model)
    finally:
        for m, hooks in saved:
            m._forward_hooks.update(hooks)


def crop_sizes(backbone: Backbone, cfg: PretrainConfig) -> tuple[int, int, int]:
    """(global size, local size the images must cover, local size fed to the model)."""
    size = int(backbone.data_config["input_size"][-1])  # type: ignore[attr-defined]
    patch = getattr(getattr(backbone.model, "patch_embed", None), "patch_size", (16, 16))  # type: ignore[attr-defined]
    p = int(patch[0]) if isinstance(patch, tuple | list) else int(patch)
    local = cfg.local_size or max(p, round(size * LOCAL_FRACTION / p) * p)
    dynamic = bool(getattr(backbone.model, "dynamic_img_size", False))  # type: ignore[attr-defined]
    if not dynamic and local != size:
        log.info(
            "%s takes one input size only: local crops are resized to %d px (like the "
            "global ones); create the model with dynamic_img_size for cheaper local crops",
            getattr(backbone, "label", "the model"),
            size,
        )
    return size, local, local if dynamic else size


def check_images(
    source: ImageSource, cfg: PretrainConfig, local: int, places: int | None = None
) -> None:
    """Refuse inputs DINO cannot train on: too few images (or places, with paired views) for
    a batch, images below the local crop size."""
    n = len(source)
    if n < cfg.batch_size:
        raise DataError(
            f"Pretraining needs at least one full batch of images: {source.describe()} has {n}, "
            f"pretrain.batch_size is {cfg.batch_size}. Lower pretrain.batch_size (e.g. "
            f"pretrain.batch_size={max(2, n // 2)}), or add images (more splits with "
            "pretrain.splits=[train,gallery], or a larger folder)."
        )
    if places is not None and places < cfg.batch_size:
        raise DataError(
            f"With pretrain.pair_views={cfg.pair_views} a batch holds one place per element, "
            f"and {source.describe()} has {places} places for pretrain.batch_size "
            f"{cfg.batch_size}. Lower pretrain.batch_size (e.g. pretrain.batch_size="
            f"{max(2, places // 2)}), add images of more places, or turn pairing off "
            "(pretrain.pair_views=none)."
        )
    sizes = source.sizes()
    small = [(source.records[i].image_id, s) for i, s in enumerate(sizes) if min(s) < local]
    if small:
        shown = ", ".join(f"{rid} ({w}x{h})" for rid, (w, h) in small[:5])
        raise DataError(
            f"{len(small)} of {n} images are smaller than the local crop size ({local} px), so "
            f"their crops would be upsampled, not cropped: {shown}. Lower pretrain.local_size "
            f"(now {local}), remove the small images, or crop them larger (python -m craterlab "
            "ingest ... --crop-size N)."
        )


@contextmanager
def teacher_weights(model: torch.nn.Module, teacher: torch.nn.Module) -> Iterator[None]:
    """Temporarily put the teacher's weights into the backbone's model (for evaluation)."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(teacher.state_dict())
    try:
        yield
    finally:
        model.load_state_dict(saved)


# --------------------------------------------------------------------------- the loop


def pretrain(
    pretrain_cfg: Any,
    backbone: Backbone,
    source: ImageSource,
    *,
    device: torch.device | str,
    seed: int,
    out_dir: str | os.PathLike[str] | None = None,
    on_step: MetricsCallback | None = None,
    on_epoch_end: MetricsCallback | None = None,
    evaluate: Evaluator | None = None,
    run_id: str | None = None,
) -> Path:
    """DINO-pretrain ``backbone.model`` on ``source``; return the teacher's ``model.pt``.

    Callbacks: ``on_step(step, {loss, lr, weight_decay, momentum, teacher_temp})`` every step
    (with ``patch_loss=ibot`` also ``dino_loss`` and ``patch_loss``, with
    ``token_loss=late_interaction`` ``dino_loss`` and ``token_loss``; ``loss`` is their weighted
    sum), ``on_epoch_end(epoch, {loss, seconds, images_per_second, ...eval metrics})``;
    ``evaluate(backbone)`` (with the teacher's weights loaded) every ``eval_every`` epochs.
    """
    try:
        from lightly.loss import DINOLoss, IBOTPatchLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad, update_momentum
        from lightly.utils.scheduler import cosine_schedule, cosine_warmup_schedule
    except ImportError as exc:
        raise CraterlabError(
            f"Pretraining needs the lightly package ({exc}). Install it with "
            "pip install 'craterlab[pretrain]' (or pip install lightly)."
        ) from None

    cfg = validate_pretrain_config(pretrain_cfg)
    model = getattr(backbone, "model", None)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "forward_features"):
        raise ConfigError(
            f"Backbone {getattr(backbone, 'label', backbone)!r} has no timm model to train "
            "(pretraining needs a timm ViT or CNN backbone: backbone=dino_s16, or "
            "backbone.name=timm_vit backbone.model=...)."
        )
    global_size, local_need, local_size = crop_sizes(backbone, cfg)
    groups = None
    if cfg.pair_views != "none":
        groups = place_groups(source, cfg.pair_views, cfg.pair_radius)
    check_images(source, cfg, local_need, None if groups is None else len(groups))
    ibot = cfg.patch_loss == "ibot"
    contrast = cfg.token_loss == "late_interaction"
    if contrast:
        require_patch_tokens(model, cfg.global_crops)
    if ibot:
        require_vit(model)
        grid = grid_of(model, global_size)
        check_grid(grid, cfg.mask_ratio)
    units = groups or [[i] for i in range(len(source))]  # a batch element: one place's images
    key = run_key(cfg, backbone.identity(), source.identity(), seed)
    out = Path(cfg.out_dir or out_dir or Path("outputs") / "pretrain" / key)
    out.mkdir(parents=True, exist_ok=True)
    state = read_state(
        out,
        STATE_FILE,
        "pretraining",
        STATE_VERSION,
        "Delete the directory or use another pretrain.out_dir.",
        key=key,
        epochs=cfg.epochs,
        mismatch="holds a pretraining run with a different config, backbone (architecture or "
        "start weights), data or seed, so it cannot be resumed with this one. Use another "
        "pretrain.out_dir, or delete the directory to start over."
        + (
            " A run started without the patch objective cannot gain it midway (its state has "
            "no patch head, mask token or patch centre): to add pretrain.patch_loss=ibot to "
            "its weights, start a new pretrain.out_dir from them (backbone.weights="
            f"{out / CHECKPOINT_FILE})."
            if ibot
            else ""
        ),
        epochs_option="pretrain.epochs",
        elsewhere="out_dir",
    )
    checkpoint = out / CHECKPOINT_FILE
    parent = lineage_of(backbone)
    step_info = {
        "data": source.describe(),
        "start": start_text(parent),
        "method": method_text(cfg, groups is not None),
    }
    if state is not None and state["epoch"] >= cfg.epochs:
        log.info("pretraining already finished (%d epochs): %s", state["epoch"], checkpoint)
        if not checkpoint.exists():
            atomic_save(state["teacher"], checkpoint)
            _write_lineage(checkpoint, parent, step_info, state, run_id)
        return checkpoint

    device = resolve_device(device)
    backbone = backbone.to(device)  # type: ignore[assignment]
    dim = int(backbone.dim)  # type: ignore[attr-defined]

    def make_head() -> torch.nn.Module:
        with warnings.catch_warnings():  # lightly's head uses the older weight_norm API
            warnings.simplefilter("ignore", FutureWarning)
            return DINOProjectionHead(
                dim,
                cfg.hidden_dim,
                cfg.bottleneck_dim,
                cfg.out_dim,
                cfg.head_batch_norm,
                -1,
                cfg.norm_last_layer,
            ).to(device)

    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(seed)
        head = make_head()
        separate = ibot and cfg.patch_head == "separate"
        patch_head = make_head() if separate else head
    teacher = copy_without_hooks(model)
    teacher_head = make_head()  # weight_norm modules cannot be deep-copied: copy the state
    teacher_head.load_state_dict(head.state_dict())
    teacher_patch_head = teacher_head
    if separate:
        teacher_patch_head = make_head()
        teacher_patch_head.load_state_dict(patch_head.state_dict())
    deactivate_requires_grad(teacher)
    deactivate_requires_grad(teacher_head)
    deactivate_requires_grad(teacher_patch_head)
    mask_token = torch.nn.Parameter(torch.zeros(1, 1, dim, device=device))  # iBOT/DINOv2: zeros
    student_encoder = masked_encoder(model, mask_token) if ibot else None
    patch_criterion = None
    if ibot:
        patch_criterion = IBOTPatchLoss(
            output_dim=cfg.out_dim,
            teacher_temp=cfg.teacher_temp,
            student_temp=cfg.student_temp,
            center_momentum=cfg.center_momentum,
        ).to(device)
    criterion = DINOLoss(
        output_dim=cfg.out_dim,
        warmup_teacher_temp=cfg.warmup_teacher_temp,
        teacher_temp=cfg.teacher_temp,
        student_temp=cfg.student_temp,
        center_momentum=cfg.center_momentum,
    ).to(device)
    grad_flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(True)
    heads = [head, patch_head] if separate else [head]
    params = [p for m in [model, *heads] for p in m.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    if ibot:
        params.append(mask_token)
        no_decay.append(mask_token)
    optimizer = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history: list[dict[str, float]] = []
    start = 0
    if state is not None:
        model.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        head.load_state_dict(state["head"])
        teacher_head.load_state_dict(state["teacher_head"])
        criterion.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ibot:
            patch = state.get("patch")
            if patch is None:
                raise ConfigError(
                    f"{out} holds a pretraining state without the patch objective's parts "
                    "(patch head, mask token, patch centre), so it cannot resume with "
                    "pretrain.patch_loss=ibot. Start a new pretrain.out_dir from its weights "
                    f"(backbone.weights={checkpoint}), or resume it with pretrain.patch_loss=none."
                )
            mask_token.data.copy_(patch["mask_token"])
            patch_criterion.load_state_dict(patch["loss"])  # type: ignore[union-attr]
            if separate:
                patch_head.load_state_dict(patch["head"])
                teacher_patch_head.load_state_dict(patch["teacher_head"])
        history, start = state["history"], state["epoch"]
        log.info("resuming pretraining from epoch %d/%d in %s", start, cfg.epochs, out)

    steps = cfg.steps_per_epoch or max(1, len(units) // cfg.batch_size)
    total = steps * cfg.epochs
    warmup = int(cfg.warmup * total)
    tt_warmup = int(cfg.teacher_temp_warmup * total)
    freeze = int(cfg.freeze_last_layer * total)
    data_cfg = backbone.data_config  # type: ignore[attr-defined]
    crops = MultiCrop(cfg, global_size, local_size, data_cfg["mean"], data_cfg["std"])

    def schedules(step: int) -> dict[str, float]:
        lr = cosine_warmup_schedule(step, total, cfg.lr, cfg.min_lr, warmup, 0.0, cfg.lr)
        if step < warmup:  # lightly's warmup reaches the peak one step late; start above 0
            lr = cfg.lr * (step + 1) / (warmup + 1)
        if tt_warmup > 0 and step < tt_warmup:
            tt = cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * (
                step / tt_warmup
            )
        else:
            tt = cfg.teacher_temp
        return {
            "lr": lr,
            "weight_decay": cosine_schedule(step, total, cfg.weight_decay, cfg.weight_decay_end),
            "momentum": cosine_schedule(step, total, cfg.momentum, cfg.momentum_end),
            "teacher_temp": tt,
        }

    def save(epoch: int) -> None:
        snapshot = {
            "version": STATE_VERSION,
            "run_key": key,
            "epoch": epoch,
            "student": cpu_state(model),
            "teacher": cpu_state(teacher),
            "head": cpu_state(head),
            "teacher_head": cpu_state(teacher_head),
            "loss": cpu_state(criterion),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "history": history,
            "steps_per_epoch": steps,
            "seed": seed,
        }
        if ibot:
            snapshot["patch"] = {
                "mask_token": mask_token.detach().cpu().clone(),
                "loss": cpu_state(patch_criterion),  # its centre
            }
            if separate:
                snapshot["patch"]["head"] = cpu_state(patch_head)
                snapshot["patch"]["teacher_head"] = cpu_state(teacher_patch_head)
        atomic_save(snapshot, out / STATE_FILE)
        atomic_save(snapshot["teacher"], checkpoint)
        _write_lineage(checkpoint, parent, step_info, snapshot, run_id)

    prefix = int(getattr(model, "num_prefix_tokens", 1))  # CLS/register tokens before the patches
    model.train()
    try:
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            total_loss, total_patch, total_token, seen = 0.0, 0.0, 0.0, 0
            with (
                torch.random.fork_rng(devices=rng_devices(device)),
                python_random(epoch_seed(seed, epoch, salt=37)),
            ):
                torch.manual_seed(epoch_seed(seed, epoch, salt=31))
                order = list(range(len(units)))
                random.Random(f"{seed}-{epoch}").shuffle(order)
                pick_rng = random.Random(f"{seed}-{epoch}-views")
                bar = tqdm(
                    range(steps),
                    desc=f"pretrain epoch {epoch + 1}/{cfg.epochs}",
                    unit="step",
                    disable=not cfg.progress,
                    leave=False,
                )
                for step in bar:
                    g_step = epoch * steps + step
                    s = schedules(g_step)
                    optimizer.param_groups[0]["lr"] = s["lr"]
                    optimizer.param_groups[1]["lr"] = s["lr"]
                    optimizer.param_groups[0]["weight_decay"] = s["weight_decay"]
                    batch = [
                        order[(step * cfg.batch_size + j) % len(order)]
                        for j in range(cfg.batch_size)
                    ]
                    if groups is None:
                        images = [source.grey(units[u][0]).float().div(255) for u in batch]
                        globals_, locals_ = crops(images)
                    else:
                        globals_, locals_ = paired_views(source, crops, units, batch, pick_rng)
                    b = len(batch)
                    g_in = torch.cat(globals_).to(device)
                    p_loss = None
                    with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                        with torch.no_grad():
                            t_feats = teacher.forward_features(g_in)
                            t_out = teacher_head(_pool(teacher, t_feats, cfg.embedding)).float()
                        if student_encoder is None:
                            s_feats = model.forward_features(g_in)
                        else:  # the student sees the global crops with masked patch tokens
                            mask, block = block_masks(
                                len(g_in), grid, prefix, cfg.mask_ratio, cfg.mask_share, device
                            )
                            s_feats = student_encoder.encode(g_in, mask=mask)
                            p_loss = patch_loss(
                                patch_criterion,  # type: ignore[arg-type]
                                t_feats,
                                s_feats,
                                mask,
                                block,
                                teacher_patch_head,
                                patch_head,
                                cfg.patch_teacher_temp or s["teacher_temp"],
                            )
                        s_out = head(_pool(model, s_feats, cfg.embedding))
                        student = list(s_out.float().split(b))
                        if locals_:
                            l_in = torch.cat(locals_).to(device)
                            student += list(
                                head(_embed(model, l_in, cfg.embedding)).float().split(b)
                            )
                    loss = criterion(list(t_out.split(b)), student, teacher_temp=s["teacher_temp"])
                    extra = {"dino_loss": loss.item()} if ibot or contrast else {}
                    if p_loss is not None:
                        loss = loss + cfg.patch_weight * p_loss
                    if contrast:
                        tok_loss = token_contrast_loss(
                            s_feats[:, prefix:], b, cfg.token_temperature
                        )
                        extra["token_loss"] = tok_loss.item()
                        total_token += extra["token_loss"]
                        loss = loss + cfg.token_weight * tok_loss
                    if not torch.isfinite(loss):
                        raise _diverged(loss, epoch, step, g_step, cfg, out, checkpoint)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if cfg.grad_clip is not None:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    if g_step < freeze:
                        for h in heads:
                            for p in h.last_layer.parameters():
                                p.grad = None
                    scaler.step(optimizer)
                    scaler.update()
                    update_momentum(model, teacher, s["momentum"])
                    update_momentum(head, teacher_head, s["momentum"])
                    if separate:
                        update_momentum(patch_head, teacher_patch_head, s["momentum"])
                    value = loss.item()
                    total_loss += value
                    if ibot:
                        p_value = 0.0 if p_loss is None else p_loss.item()
                        total_patch += p_value
                        extra["patch_loss"] = p_value
                    seen += b
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{value:.4f}", img_s=f"{rate:.1f}")
                    if on_step is not None:
                        on_step(g_step + 1, {"loss": value, **extra, **s})
                bar.close()
            seconds = time.perf_counter() - t0
            metrics = {
                "loss": total_loss / steps,
                "seconds": seconds,
                "images_per_second": seen / max(seconds, 1e-9),
            }
            if ibot:
                metrics["patch_loss"] = total_patch / steps
            if contrast:
                metrics["token_loss"] = total_token / steps
            due = cfg.eval_every is not None and (
                (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
            )
            if evaluate is not None and due:
                with teacher_weights(model, teacher):
                    metrics.update(evaluate(backbone))
                model.train()
            history.append(metrics)
            save(epoch + 1)
            log.info("pretrain epoch %d/%d: %s", epoch + 1, cfg.epochs, metrics)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, metrics)
    finally:
        model.eval()
        for p, flag in zip(model.parameters(), grad_flags, strict=True):
            p.requires_grad_(flag)
    (out / "history.json").write_text(json.dumps(history, indent=1))
    return checkpoint


# --------------------------------------------------------------------------- helpers


def method_text(cfg: PretrainConfig, paired: bool) -> str:
    """The method in the weights' lineage: "dino", "dino + ibot patch loss x0.5", "..., views
    paired by place"."""
    text = "dino"
    if cfg.patch_loss == "ibot":
        text += f" + ibot patch loss x{cfg.patch_weight:g}"
    if cfg.token_loss == "late_interaction":
        text += f" + late-interaction contrast x{cfg.token_weight:g}"
    return f"{text}, views paired by {pair_text(cfg)}" if paired else text


def pair_text(cfg: PretrainConfig) -> str:
    """How views are paired, for the weights' lineage ("place", "coordinates within 2 km")."""
    if cfg.pair_views == "coordinates":
        return f"coordinates within {cfg.pair_radius:g}"
    return str(cfg.pair_views)


def paired_views(
    source: ImageSource,
    crops: MultiCrop,
    units: Sequence[Sequence[int]],
    batch: Sequence[int],
    rng: random.Random,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The multi-crop views of a batch of places, each crop cut from the image of its place
    that :func:`~craterlab.train.ssl_pairs.pick_views` picks (globals: distinct images)."""
    places = [units[u] for u in batch]
    picks = pick_views([len(p) for p in places], crops.cfg.global_crops, crops.cfg.local_crops, rng)

    def image(place: Sequence[int], k: int) -> torch.Tensor:
        return source.grey(place[k]).float().div(255)

    global_sources = [
        [image(p, g[k]) for p, (g, _) in zip(places, picks, strict=True)]
        for k in range(crops.cfg.global_crops)
    ]
    local_sources = [
        [image(p, loc[k]) for p, (_, loc) in zip(places, picks, strict=True)]
        for k in range(crops.cfg.local_crops)
    ]
    return crops.views(global_sources, local_sources)


def _diverged(
    loss: torch.Tensor,
    epoch: int,
    step: int,
    g_step: int,
    cfg: PretrainConfig,
    out: Path,
    checkpoint: Path,
) -> PretrainDiverged:
    good = checkpoint if checkpoint.exists() else None
    kept = (
        f"The last good weights (after epoch {epoch}) are kept in {good}; they load with "
        f"backbone.weights={good}. "
        if good is not None and epoch > 0
        else "No epoch had finished, so there is no checkpoint yet. "
    )
    return PretrainDiverged(
        f"DINO loss became {loss.item()} at step {g_step + 1} (epoch {epoch + 1}, batch "
        f"{step + 1}); the run stopped before that step changed any weight. {kept}Fix: lower "
        f"pretrain.lr (now {cfg.lr:g}), lengthen pretrain.warmup (now {cfg.warmup:g}) or keep "
        f"pretrain.grad_clip on (now {cfg.grad_clip}); then start again in a new directory "
        f"(pretrain.out_dir=...; this one is {out}).",
        good,
    )


def _write_lineage(
    checkpoint: Path,
    parent: list[dict[str, Any]],
    info: dict[str, str],
    state: dict[str, Any],
    run_id: str | None,
) -> None:
    step = pretrain_step(
        checkpoint,
        method=info["method"],
        data=info["data"],
        start=info["start"],
        epochs=int(state["epoch"]),
        steps=int(state["epoch"]) * int(state.get("steps_per_epoch", 0)),
        run_id=run_id,
    )
    write_lineage(checkpoint, parent + [step])


def elapsed_minutes(history: Sequence[dict[str, float]]) -> float:
    """Training minutes recorded in a run's history (sum of epoch seconds)."""
    return math.fsum(h.get("seconds", 0.0) for h in history) / 60
