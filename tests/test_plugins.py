"""Plugin hooks: every registration hook, the observers, loud failures, entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pluggy
import pytest

from craterlab import hookspecs
from craterlab.hookspecs import hookimpl
from craterlab.plugins import DEFAULT_PLUGINS, REGISTER_HOOKS, fill_registry, make_manager
from craterlab.registry import KINDS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "plugins" / "craterlab-center"


def make_component(k: int = 1) -> int:
    """A toy component."""
    return k


class EveryKind:
    """A plugin registering one component of every kind."""

    def __getattr__(self, name: str):  # pragma: no cover - pluggy only asks for hook names
        raise AttributeError(name)


for _hook, _kind in REGISTER_HOOKS.items():

    def _impl(register, _kind=_kind):
        register(f"toy_{_kind}", make_component)

    _impl.__name__ = _hook
    setattr(EveryKind, _hook, staticmethod(hookimpl(_impl)))


def test_one_register_hook_per_kind() -> None:
    assert sorted(REGISTER_HOOKS.values()) == sorted(KINDS)
    for hook in REGISTER_HOOKS:
        assert hasattr(hookspecs, hook), hook


def test_every_register_hook_reaches_the_registry() -> None:
    pm = make_manager(load_entry_points=False)
    pm.register(EveryKind(), name="every-kind")
    registry = fill_registry(pm)
    for kind in KINDS:
        component = registry.get(kind, f"toy_{kind}")
        assert component.plugin == "every-kind"
        assert component.description == "A toy component."


def test_builtins_are_plugins_registered_like_third_party_ones() -> None:
    pm = make_manager(load_entry_points=False)
    names = {name for name, _ in pm.list_name_plugin()}
    assert set(DEFAULT_PLUGINS) <= names
    registry = fill_registry(pm)
    plugins = {c.plugin for c in registry}
    assert plugins <= set(DEFAULT_PLUGINS)
    for kind in KINDS:
        assert registry.names(kind), f"no built-in {kind}"


def test_misspelled_hook_fails_loudly() -> None:
    class Typo:
        @hookimpl
        def register_pooling(self, register):  # missing the 's'
            register("x", make_component)

    pm = make_manager(load_entry_points=False)
    pm.register(Typo(), name="typo")
    with pytest.raises(pluggy.PluginValidationError, match="register_pooling"):
        pm.check_pending()


def test_observer_hooks_are_called_with_config_and_results() -> None:
    calls = []

    class Observer:
        @hookimpl
        def run_started(self, config, run_dir):
            calls.append(("started", config["k"], run_dir))

        @hookimpl
        def run_finished(self, config, run_dir, results):
            calls.append(("finished", results["single"]["mAP"], run_dir))

    pm = make_manager(load_entry_points=False)
    pm.register(Observer())
    pm.hook.run_started(config={"k": 8}, run_dir="d")
    pm.hook.run_finished(config={"k": 8}, run_dir="d", results={"single": {"mAP": 0.5}})
    assert calls == [("started", 8, "d"), ("finished", 0.5, "d")]


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> dict[str, str]:
    """The example plugin package installed into a private target directory."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
        capture_output=True,
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]))
    return env


def test_example_plugin_is_listed_once_installed(installed_example) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "craterlab", "plugins", "--json"],
        env=installed_example,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = json.loads(out)
    assert {
        "plugin": "center",
        "kind": "selector",
        "name": "center",
        "description": "K patch tokens nearest the crop centre (example plugin)",
    } in rows


def test_example_plugin_own_tests_pass(installed_example) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        env=installed_example,
        capture_output=True,
        text=True,
        cwd=EXAMPLE,
    )
    assert result.returncode == 0, result.stdout + result.stderr
