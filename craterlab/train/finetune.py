"""Fine-tune a backbone with a metric-learning loss (the study's SupCon / ArcFace / triplet
baselines) and save a checkpoint that a backbone config loads back via ``weights=<path>``.

One epoch = ``steps_per_epoch`` P x K class-balanced batches of training images, each image
expanded into augmented views, embedded as CLS or GeM(patch tokens) + L2 norm, and scored by
the loss; AdamW updates the backbone (``lr``) and any learnable loss parameters (``head_lr``).

Resumable: after every epoch ``out_dir/train_state.pt`` holds the model, optimizer, loss state
and epoch. Starting the same run again (same config, backbone, dataset, seed) continues after
the last finished epoch; a finished run returns its checkpoint at once. Sampling and
augmentation randomness is derived from ``(seed, epoch)``, so a resumed run reproduces the
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from craterlab.devices import resolve_device
from craterlab.errors import ConfigError, CraterlabError, DataError
from craterlab.registry import Registry
from craterlab.train.augment import make_views
from craterlab.train.config import TrainConfig, run_key, validate_train_config
from craterlab.train.sampling import pk_batches
from craterlab.types import Backbone, CraterDataset, Features

log = logging.getLogger("craterlab.train")

STATE_FILE = "train_state.pt"
CHECKPOINT_FILE = "model.pt"
STATE_VERSION = 1

EpochCallback = Callable[[int, dict[str, float]], None]


def embed(features: Features, embedding: str, gem_p: float = 3.0) -> torch.Tensor:
    """The training embedding: CLS or GeM (p) over patch tokens, then L2-normalized."""
    if embedding == "cls":
        vec = features.cls
    elif embedding == "gem":
        vec = features.tokens.clamp_min(1e-6).pow(gem_p).mean(dim=1).pow(1.0 / gem_p)
    else:
        raise ValueError(f"unknown embedding {embedding!r}; use 'cls' or 'gem'")
    return F.normalize(vec.float(), dim=-1)


def finetune(
    train_cfg: Any,
    backbone: Backbone,
    dataset: CraterDataset,
    *,
    device: torch.device | str,
    seed: int,
    out_dir: str | os.PathLike[str],
    on_epoch_end: EpochCallback | None = None,
    registry: Registry | None = None,
) -> Path:
    """Train ``backbone.model`` on ``dataset.records("train")``; return ``out_dir/model.pt``.

    ``model.pt`` is a plain ``backbone.model.state_dict()`` (CPU tensors, same keys).
    ``on_epoch_end(epoch, metrics)`` is called after each newly trained epoch (1-based) with
    ``loss`` (mean over the epoch), ``steps``, ``seconds`` and ``lr``. ``registry`` defaults to
    the process-wide one (it builds the ``loss`` sub-config).
    """
    cfg = validate_train_config(train_cfg, registry)
    if not cfg.enabled:
        raise ConfigError(
            "train=none means a frozen backbone; there is nothing to fine-tune. Choose a loss "
            "config (train=supcon, train=arcface or train=triplet) or skip fine-tuning."
        )
    records = list(dataset.records("train"))
    label_of = _labels(records, dataset)
    labels = [label_of[r.crater_id] for r in records]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = run_key(cfg, backbone.identity(), dataset.identity(), seed)
    state = _load_state(out, key, cfg)
    checkpoint = out / CHECKPOINT_FILE
    if state is not None and state["epoch"] >= cfg.epochs:
        if not checkpoint.exists():
            _atomic_save(state["model"], checkpoint)
        log.info("fine-tuning already finished (%d epochs): %s", state["epoch"], checkpoint)
        return checkpoint

    device = resolve_device(device)
    backbone = backbone.to(device)
    model = backbone.model
    loss_fn = _build_loss(cfg, registry).to(device)
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)  # seeded class weights (ArcFace), sized from the data
        if callable(getattr(loss_fn, "bind", None)):
            loss_fn.bind(len(label_of), backbone.dim, device)
    params = [{"params": [p for p in model.parameters()], "lr": cfg.lr}]
    head = [p for p in loss_fn.parameters()]
    if head:
        params.append({"params": head, "lr": cfg.head_lr})
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict[str, float]] = []
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        history, start = state["history"], state["epoch"]
        log.info("resuming fine-tuning from epoch %d/%d in %s", start, cfg.epochs, out)

    images_per_step = min(cfg.classes_per_batch, len(label_of)) * cfg.images_per_class
    steps = cfg.steps_per_epoch or max(1, len(records) // images_per_step)
    views = make_views(cfg)
    grad_flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(True)
    model.train()
    try:
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=_rng_devices(device)):
                torch.manual_seed(_epoch_seed(seed, epoch))
                batches = pk_batches(
                    labels, cfg.classes_per_batch, cfg.images_per_class, steps, f"{seed}-{epoch}"
                )
                total = 0.0
                for step, batch in enumerate(batches):
                    x, y = _load_batch(batch, records, labels, dataset, backbone, views)
                    emb = embed(backbone.forward_features(x.to(device)), cfg.embedding, cfg.gem_p)
                    loss = loss_fn(emb, y.to(device))
                    if not torch.isfinite(loss):
                        raise CraterlabError(
                            f"Fine-tuning loss became {loss.item()} at epoch {epoch + 1}, step "
                            f"{step + 1}. Lower train.lr / train.head_lr, or use another loss."
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += loss.item()
            metrics = {
                "loss": total / len(batches),
                "steps": float(len(batches)),
                "seconds": time.perf_counter() - t0,
                "lr": cfg.lr,
            }
            history.append(metrics)
            _atomic_save(
                {
                    "version": STATE_VERSION,
                    "run_key": key,
                    "epoch": epoch + 1,
                    "model": _cpu_state(model),
                    "optimizer": optimizer.state_dict(),
                    "loss": loss_fn.state_dict(),
                    "history": history,
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
    _atomic_save(_cpu_state(model), checkpoint)
    (out / "history.json").write_text(json.dumps(history, indent=1))
    return checkpoint


def finetune_dir(
    root: str | os.PathLike[str],
    train_cfg: Any,
    backbone: Backbone,
    dataset: CraterDataset,
    seed: int,
    registry: Registry | None = None,
) -> Path:
    """``root/<run_key>``: a stable ``out_dir`` for one fine-tuning run.

    The key hashes the train config (except ``epochs``), the backbone and dataset identities
    and the seed, so starting the same run again resumes it (or reuses its checkpoint), and a
    run with more epochs continues the shorter one.
    """
    cfg = validate_train_config(train_cfg, registry)
    return Path(root) / run_key(cfg, backbone.identity(), dataset.identity(), seed)


# --------------------------------------------------------------------------- helpers


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
        from craterlab.plugins import get_registry

        registry = get_registry()
    loss = registry.build("loss", cfg.loss)
    if not isinstance(loss, torch.nn.Module):  # a plain callable from a plugin
        wrapper = torch.nn.Module()
        wrapper.forward = loss  # type: ignore[method-assign]
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


def _load_state(out: Path, key: str, cfg: TrainConfig) -> dict[str, Any] | None:
    path = out / STATE_FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(
            f"Cannot read the fine-tuning state {path} ({exc}). Delete it to start over."
        ) from exc
    if state.get("version") != STATE_VERSION or state.get("run_key") != key:
        raise ConfigError(
            f"{out} holds a fine-tuning run with a different config, backbone, dataset or seed. "
            "Use another output directory, or delete it to start over."
        )
    if state["epoch"] > cfg.epochs:
        raise ConfigError(
            f"{out} holds a run already trained for {state['epoch']} epochs, more than "
            f"train.epochs={cfg.epochs}. Raise train.epochs or use another output directory."
        )
    return state


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []
