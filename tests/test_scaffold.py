"""``plugins new`` writes a plugin package that keeps the contract and builds as a wheel; a
plugin whose conf/ was not shipped is named by ``plugins`` and by the error for its option."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from conftest import TINY

from craterlab import plugins
from craterlab.__main__ import check_plugin_options
from craterlab.commands.plugins import main as plugins_command
from craterlab.errors import ConfigError, CraterlabError
from craterlab.plugins import fill_registry, make_manager, missing_configs
from craterlab.scaffold import KINDS, new_plugin
from craterlab.testing import check_component


def load_skeleton(monkeypatch, root: Path, name: str):
    """A plugin manager with the skeleton's module loaded through its entry point."""
    monkeypatch.syspath_prepend(str(root))
    module = f"craterlab_{name}"
    sys.modules.pop(module, None)
    pm = make_manager(True, entry_points=[EntryPoint(name, module, "craterlab")])
    assert not pm.broken, [b.message() for b in pm.broken]
    return pm


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_skeleton_is_a_complete_package_whose_component_keeps_the_contract(
    kind, tmp_path, monkeypatch
) -> None:
    name = f"my_{kind}"
    root = new_plugin(name, kind, tmp_path)
    assert root == tmp_path / f"craterlab-my-{kind}"
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["build-system"]["build-backend"] == "hatchling.build"
    assert project["project"]["entry-points"]["craterlab"] == {name: f"craterlab_{name}"}
    assert project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == [
        f"craterlab_{name}"
    ]
    option = root / f"craterlab_{name}" / "conf" / kind / f"{name}.yaml"
    assert option.read_text().startswith(f"name: {name}\n")
    test = (root / "tests" / f"test_{name}.py").read_text()
    assert f'check_component("{kind}", "{name}")' in test
    assert "craterlab.testing" in (root / "tests" / "conftest.py").read_text()

    pm = load_skeleton(monkeypatch, root, name)
    registry = fill_registry(pm)
    assert registry.get(kind, name).plugin == name
    config = {"name": name, **({"k": 4} if kind != "pooling" else {})}
    check_component(kind, name, config, registry=registry)
    assert missing_configs(pm, registry) == []  # its conf/ holds the option


def test_plugins_new_refuses_bad_names_other_kinds_and_existing_folders(tmp_path) -> None:
    with pytest.raises(ConfigError, match="lowercase Python identifier"):
        new_plugin("Attn-Mean", "pooling", tmp_path)
    with pytest.raises(ConfigError, match="not 'stage'"):
        new_plugin("qe2", "stage", tmp_path)
    new_plugin("twice", "pooling", tmp_path)
    with pytest.raises(ConfigError, match="already exists; plugins new never overwrites"):
        new_plugin("twice", "pooling", tmp_path)
    with pytest.raises(ConfigError, match="--kind"):
        plugins_command(["new", "x"])


def test_a_plugin_without_its_conf_is_named_by_plugins_and_by_its_option(
    tmp_path, monkeypatch, capsys
) -> None:
    root = new_plugin("bare_pool", "pooling", tmp_path)
    conf = root / "craterlab_bare_pool" / "conf"
    shutil.rmtree(conf)
    pm = load_skeleton(monkeypatch, root, "bare_pool")
    (missing,) = missing_configs(pm, fill_registry(pm))
    assert (missing.plugin, missing.kind, missing.name) == ("bare_pool", "pooling", "bare_pool")
    assert "was not shipped with the package" in missing.message()
    assert str(conf.resolve()) in missing.message() and "[build-system]" in missing.message()

    monkeypatch.setattr(plugins, "_manager", pm)
    monkeypatch.setattr(plugins, "_registry", None)
    monkeypatch.setattr(plugins, "_commands", None)
    try:
        with pytest.raises(CraterlabError, match="registers pooling 'bare_pool'") as err:
            check_plugin_options([*TINY, "pooling=gem,bare_pool"])
        assert "`pooling=bare_pool` has no config option" in str(err.value)
        check_plugin_options(["pooling=gem"])  # options with a config pass untouched
        assert plugins_command([]) == 0
        out = capsys.readouterr().out
        assert "bare_pool  [NO CONFIG for pooling bare_pool]" in out
        # a conf/ folder that lacks the option's file is named as such
        (conf / "pooling").mkdir(parents=True)
        (conf / "pooling" / "other.yaml").write_text("name: other\n")
        (missing,) = missing_configs(pm, fill_registry(pm))
        assert "has no pooling/bare_pool.yaml" in missing.message()
    finally:
        plugins.reset()


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, capture_output=True)


def build_and_install(root: Path, target: Path) -> Path:
    """Build the package's wheel (no isolation: offline) and install it, not editable."""
    pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(target.parent), str(root))
    (wheel,) = target.parent.glob(f"{root.name.replace('-', '_')}-*.whl")
    pip("install", "-q", "--no-deps", "--target", str(target), str(wheel))
    return wheel


@pytest.mark.slow
def test_skeleton_wheel_installs_non_editable_and_runs_a_sweep(tmp_path) -> None:
    root = new_plugin("attn_mean", "pooling", tmp_path / "src")
    wheel = build_and_install(root, tmp_path / "wheel" / "site")
    assert "craterlab_attn_mean/conf/pooling/attn_mean.yaml" in zipfile.ZipFile(wheel).namelist()
    site = tmp_path / "wheel" / "site"
    env = {
        **os.environ,
        "PYTHONPATH": f"{site}{os.pathsep}{os.getcwd()}",
        "CRATERLAB_LOAD_PLUGINS": "1",
        "CRATERLAB_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    # the skeleton's own contract test passes against the installed wheel
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", str(root / "tests")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert tests.returncode == 0, tests.stdout[-3000:]
    sweep = subprocess.run(
        [sys.executable, "-m", "craterlab", "-m", *TINY, "pooling=attn_mean,gem"]
        + ["tracking=none", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    with open(tmp_path / "sweep" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["pooling"] for r in rows) == ["attn_mean", "gem"]
    assert all(r["status"] == "finished" for r in rows)

    # the same package built without its package data: named, not Hydra's bare error
    bare = tmp_path / "bare" / root.name
    shutil.copytree(root, bare)
    project = bare / "pyproject.toml"
    project.write_text(
        project.read_text().replace(
            'packages = ["craterlab_attn_mean"]',
            'packages = ["craterlab_attn_mean"]\nexclude = ["**/conf"]',
        )
    )
    build_and_install(bare, tmp_path / "bare" / "site")
    env["PYTHONPATH"] = f"{tmp_path / 'bare' / 'site'}{os.pathsep}{os.getcwd()}"
    listing = subprocess.run(
        [sys.executable, "-m", "craterlab", "plugins"], env=env, capture_output=True, text=True
    )
    assert "attn_mean  [NO CONFIG for pooling attn_mean]" in listing.stdout
    run = subprocess.run(
        [sys.executable, "-m", "craterlab", *TINY, "pooling=attn_mean", "tracking=none"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "conf/ folder was not shipped with the package" in run.stderr
    assert "Could not find" not in run.stderr
