"""Command line: ``python -m craterlab [hydra overrides]`` runs an experiment.

``python -m craterlab COMMAND [args]`` runs a subcommand instead. Subcommands come from the
``register_commands`` hook, so the built-in ones (:mod:`craterlab.commands`) and those of
installed plugins are found the same way.
``python -m craterlab --help`` lists them. A bare word that is neither an override (``KEY=VALUE``)
nor a command is refused in one line that names the commands, before Hydra sees it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from craterlab.errors import CraterlabError, closest, disk_full_message
from craterlab.kinds import GROUP_KINDS, STAGE_PREFIX
from craterlab.plugins import config_dir, plugin_config_dirs

__all__ = ["config_dir", "main", "plugin_config_dirs"]

log = logging.getLogger("craterlab")

# Hydra flags that take the next argument as their value (``--cfg job``, ``-cn NAME``).
HYDRA_VALUE_FLAGS = frozenset(
    {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn"}
    | {"--config-dir", "-cd", "--experimental-rerun"}
)
HYDRA_INFO_VALUES = frozenset(
    {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
)


def bare_words(argv: list[str]) -> list[tuple[int, str]]:
    """(position, word) of the arguments that are neither overrides nor Hydra flags or values."""
    out = []
    for i, arg in enumerate(argv):
        prev = argv[i - 1] if i else ""
        if "=" in arg or arg.startswith(("-", "~")) or prev in HYDRA_VALUE_FLAGS:
            continue
        if prev in ("--info", "-i") and arg in HYDRA_INFO_VALUES:
            continue
        out.append((i, arg))
    return out


def command_error(word: str, known: list[str]) -> CraterlabError:
    """The one-line error for a bare word that Hydra would call 'missing EQUAL'."""
    if word in known:
        return CraterlabError(
            f"{word!r} is a command: put it first (python -m craterlab {word} ...), without "
            "overrides before it."
        )
    return CraterlabError(
        f"Unknown command {word!r}.{closest(word, known)} Commands: {', '.join(known)}. "
        "To run an experiment, pass overrides as KEY=VALUE (python -m craterlab "
        "aggregator=instance k=64); python -m craterlab --help shows both."
    )


def config_groups() -> dict[str, list[str]]:
    """Config group -> options, from conf/ and the conf/ folders of installed plugins."""
    groups: dict[str, set[str]] = {}
    for root in (config_dir(), *plugin_config_dirs()):
        for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()):
            options = {p.stem for p in folder.glob("*.yaml")}
            if options:
                groups.setdefault(folder.name, set()).update(options)
    return {g: sorted(o) for g, o in sorted(groups.items())}


def help_text() -> str:
    from craterlab.plugins import get_commands

    commands = get_commands()
    width = max(len(n) for n in commands) + 2
    lines = [
        "usage: python -m craterlab [OVERRIDE ...]          run an experiment (or a sweep with -m)",
        "       python -m craterlab COMMAND [ARGS ...]      run a command",
        "",
        "Run an experiment: choose an option per config group (group=option) and set keys",
        "(group.key=value, or the shared knobs k, shortlist, depth, seed, device), e.g.",
        "  python -m craterlab backbone=dinov2_s14 aggregator=instance k=64",
        "  python -m craterlab -m aggregator=instance,none k=16,32      # a sweep",
        "  python -m craterlab --cfg job                                # print the config",
        "",
        "Commands (python -m craterlab COMMAND --help for their options):",
    ]
    lines += [f"  {c.name:<{width}}{c.description}" for c in commands.values()]
    lines += ["", "Config groups and their options:"]
    lines += [f"  {g}: {', '.join(o)}" for g, o in config_groups().items()]
    lines += [
        "",
        "Hydra's own flags: python -m craterlab --hydra-help. Writing a plugin: docs/plugins.md.",
    ]
    return "\n".join(lines)


def override_values(arg: str) -> list[object] | None:
    """The value(s) Hydra will set for ``arg`` (a sweep gives several), parsed as Hydra parses
    them (``0.05`` a float, ``64`` an int, ``null`` None); None when Hydra can't parse it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        override = OverridesParser.create().parse_override(arg)
        if override.is_sweep_override():
            return list(override.sweep_iterator())
        return [override.value()]
    except Exception:
        return None  # Hydra reports it with its own message


