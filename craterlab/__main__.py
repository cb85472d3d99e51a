"""Command line: ``python -m craterlab [hydra overrides]`` runs an experiment.

Subcommands handled before Hydra sees the arguments:

- ``python -m craterlab plugins [--json]``: installed plugins and the components they register
- ``python -m craterlab cache [info|clear] [--dir DIR]``: the feature cache
- ``python -m craterlab dataset export --out DIR ...``: write a dataset in the CraterBench-R layout
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from craterlab.errors import CraterlabError
from craterlab.registry import GROUP_KINDS

log = logging.getLogger("craterlab")


def config_dir() -> Path:
    """conf/ inside an installed wheel (craterlab/conf) or beside the package in a checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise CraterlabError(
        f"craterlab's configs were not found (looked in {package / 'conf'} and "
        f"{package.parent / 'conf'}). Reinstall craterlab "
        "(pip install craterlab, or pip install -e . in a checkout)."
    )


def list_plugins(argv: list[str]) -> int:
    from craterlab.plugins import plugin_table

    rows = plugin_table()
    if "--json" in argv:
        print(
            json.dumps(
                [dict(zip(("plugin", "kind", "name", "description"), r, strict=True)) for r in rows]
            )
        )
        return 0
    current = None
    for plugin, kind, name, description in rows:
        if plugin != current:
            print(f"\n{plugin}")
            current = plugin
        print(f"  {kind:<11} {name:<22} {description}")
    return 0


def cache_command(argv: list[str]) -> int:
    import os

    from craterlab.cache import cli

    return cli(argv, os.environ.get("CRATERLAB_CACHE", "outputs/cache"))


def dataset_command(argv: list[str]) -> int:
    from craterlab.data.cli import main as data_main

    return data_main(argv)


SUBCOMMANDS = {"plugins": list_plugins, "cache": cache_command, "dataset": dataset_command}


def plugin_config_dirs() -> list[Path]:
    """``conf/`` folders shipped beside third-party plugin modules (added to Hydra's path)."""
    from craterlab.plugins import DEFAULT_PLUGINS, get_manager

    dirs = []
    for name, plugin in get_manager().list_name_plugin():
        module_file = getattr(plugin, "__file__", None)
        if name in DEFAULT_PLUGINS or not module_file:
            continue
        conf = Path(module_file).resolve().parent / "conf"
        if conf.is_dir():
            dirs.append(conf)
    return dirs


def check_component_keys(overrides: list[str]) -> None:
    """Explain ``group.key=value`` overrides of keys the chosen component does not have.

    Hydra would only say the key is "not in struct"; the registry names the valid keys and
    the closest match. Only runs when such an override is present (one extra compose).
    """
    suspects = []
    for arg in overrides:
        head, sep, value = arg.partition("=")
        group, dot, key = head.partition(".")
        if sep and dot and group in GROUP_KINDS and "." not in key:
            suspects.append((arg, group, key, value))
    if not suspects:
        return
    from hydra import compose, initialize_config_dir

    from craterlab.plugins import get_registry

    others = [a for a in overrides if a not in {s[0] for s in suspects} and not a.startswith("-")]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        try:
            cfg = compose(config_name="config", overrides=others)
        except Exception:
            return  # Hydra reports problems with the other overrides itself
    for _, group, key, value in suspects:
        node = cfg[group]
        if key not in node:
            get_registry().validate(group, {**node, key: value})


def run_hydra() -> None:
    import hydra
    from omegaconf import DictConfig

    extra = plugin_config_dirs()
    if extra and not any(a.startswith("hydra.searchpath") for a in sys.argv[1:]):
        sys.argv.append("hydra.searchpath=[" + ",".join(f"file://{d}" for d in extra) + "]")

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
    def task(cfg: DictConfig) -> float | None:
        from craterlab.run import run

        try:
            result = run(cfg)
        except CraterlabError as exc:
            print(f"\nError: {exc}\n", file=sys.stderr)
            sys.exit(2)
        first = next(iter(result.results.values()), {})
        return first.get("mAP")

    task()


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] in SUBCOMMANDS:
        try:
            sys.exit(SUBCOMMANDS[argv[0]](argv[1:]))
        except CraterlabError as exc:
            print(f"\nError: {exc}\n", file=sys.stderr)
            sys.exit(2)
    try:
        check_component_keys(argv)
        run_hydra()
    except CraterlabError as exc:  # raised while loading plugins, before a job starts
        print(f"\nError: {exc}\n", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
