"""Hostile command lines: documented keys given as `group.key=value` are checked as Hydra will
convert them (not as the raw string), and bad run settings are one-paragraph errors."""

from __future__ import annotations

import sys

import pytest
from conftest import CONF, TINY
from hydra import compose, initialize_config_dir

import craterlab.__main__ as cli
from craterlab.checks import check_run_settings
from craterlab.errors import ConfigError


def main_with(monkeypatch, *args: str) -> list[str]:
    """Run ``python -m craterlab ARGS`` up to the point Hydra would start; the argv Hydra gets."""
    seen: list[list[str]] = []
    monkeypatch.setattr(sys, "argv", ["craterlab", *args])
    monkeypatch.setattr(cli, "run_hydra", lambda: seen.append(list(sys.argv[1:])))
    cli.main()
    return seen[0]


def test_documented_keys_are_typed_like_hydra_and_passed_on(monkeypatch) -> None:
    argv = main_with(
        monkeypatch, "k=8", "aggregator.temperature=0.05", "backbone.image_size=64", "-m"
    )
    assert argv == ["k=8", "+aggregator.temperature=0.05", "+backbone.image_size=64", "-m"]
    # what Hydra composes from them builds: the values arrive as float and int
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, *argv[:-1]])
    assert cfg.aggregator.temperature == 0.05 and cfg.backbone.image_size == 64


def test_a_sweep_over_a_documented_key_is_checked_value_by_value(monkeypatch, capsys) -> None:
    argv = main_with(monkeypatch, "-m", "aggregator.temperature=0.05,0.1")
    assert argv == ["-m", "+aggregator.temperature=0.05,0.1"]
    with pytest.raises(SystemExit) as exit_info:
        main_with(monkeypatch, "-m", "aggregator.temperature=0.05,hot")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "key 'temperature' must be float, got 'hot' (str)" in err


def test_a_wrong_value_still_names_the_key_and_type(monkeypatch, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main_with(monkeypatch, "backbone.image_size=big")
    assert exit_info.value.code == 2
    assert "key 'image_size' must be int or null, got 'big' (str)" in capsys.readouterr().err


def settings(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *overrides])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("depth=0", "depth=0 is not a ranked-list length. Use depth=all"),
        ("depth=-5", "depth=-5 is not a ranked-list length"),
        ("seed=abc", "seed='abc' is not valid: seed must be an integer (e.g. seed=0)"),
        ("seed=1.5", "seed=1.5 is not valid"),
        ("batch_size=0", "batch_size=0 is not valid: batch_size must be a positive integer"),
        ("num_workers=-1", "num_workers=-1 is not valid: num_workers must be 0"),
        ("num_workers=true", "num_workers=True is not valid"),
    ],
)
def test_bad_run_settings_are_one_paragraph_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc_info:
        check_run_settings(settings(override))
    assert message in str(exc_info.value)


def test_good_run_settings_pass() -> None:
    check_run_settings(settings("depth=all", "seed=7", "batch_size=1", "num_workers=2"))