def check_component_keys(overrides: list[str]) -> list[str]:
    """Explain ``group.key=value`` overrides of keys the chosen component does not have.

    Hydra would only say the key is "not in struct"; the registry names the valid keys and
    the closest match. Only runs when such an override is present (one extra compose). Values
    are checked as Hydra converts them, and a valid key that the group's config file doesn't
    list (a factory parameter with a default, e.g. ``aggregator.temperature=0.05``) is passed
    to Hydra as ``+group.key=value``; returns the overrides to run with. A retrieval stage's
    keys (``retrieval.stages.<stage>.<key>=value``) are checked the same way.
    """
    suspects = []
    for arg in overrides:
        head, sep, value = arg.partition("=")
        group, dot, key = head.partition(".")
        if sep and dot and group in GROUP_KINDS and "." not in key:
            suspects.append((arg, group, key, value))
        elif sep and head.startswith(STAGE_PREFIX) and head.count(".") == 3:
            suspects.append((arg, head.rpartition(".")[0], head.rpartition(".")[2], value))
    if not suspects:
        return overrides
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig, OmegaConf

    from craterlab.plugins import get_registry

    others = [a for a in overrides if a not in {s[0] for s in suspects} and not a.startswith("-")]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        try:
            cfg = compose(config_name="config", overrides=others)
        except Exception:
            return overrides  # Hydra reports problems with the other overrides itself
    added = set()
    for arg, group, key, _ in suspects:
        node = OmegaConf.select(cfg, group)
        values = override_values(arg)
        if not isinstance(node, DictConfig) or key in node or values is None:
            continue  # a stage the run doesn't have, or a key it has: Hydra's own message
        kind = "stage" if group.startswith(STAGE_PREFIX) else group
        for value in values:
            get_registry().validate(kind, {**node, key: value}, group=group)
        added.add(arg)
    return [f"+{a}" if a in added else a for a in overrides]


def check_plugin_options(overrides: list[str]) -> None:
    """Refuse ``group=option`` where a plugin registers the component but shipped no config
    for it (Hydra would only say "Could not find 'group/option'"); the error names the plugin."""
    wanted = []
    for arg in overrides:
        head, sep, _ = arg.partition("=")
        group = head.lstrip("+~")
        if sep and group in GROUP_KINDS and "." not in group:
            wanted += [(group, str(v)) for v in override_values(arg) or []]
    if not wanted:
        return
    known = config_groups()
    unknown = [(g, v) for g, v in wanted if v not in known.get(g, [])]
    if not unknown:
        return
    from craterlab.plugins import missing_configs

    missing = {(m.kind, m.name): m for m in missing_configs()}
    for key in unknown:
        if key in missing:
            raise CraterlabError(missing[key].message())


def run_hydra() -> None:
    import hydra
    from omegaconf import DictConfig

    extra = plugin_config_dirs()
    if extra and not any(a.startswith("hydra.searchpath") for a in sys.argv[1:]):
        sys.argv.append("hydra.searchpath=[" + ",".join(f"file://{d}" for d in extra) + "]")

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
    def task(cfg: DictConfig) -> float | None:
        from craterlab.experiment import run

        try:
            result = run(cfg)
        except CraterlabError as exc:
            print(f"\nError: {exc}\n", file=sys.stderr)
            sys.exit(2)
        except OSError as exc:  # a full disk under the run directory is a message too
            if (message := disk_full_message(exc)) is None:
                raise
            print(f"\nError: {message}\n", file=sys.stderr)
            sys.exit(2)
        first = next(iter(result.results.values()), {})
        return first.get("mAP")

    task()


def main() -> None:
    argv = sys.argv[1:]
    try:
        if argv[:1] in (["--help"], ["-h"]):
            print(help_text())
            sys.exit(0)
        words = bare_words(argv)
        if words:
            from craterlab.plugins import get_commands

            commands = get_commands()
            position, word = words[0]
            if position == 0 and word in commands:
                sys.exit(commands[word].handler(argv[1:]))
            raise command_error(word, list(commands))
        check_plugin_options(argv)
        sys.argv[1:] = check_component_keys(argv)
        run_hydra()
    except CraterlabError as exc:  # raised by a command, or while loading plugins
        print(f"\nError: {exc}\n", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # a full disk (Hydra's run directory, an output) is a message
        if (message := disk_full_message(exc)) is None:
            raise
        print(f"\nError: {message}\n", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
