"""Every config option composes and validates. (Each component's contract: test_contracts.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from craterlab.plugins import get_registry
from craterlab.registry import GROUP_KINDS

CONF = Path(__file__).resolve().parent.parent / "conf"
# Config groups whose options build one registry component each (the group name is its kind).
COMPONENT_GROUPS = set(GROUP_KINDS)
# Groups that set several of them at once (presets and their building blocks), too.
PRESET_GROUPS = ["recipe", "method", "baseline", "experiment"]
GROUPS = sorted(COMPONENT_GROUPS) + ["retrieval", "train", "tracking", *PRESET_GROUPS]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


def component_configs(cfg) -> list[tuple[str, dict]]:
    """(kind, component config) pairs a composed config will build."""
    plain = {
        g: OmegaConf.to_container(cfg[g], resolve=True)
        for g in (*COMPONENT_GROUPS, "retrieval", "train")
    }
    pairs = [(group, plain[group]) for group in COMPONENT_GROUPS]
    pairs += [("stage", stage) for stage in plain["retrieval"]["stages"].values()]
    if plain["train"]["name"] != "none":
        pairs.append(("loss", plain["train"]["loss"]))
    return pairs


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no options"


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, o) for g in GROUPS for o in options(g)],
)
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    cfg = compose_config(f"{group}={option}")
    registry = get_registry()
    for kind, config in component_configs(cfg):
        registry.validate(kind, config)  # raises on unknown names, keys or wrong types


def test_k_is_one_knob_interpolated_everywhere() -> None:
    cfg = compose_config("k=48", "selector=attention", "aggregator=instance")
    assert cfg.selector.k == 48 and cfg.aggregator.k == 48


def test_group_files_carry_a_registry_name() -> None:
    registry = get_registry()
    for group in COMPONENT_GROUPS:
        for option in options(group):
            name = OmegaConf.load(CONF / group / f"{option}.yaml").get("name")
            assert name in registry.names(group), f"conf/{group}/{option}.yaml: name {name!r}"
