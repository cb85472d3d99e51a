"""Fine-tune a backbone with a metric-learning loss (the study's SupCon / ArcFace / triplet
baselines) and save a checkpoint that a backbone config loads back via ``weights=<path>``.

One epoch = ``steps_per_epoch`` P x K class-balanced batches of training images, each image
expanded into augmented views, embedded as CLS or GeM(patch tokens) + L2 norm (the pooling
module's own ``ClsPooling`` / ``GeMPooling``), and scored by the loss; AdamW updates the whole
backbone (``lr``) and any learnable loss parameters (``head_lr``) under a linear warmup and a
cosine decay, with gradient-norm clipping, and on CUDA fp16 autocast with a GradScaler.

Feedback: a tqdm bar per epoch (loss, images/s); ``on_step`` gets loss and lr every step;
``val_fraction`` of the train identities is held out of training and scored every
``val_every`` steps (default: each epoch) with the frozen runs' evaluation
(:func:`craterlab.metrics.evaluate` on cosine rankings of the same embedding): one image per
held-out identity queries the others. The best-scoring weights go to ``best.pt``, the final
ones to ``model.pt``; each gets a lineage sidecar (:mod:`craterlab.backbones.lineage`).

Resumable and repeatable: after every epoch ``out_dir/train_state.pt`` holds the model,
optimizer, scaler, loss state and epoch. Starting the same run again (same config, backbone,
dataset, seed) continues after the last finished epoch; a finished run returns its checkpoint
at once. Sampling and augmentation randomness derive from ``(seed, epoch)`` and the learning
rate from the global step, so a resumed run reproduces the uninterrupted one and two CPU runs
with one seed give identical weights. (Raising ``epochs`` on a finished run stretches the
cosine over the new total: the continuation is then not the run a longer schedule would give.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from craterlab.backbones.lineage import finetune_step, lineage_of, read_lineage, write_lineage
from craterlab.devices import resolve_device
from craterlab.errors import ConfigError, CraterlabError, DataError
from craterlab.metrics import evaluate, rank_scores
from craterlab.plugins import get_registry
from craterlab.registry import Registry
from craterlab.tokens.pooling import ClsPooling, GeMPooling
from craterlab.train.augment import make_views
from craterlab.train.config import TrainConfig, run_key, validate_train_config
from craterlab.train.sampling import pk_batches
from craterlab.train.training_state import (
    atomic_save,
    cpu_state,
    epoch_seed,
    read_state,
    rng_devices,
)
from craterlab.types import Backbone, CraterDataset, Features

log = logging.getLogger("craterlab.train")

STATE_FILE = "train_state.pt"
CHECKPOINT_FILE = "model.pt"
BEST_FILE = "best.pt"
STATE_VERSION = 2
VAL_CACHE_IMAGES = 1024  # held-out images kept decoded in memory between validations

MetricsCallback = Callable[[int, dict[str, float]], None]
EpochCallback = MetricsCallback  # kept for callers that name the old alias


def embedding_pooling(embedding: str, gem_p: float = 3.0) -> Callable[[Features], torch.Tensor]:
    """The pooling that makes the training embedding: the pooling module's CLS or GeM."""
    if embedding == "cls":
        return ClsPooling()
    if embedding == "gem":
        return GeMPooling(p=gem_p)
    raise ValueError(f"unknown embedding {embedding!r}; use 'cls' or 'gem'")


def embed(features: Features, embedding: str, gem_p: float = 3.0) -> torch.Tensor:
    """The training embedding: CLS or GeM (p) over patch tokens, L2-normalized (differentiable)."""
    return embedding_pooling(embedding, gem_p)(features)


