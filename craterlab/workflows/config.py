"""Configs of the workflows: the experiments' own Hydra composition, and the encoder rule.

A workflow composes ``conf/config.yaml`` with the command line's overrides exactly as an
experiment does (``backbone=dino_s16 aggregator=instance k=32 quantizer=int8``). What encodes
an image (backbone, pooling, token method, quantizer, seed) is the *encoder spec*: it is saved
with an index, and a later search must use exactly it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from craterlab.errors import ConfigError

ENCODER_GROUPS = ("backbone", "pooling", "selector", "aggregator", "quantizer")
"""Config groups whose values change the stored representation of an image."""
ENCODER_KEYS = ("seed",)
"""Top-level knobs that also change it (seeded selectors, K-means, random weights)."""
IGNORED_GROUPS = ("dataset", "train", "tracking", "experiment")
"""Experiment groups that do not apply to a workflow (its images come from the command line)."""


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/config.yaml`` composed with Hydra overrides, as ``python -m craterlab`` would."""
    from craterlab.checks import check_run_settings
    from craterlab.plugins import compose_outside_job

    overrides = list(overrides)
    check_workflow_overrides(overrides)
    cfg = compose_outside_job(
        overrides,
        "Use the same group=option and group.key=value overrides as an experiment (python -m "
        "craterlab --help, or docs/configuration.md, 'Config groups and their options').",
    )
    check_run_settings(cfg)  # batch_size, num_workers, seed: as an experiment checks them
    return cfg


def check_workflow_overrides(overrides: Iterable[str]) -> None:
    """Refuse overrides that cannot mean anything to a workflow, instead of ignoring them."""
    for arg in overrides:
        if "=" not in arg:
            raise ConfigError(
                f"{arg!r} is not an override: overrides look like group=option or "
                "group.key=value (e.g. backbone=dino_s16 k=32 quantizer=int8)."
            )
        key = arg.split("=", 1)[0].lstrip("+~")
        if key.split(".", 1)[0] in IGNORED_GROUPS:
            raise ConfigError(
                f"The override {arg!r} does not apply to a workflow: its images come from the "
                "command line (a folder of crops or a manifest), and workflows neither "
                "fine-tune nor log to MLflow. Remove it; run `python -m craterlab "
                f"{arg}` for an experiment instead."
            )


def plain(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """A resolved, plain-dict copy of a config."""
    if isinstance(cfg, DictConfig):
        out = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(out, dict)
        return out
    return dict(cfg)


def encoder_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that determines an image's stored representation."""
    spec = {g: config.get(g) for g in ENCODER_GROUPS}
    spec.update({k: config.get(k) for k in ENCODER_KEYS})
    return spec


def spec_differences(recorded: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """'key: recorded -> requested' for every leaf where two encoder specs disagree."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in sorted(set(a) | set(b), key=str):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        elif a != b:
            diffs.append(f"{path}: {a!r} (index) vs {b!r} (requested)")

    walk(dict(recorded), dict(requested), "")
    return diffs


def merge_overrides(recorded: Sequence[str], new: Sequence[str]) -> list[str]:
    """``recorded`` overrides with those of ``new`` replacing the ones with the same key."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in new}
    kept = [o for o in recorded if o.split("=", 1)[0].lstrip("+~") not in keys]
    return [*kept, *new]
