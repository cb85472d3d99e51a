"""``python -m craterlab plugins [--json]``: installed plugins, their components and commands,
the broken ones and the components whose config option was not shipped; ``plugins new NAME
--kind KIND`` writes a plugin package."""

from __future__ import annotations

import argparse
import json

from craterlab.errors import ConfigError
from craterlab.plugins import broken_plugins, get_commands, missing_configs, plugin_table


def main(argv: list[str]) -> int:
    """Installed plugins: their components, commands, the broken ones and the components whose
    config option was not shipped (``--json``); ``plugins new NAME --kind KIND`` writes one."""
    if argv[:1] == ["new"]:
        return plugins_new(argv[1:])
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
