"""Built-in subcommands of ``python -m craterlab``, registered like a third-party plugin's.

Each handler takes the arguments after the subcommand's name and returns an exit status; a
:class:`craterlab.errors.CraterlabError` it raises is printed as one paragraph, without a
traceback. Implementations are imported only when their command runs.
"""

from __future__ import annotations

import json
import os

from craterlab.hookspecs import Register, hookimpl


def plugins_command(argv: list[str]) -> int:
    """Installed plugins: their components, commands, and the broken ones (``--json``)."""
    from craterlab.plugins import broken_plugins, get_commands, plugin_table

    rows = plugin_table()
    rows += [(c.plugin, "command", c.name, c.description) for c in get_commands().values()]
    broken = broken_plugins()
    if "--json" in argv:
        out = [dict(zip(("plugin", "kind", "name", "description"), r, strict=True)) for r in rows]
        out += [
            {"plugin": b.name, "kind": "broken", "name": b.hook, "description": b.message()}
            for b in broken
        ]
        print(json.dumps(out))
        return 0
    order = {p: i for i, p in enumerate(dict.fromkeys(r[0] for r in rows))}
    current = None
    for plugin, kind, name, description in sorted(rows, key=lambda r: (order[r[0]], r[1], r[2])):
        if plugin != current:
            print(f"\n{plugin}")
            current = plugin
        print(f"  {kind:<11} {name:<22} {description}")
    for b in broken:
        print(f"\n{b.name}  [BROKEN]\n  {b.message()}")
    return 0


def cache_command(argv: list[str]) -> int:
    """Inspect or clear the feature cache: ``cache info [--verify]``, ``cache clear [PATTERN]``."""
    from craterlab.cache import cli

    return cli(argv, os.environ.get("CRATERLAB_CACHE", "outputs/cache"))


def dataset_command(argv: list[str]) -> int:
    """Export, inspect, fetch or build datasets: ``dataset export|info|fetch|build ...``."""
    from craterlab.data.cli import main

    return main(argv)


@hookimpl
def register_commands(register: Register) -> None:
    register("plugins", plugins_command, "installed plugins, their components and commands")
    register("cache", cache_command, "inspect or clear the feature cache (info, clear)")
    register(
        "dataset",
        dataset_command,
        "export, inspect, fetch or build a dataset (export, info, fetch, build)",
    )
