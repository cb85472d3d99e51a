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
    """Installed plugins: their components, commands, the broken ones and the components whose
    config option was not shipped (``--json``); ``plugins new NAME --kind KIND`` writes one."""
    if argv[:1] == ["new"]:
        return plugins_new(argv[1:])
    from craterlab.plugins import broken_plugins, get_commands, missing_configs, plugin_table

    rows = plugin_table()
    rows += [(c.plugin, "command", c.name, c.description) for c in get_commands().values()]
    broken = broken_plugins()
    missing = missing_configs()
    if "--json" in argv:
        out = [dict(zip(("plugin", "kind", "name", "description"), r, strict=True)) for r in rows]
        out += [
            {"plugin": b.name, "kind": "broken", "name": b.hook, "description": b.message()}
            for b in broken
        ]
        out += [
            {"plugin": m.plugin, "kind": "no-config", "name": m.name, "description": m.message()}
            for m in missing
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
    for m in missing:
        print(f"\n{m.plugin}  [NO CONFIG for {m.kind} {m.name}]\n  {m.message()}")
    return 0


def plugins_new(argv: list[str]) -> int:
    """``plugins new NAME --kind KIND [--dir DIR]``: write a plugin package skeleton."""
    import argparse

    from craterlab.errors import ConfigError
    from craterlab.scaffold import KINDS, new_plugin

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # type: ignore[override]
            raise ConfigError(f"{self.prog}: {message}. See `{self.prog} --help`.")

    p = Parser(
        prog="python -m craterlab plugins new",
        description="Write craterlab-NAME/: a buildable plugin package (pyproject.toml with its "
        "build backend, the module, conf/KIND/NAME.yaml, a contract test).",
    )
    p.add_argument("name", help="the component's name (a lowercase identifier, e.g. attn_mean)")
    p.add_argument("--kind", required=True, choices=sorted(KINDS), help="the component's kind")
    p.add_argument("--dir", default=".", help="where to write craterlab-NAME/ (default .)")
    p.add_argument("--description", help="one line for `python -m craterlab plugins`")
    args = p.parse_args(argv)
    root = new_plugin(args.name, args.kind, args.dir, args.description)
    if not root.is_absolute():  # pip reads a bare relative name as a package to download
        root = f"./{root}"  # type: ignore[assignment]
    print(f"wrote {root}/ ({args.kind} {args.name!r}). Next:")
    print(f"  pip install {root}          # a wheel, conf/ included (or -e while developing)")
    print(f"  python -m pytest {root}/tests")
    print(f"  python -m craterlab {args.kind}={args.name}")
    return 0


def cache_command(argv: list[str]) -> int:
    """Inspect or clear the feature cache: ``cache info [--verify]``, ``cache clear [PATTERN]``."""
    from craterlab.cache import cli

    return cli(argv, os.environ.get("CRATERLAB_CACHE", "outputs/cache"))


def dataset_command(argv: list[str]) -> int:
    """Export, inspect, fetch or build datasets: ``dataset export|info|fetch|build ...``."""
    from craterlab.data.cli import main

    return main(argv)


def report_command(argv: list[str]) -> int:
    """Tables (ours beside the paper's) and figures of a sweep: ``report SOURCE [--out DIR]``."""
    from craterlab.report.cli import main

    return main(argv)


def plan_command(argv: list[str]) -> int:
    """``plan --bytes-per-image B --ms-per-query T``: Pareto front of measured runs and the
    best configuration within the budget (:mod:`craterlab.sweeps.plan`)."""
    from craterlab.sweeps.plan import main

    return main(argv)


@hookimpl
def register_commands(register: Register) -> None:
    register(
        "plugins",
        plugins_command,
        "installed plugins, their components and commands; plugins new NAME --kind KIND",
    )
    register("cache", cache_command, "inspect or clear the feature cache (info, clear)")
    register(
        "dataset",
        dataset_command,
        "export, inspect, fetch or build a dataset (export, info, fetch, build)",
    )
    register("report", report_command, "tables beside the paper's numbers, and figures, of a sweep")
    register("plan", plan_command, "Pareto front of tracked runs; best config within a budget")