def training_neck(neck: str, dim: int) -> torch.nn.Module:
    """What sits between the embedding and the loss during training only.

    ``bn``: a BatchNorm1d without affine parameters or running statistics (the "BNNeck" of
    re-identification baselines, the BN before the embedding of insightface's ArcFace head).
    It standardizes each dimension over the batch, so the loss cannot be lowered by shrinking
    every embedding towards one shared vector, the collapse that batch-hard triplet and
    ArcFace fall into from random weights. It has no state: evaluation and checkpoints are the
    backbone's alone.
    """
    if neck == "none":
        return torch.nn.Identity()
    if neck == "bn":
        return torch.nn.BatchNorm1d(dim, affine=False, track_running_stats=False)
    raise ValueError(f"unknown train.neck {neck!r}; use 'none' or 'bn'")


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The learning-rate multiplier at ``step`` (0-based): linear warmup over ``warmup`` steps
    from 1/(warmup+1), then constant or a cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class ValidationSplit:
    """Held-out train identities: one query image each, their other images the gallery."""

    queries: list[int]  # indices into the train records
    gallery: list[int]
    identities: list[int]  # held-out crater ids

    @property
    def images(self) -> list[int]:
        return self.queries + self.gallery


def split_validation(
    records: list[Any], fraction: float, seed: int
) -> tuple[list[int], ValidationSplit | None]:
    """Train record indices, and the held-out slice (None when there is too little to hold out).

    ``round(fraction x identities)`` identities, drawn with ``seed``, leave training; at least
    2 must have 2+ images and at least 2 must remain for training, else nothing is held out.
    """
    everything = list(range(len(records)))
    ids = sorted({r.crater_id for r in records})
    n_val = round(fraction * len(ids))
    if fraction <= 0 or n_val < 2 or len(ids) - n_val < 2:
        if fraction > 0:
            log.warning(
                "train.val_fraction=%s holds out %d of %d identities: too few to validate on "
                "(needs >= 2 held out and >= 2 left); training on all of them, no validation.",
                fraction,
                n_val,
                len(ids),
            )
        return everything, None
    held = set(random.Random(f"val-{seed}").sample(ids, n_val))
    by_id: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        if r.crater_id in held:
            by_id.setdefault(r.crater_id, []).append(i)
    queries = [rows[-1] for rows in by_id.values() if len(rows) >= 2]
    if len(queries) < 2:
        log.warning("the held-out identities have too few images to validate on; not validating")
        return everything, None
    gallery = sorted(i for rows in by_id.values() for i in rows if i not in set(queries))
    train = [i for i in everything if records[i].crater_id not in held]
    return train, ValidationSplit(sorted(queries), gallery, sorted(held))


class Validator:
    """Validation mAP of the held-out slice with the frozen runs' ranking and evaluation."""

    def __init__(
        self,
        split: ValidationSplit,
        records: list[Any],
        dataset: CraterDataset,
        backbone: Backbone,
        pooling: Callable[[Features], torch.Tensor],
        batch: int = 64,
    ) -> None:
        self.split, self.records, self.dataset = split, records, dataset
        self.backbone, self.pooling, self.batch = backbone, pooling, batch
        self._cache: torch.Tensor | None = None
        self.gallery_ids = [records[i].crater_id for i in split.gallery]
        self.relevant = [{records[i].crater_id} for i in split.queries]

    def _images(self, indices: list[int]) -> torch.Tensor:
        return torch.stack(
            [self.backbone.transform(self.dataset.load_image(self.records[i])) for i in indices]
        )

    def __call__(self, device: torch.device) -> dict[str, float]:
        images = self.split.images
        if self._cache is None and len(images) <= VAL_CACHE_IMAGES:
            self._cache = self._images(images)
        vectors = []
        for start in range(0, len(images), self.batch):
            chunk = images[start : start + self.batch]
            x = (
                self._cache[start : start + len(chunk)]
                if self._cache is not None
                else self._images(chunk)
            )
            vectors.append(self.pooling(self.backbone.encode(x.to(device))).float().cpu())
        v = torch.cat(vectors)
        nq = len(self.split.queries)
        scores = v[:nq] @ v[nq:].T
        result = evaluate(rank_scores(scores), self.gallery_ids, self.relevant)
        return {"val_mAP": result.metrics["mAP"], "val_R@1": result.metrics["R@1"]}


