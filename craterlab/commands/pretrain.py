"""``python -m craterlab pretrain [overrides]``: DINO on unlabeled images, one MLflow run.

The config is ``conf/config.yaml`` with the ``pretrain`` group (default ``pretrain=dino``);
the ``backbone`` group names the architecture and where its weights start (``weights=random``
for random init, ``pretrained`` for ImageNet DINO weights, a checkpoint path or ``run:<id>``),
the ``dataset`` group (or ``pretrain.images=FOLDER|MANIFEST``) the images. The run logs the
loss, learning rate, teacher temperature and momentum per step, GeM and late-interaction mAP
on the dataset's labelled query/gallery splits per epoch (when they are not trained on), and
records the checkpoint so ``backbone.weights=run:<id>`` uses it in any experiment or ``index``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from craterlab.errors import ConfigError

log = logging.getLogger("craterlab.pretrain")


def compose_pretrain_config(overrides: Sequence[str]) -> DictConfig:
    """``conf/config.yaml`` + ``pretrain=dino`` (unless chosen) + the command line."""
    overrides = list(overrides)
    for arg in overrides:
        if "=" not in arg:
            raise ConfigError(
                f"{arg!r} is not an override: python -m craterlab pretrain takes "
                "group=option and group.key=value (e.g. backbone=dino_s16 "
                "backbone.weights=random pretrain.epochs=10 pretrain.images=crops/)."
            )
    if not any(a.split("=", 1)[0].lstrip("+") == "pretrain" for a in overrides):
        overrides.insert(0, "pretrain=dino")
    from craterlab.__main__ import check_component_keys
    from craterlab.plugins import compose_outside_job

    overrides = check_component_keys(overrides)  # backbone.image_size=64 -> +backbone...
    return compose_outside_job(
        overrides,
        "Use pretrain=dino|dino_cpu, pretrain.KEY=VALUE and the experiments' backbone= / "
        "dataset= overrides (python -m craterlab --help).",
    )


def run_pretrain(cfg: DictConfig) -> dict[str, Any]:
    """Pretrain as configured, inside one tracked run; returns checkpoint, run id, status."""
    from craterlab.backbones.lineage import (
        describe_checkpoint,
        lineage_params,
        record_checkpoints,
    )
    from craterlab.devices import resolve_device
    from craterlab.experiment import seed_everything
    from craterlab.plugins import get_registry
    from craterlab.tracking import tracked_run
    from craterlab.train.evaluation import retrieval_suite
    from craterlab.train.pretrain import (
        ImageSource,
        PretrainDiverged,
        items_source,
        pretrain,
    )
    from craterlab.train.pretrain_config import validate_pretrain_config

    pcfg = validate_pretrain_config(cfg.pretrain)
    registry = get_registry()
    seed = int(cfg.seed)
    seed_everything(seed)
    device = resolve_device(str(cfg.device))
    backbone = registry.build("backbone", cfg.backbone, seed=seed)
    dataset = None
    if pcfg.images:
        source = items_source(pcfg.images, pcfg.cache_mb)
    else:
        dataset = registry.build("dataset", cfg.dataset, seed=seed)
        source = ImageSource(dataset, pcfg.splits, cache_mb=pcfg.cache_mb)
    evaluate = None
    if dataset is not None and pcfg.eval_every is not None:
        labelled = all(len(dataset.records(s)) for s in ("query", "gallery"))
        overlap = {"query", "gallery"} & set(pcfg.splits)
        if labelled and not overlap:

            def evaluate(b: Any) -> dict[str, float]:
                return retrieval_suite(b, dataset, pcfg.eval_k, device=device)

        elif overlap:
            log.info("not evaluating: the %s split(s) are pretrained on", sorted(overlap))
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    config = {k: v for k, v in config.items() if k not in ("train", "retrieval", "report")}
    label = str(cfg.backbone.get("model") or cfg.backbone.name)
    tags = {
        "craterlab.kind": "pretrain",
        "craterlab.dataset": source.name,
        "craterlab.backbone": label,
    }
    tracking = dict(config.get("tracking") or {})
    tracking["run_name"] = tracking.get("run_name") or f"pretrain {pcfg.name} {label} {source.name}"
    with tracked_run(tracking, tags) as tracker:
        tracker.log_params(config)

        def on_step(step: int, metrics: dict[str, float]) -> None:
            tracker.log_metrics({f"pretrain/{k}": v for k, v in metrics.items()}, step=step)

        def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
            tracker.log_metrics({f"pretrain/epoch_{k}": v for k, v in metrics.items()}, epoch)

        staging = Path(pcfg.out_dir or "outputs/pretrain") / "staging" / str(tracker.run_id)

        def record(path: Path) -> None:
            record_checkpoints(
                tracker,
                {"last": path},
                mode=pcfg.log_checkpoints,
                max_mb=pcfg.artifact_max_mb,
                staging=staging,
            )

        try:
            checkpoint = pretrain(
                pcfg,
                backbone,
                source,
                device=device,
                seed=seed,
                on_step=on_step,
                on_epoch_end=on_epoch_end,
                evaluate=evaluate,
                run_id=tracker.run_id,
            )
        except PretrainDiverged as exc:
            if exc.checkpoint is not None:
                record(exc.checkpoint)  # the last good epoch stays usable as run:<id>
            raise
        record(checkpoint)
        status, lineage = describe_checkpoint(checkpoint, f"checkpoint:{checkpoint.resolve()}")
        tracker.set_tags({"craterlab.weights": status})
        tracker.log_params(lineage_params(lineage, status))
    if summary := tracker.summary():
        print(summary)
    return {"checkpoint": str(checkpoint), "run_id": tracker.run_id, "weights": status}


def pretrain_command(argv: list[str]) -> int:
    """DINO self-supervised pretraining (``pretrain [overrides]``); ``--help`` explains."""
    if argv[:1] in (["--help"], ["-h"]):
        print(
            "usage: python -m craterlab pretrain [OVERRIDE ...]\n\n"
            + (__doc__ or "")
            + "\nExamples:\n"
            "  python -m craterlab pretrain backbone=dino_s16 pretrain.images=crops/\n"
            "  python -m craterlab pretrain pretrain=dino_cpu backbone=dino_s16 "
            "backbone.weights=random dataset.size=small pretrain.epochs=5\n"
            "Then: python -m craterlab backbone.weights=run:<id> ... or "
            "python -m craterlab index crops/ --out idx backbone.weights=run:<id>\n"
            "Keys: conf/pretrain/dino.yaml; the guide: docs/pretraining.md."
        )
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("faiss", "faiss.loader", "timm", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    result = run_pretrain(compose_pretrain_config(argv))
    print(f"weights: {result['weights']}")
    print(f"checkpoint: {result['checkpoint']}")
    if result["run_id"]:
        print(f"use it: backbone.weights=run:{result['run_id']}")
    return 0