def finetune(
    train_cfg: Any,
    backbone: Backbone,
    dataset: CraterDataset,
    *,
    device: torch.device | str,
    seed: int,
    out_dir: str | os.PathLike[str],
    on_epoch_end: MetricsCallback | None = None,
    on_step: MetricsCallback | None = None,
    on_validation: MetricsCallback | None = None,
    registry: Registry | None = None,
    run_id: str | None = None,
) -> Path:
    """Train ``backbone.model`` on ``dataset.records("train")``; return ``out_dir/model.pt``.

    ``model.pt`` (and ``best.pt`` with validation) is a plain ``backbone.model.state_dict()``
    (CPU tensors, same keys) with a lineage sidecar naming ``run_id`` (the MLflow run that
    produced it). Callbacks: ``on_step(step, {loss, lr, grad_norm})`` every optimizer step
    (1-based global step), ``on_validation(step, {val_mAP, val_R@1})`` (step 0: before
    training), ``on_epoch_end(epoch, {loss, steps, seconds, lr, images_per_second[, val_mAP]})``
    after each newly trained epoch. ``registry`` defaults to the process-wide one.
    """
    cfg = validate_train_config(train_cfg, registry)
    if not cfg.enabled:
        raise ConfigError(
            "train=none means a frozen backbone; there is nothing to fine-tune. Choose a loss "
            "config (train=supcon, train=arcface or train=triplet) or skip fine-tuning."
        )
    dataset = with_train_views(dataset, cfg.train_views)
    records = list(dataset.records("train"))
    label_of = _labels(records, dataset)
    labels = [label_of[r.crater_id] for r in records]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = run_key(cfg, backbone.identity(), dataset.identity(), seed)
    state = read_state(
        out,
        STATE_FILE,
        "fine-tuning",
        STATE_VERSION,
        "Delete the directory to start over.",
        key=key,
        epochs=cfg.epochs,
        mismatch="holds a fine-tuning run with a different config, backbone, dataset or seed. "
        "Use another output directory, or delete it to start over.",
        epochs_option="train.epochs",
        elsewhere="output directory",
    )
    checkpoint = out / CHECKPOINT_FILE
    parent = lineage_of(backbone)
    if state is not None and state["epoch"] >= cfg.epochs:
        if not checkpoint.exists():
            atomic_save(state["model"], checkpoint)
        if read_lineage(checkpoint) is None:
            _write_lineages(out, parent, cfg, state, run_id)
        log.info("fine-tuning already finished (%d epochs): %s", state["epoch"], checkpoint)
        return checkpoint

    train_idx, val_split = split_validation(records, cfg.val_fraction, seed)
    train_labels = [labels[i] for i in train_idx]
    device = resolve_device(device)
    backbone = backbone.to(device)
    model = backbone.model
    pooling = embedding_pooling(cfg.embedding, cfg.gem_p)
    loss_fn = _build_loss(cfg, registry).to(device)
    neck = training_neck(cfg.neck, backbone.dim).to(device)
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(seed)  # seeded class weights (ArcFace), sized from the data
        if callable(getattr(loss_fn, "bind", None)):
            loss_fn.bind(len(label_of), backbone.dim, device)
    groups = [{"params": list(model.parameters()), "lr": cfg.lr}]
    head = list(loss_fn.parameters())
    if head:
        groups.append({"params": head, "lr": cfg.head_lr})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history: list[dict[str, float]] = []
    start, best_map, best_step = 0, -math.inf, 0
    if state is not None:
        model.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        history, start = state["history"], state["epoch"]
        best_map, best_step = state["best_map"], state["best_step"]
        log.info("resuming fine-tuning from epoch %d/%d in %s", start, cfg.epochs, out)

    n_classes = len({labels[i] for i in train_idx})
    images_per_step = min(cfg.classes, n_classes) * cfg.images_per_class
    steps = cfg.steps_per_epoch or max(1, len(train_idx) // images_per_step)
    total_steps = steps * cfg.epochs
    warmup_steps = int(cfg.warmup * total_steps)
    views = make_views(cfg)
    validator = (
        Validator(val_split, records, dataset, backbone, pooling) if val_split is not None else None
    )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_flags = [p.requires_grad for p in model.parameters()]

    def validate(step: int) -> float:
        nonlocal best_map, best_step
        assert validator is not None
        metrics = validator(device)
        if on_validation is not None:
            on_validation(step, metrics)
        log.info("validation at step %d: mAP %.4f", step, metrics["val_mAP"])
        if step > 0 and metrics["val_mAP"] > best_map:
            best_map, best_step = metrics["val_mAP"], step
            atomic_save(cpu_state(model), out / BEST_FILE)
        return metrics["val_mAP"]

    model.requires_grad_(True)
    model.train()
    try:
        if validator is not None and start == 0:
            validate(0)
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            val_map: float | None = None
            with torch.random.fork_rng(devices=rng_devices(device)):
                torch.manual_seed(epoch_seed(seed, epoch, salt=17))
                batches = pk_batches(
                    train_labels, cfg.classes, cfg.images_per_class, steps, f"{seed}-{epoch}"
                )
                total, images = 0.0, 0
                bar = tqdm(
                    batches,
                    desc=f"fine-tune epoch {epoch + 1}/{cfg.epochs}",
                    unit="step",
                    disable=not cfg.progress,
                    leave=False,
                )
                for step, batch in enumerate(bar):
                    global_step = epoch * steps + step
                    factor = lr_factor(global_step, total_steps, warmup_steps, cfg.schedule)
                    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                        group["lr"] = base * factor
                    rows = [train_idx[i] for i in batch]
                    x, y = _load_batch(rows, records, labels, dataset, backbone, views)
                    with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                        features = backbone.forward_features(x.to(device))
                    if getattr(loss_fn, "takes_features", False):  # token-aware losses
                        loss = loss_fn(features, y.to(device))
                    else:
                        loss = loss_fn(neck(pooling(features).float()), y.to(device))
                    if not torch.isfinite(loss):
                        raise CraterlabError(
                            f"Fine-tuning loss became {loss.item()} at epoch {epoch + 1}, step "
                            f"{step + 1}. Lower train.lr / train.head_lr, or use another loss."
                        )
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    grad_norm = math.nan
                    if cfg.grad_clip is not None:
                        scaler.unscale_(optimizer)
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
                    scaler.step(optimizer)
                    scaler.update()
                    value = loss.item()
                    total += value
                    images += len(y)
                    rate = images / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{value:.4f}", img_s=f"{rate:.1f}")
                    if on_step is not None:
                        on_step(
                            global_step + 1,
                            {"loss": value, "lr": base_lrs[0] * factor, "grad_norm": grad_norm},
                        )
                    last = step == len(batches) - 1
                    due = cfg.val_every is not None and (global_step + 1) % cfg.val_every == 0
                    final = last and (cfg.val_every is None or epoch == cfg.epochs - 1)
                    if validator is not None and (due or final):
                        val_map = validate(global_step + 1)
                        model.train()
                bar.close()
            seconds = time.perf_counter() - t0
            metrics = {
                "loss": total / len(batches),
                "steps": float(len(batches)),
                "seconds": seconds,
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_second": images / max(seconds, 1e-9),
            }
            if val_map is not None:
                metrics["val_mAP"] = val_map
            history.append(metrics)
            atomic_save(
                {
                    "version": STATE_VERSION,
                    "run_key": key,
                    "epoch": epoch + 1,
                    "model": cpu_state(model),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "loss": loss_fn.state_dict(),
                    "history": history,
                    "best_map": best_map,
                    "best_step": best_step,
                    "seed": seed,
                },
                out / STATE_FILE,
            )
            log.info("fine-tuning epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, metrics["loss"])
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, metrics)
    finally:
        model.eval()
        for p, flag in zip(model.parameters(), grad_flags, strict=True):
            p.requires_grad_(flag)
    atomic_save(cpu_state(model), checkpoint)
    (out / "history.json").write_text(json.dumps(history, indent=1))
    _write_lineages(out, parent, cfg, {"best_map": best_map, "best_step": best_step}, run_id)
    return checkpoint


def with_train_views(dataset: CraterDataset, views: int | None) -> CraterDataset:
    """The dataset with ``views`` rendered illumination/placement views per train identity
    (``train.train_views``, the multi-view option); unchanged for None.

    Only a dataset that can render new views of an identity has ``with_train_views`` (the
    synthetic benchmark); any other is refused rather than silently trained as it is.
    """
    if views is None:
        return dataset
    render = getattr(dataset, "with_train_views", None)
    if not callable(render):
        name = getattr(dataset, "name", type(dataset).__name__)
        raise ConfigError(
            f"train.train_views={views} asks for rendered views per identity, but dataset "
            f"{name!r} holds fixed images and cannot render new ones (only the synthetic "
            "benchmark can). Remove train.train_views, or add more views per crater to the "
            "dataset's train split (several crops/illuminations per crater id in the manifest)."
        )
    return render(views)


def best_checkpoint(checkpoint: str | os.PathLike[str]) -> Path | None:
    """The best-validation checkpoint beside ``checkpoint`` (None without validation)."""
    best = Path(checkpoint).with_name(BEST_FILE)
    return best if best.exists() else None


def finetune_dir(
    root: str | os.PathLike[str],
    train_cfg: Any,
    backbone: Backbone,
    dataset: CraterDataset,
    seed: int,
    registry: Registry | None = None,
) -> Path:
    """``root/<run_key>``: a stable ``out_dir`` for one fine-tuning run.

    The key hashes the train config (except ``epochs`` and logging-only keys), the backbone
    and dataset identities and the seed, so starting the same run again resumes it (or reuses
    its checkpoint), and a run with more epochs continues the shorter one.
    """
    cfg = validate_train_config(train_cfg, registry)
    return Path(root) / run_key(cfg, backbone.identity(), dataset.identity(), seed)


# --------------------------------------------------------------------------- helpers


def _write_lineages(
    out: Path, parent: list[dict[str, Any]], cfg: TrainConfig, state: dict[str, Any], run_id
) -> None:
    loss = str((cfg.loss or {}).get("name"))
    last = out / CHECKPOINT_FILE
    write_lineage(
        last,
        parent + [finetune_step(last, loss=loss, epochs=cfg.epochs, which="last", run_id=run_id)],
    )
    best = out / BEST_FILE
    if best.exists():
        step = finetune_step(
            best,
            loss=loss,
            epochs=cfg.epochs,
            which="best",
            run_id=run_id,
            val_map=float(state["best_map"]),
        )
        step["step"] = int(state["best_step"])
        write_lineage(best, parent + [step])


def _labels(records: list[Any], dataset: CraterDataset) -> dict[int, int]:
    """crater_id -> contiguous class index; a DataError when there is nothing to learn."""
    name = getattr(dataset, "name", type(dataset).__name__)
    if not records:
        raise DataError(
            f"Dataset {name!r} has no training split (records('train') is empty), so it cannot "
            "be fine-tuned on. Use train=none (frozen backbone) or a dataset with a train split."
        )
    ids = sorted({r.crater_id for r in records})
    if len(ids) < 2:
        raise DataError(
            f"Dataset {name!r} has {len(ids)} crater identity in its train split; metric "
            "learning needs at least 2 (positives and negatives). Add training craters or use "
            "train=none."
        )
    return {cid: i for i, cid in enumerate(ids)}


def _build_loss(cfg: TrainConfig, registry: Registry | None) -> torch.nn.Module:
    if registry is None:
        registry = get_registry()
    loss = registry.build("loss", cfg.loss)
    if not isinstance(loss, torch.nn.Module):  # a plain callable from a plugin
        wrapper = torch.nn.Module()
        wrapper.forward = loss  # type: ignore[method-assign]
        wrapper.takes_features = getattr(loss, "takes_features", False)  # type: ignore[assignment]
        return wrapper
    return loss


def _load_batch(
    batch: list[int],
    records: list[Any],
    labels: list[int],
    dataset: CraterDataset,
    backbone: Backbone,
    views: Callable,
) -> tuple[torch.Tensor, torch.Tensor]:
    tensors, ys = [], []
    for i in batch:
        image = dataset.load_image(records[i])
        for view in views(image):
            tensors.append(backbone.transform(view))
            ys.append(labels[i])
    return torch.stack(tensors), torch.tensor(ys, dtype=torch.long)
