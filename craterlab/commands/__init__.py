"""The subcommands of ``python -m craterlab``: registered here, implemented beside this file.

:data:`BUILTIN` is the one table of built-in commands: name, the module that implements it
(``main(argv) -> exit status``) and a one-line description. A command's module is imported
only when the command runs, so listing the commands (``--help``) imports none of them. Each
handler takes the arguments after the command's name; a
:class:`craterlab.errors.CraterlabError` it raises is printed as one paragraph, without a
traceback. Installed plugins add commands through the same hook, ``register_commands``.

- :mod:`~craterlab.commands.plugins`: ``plugins`` (installed plugins and their components)
- :mod:`~craterlab.commands.cache`: ``cache info|clear`` (the feature cache)
- :mod:`~craterlab.commands.dataset`: ``dataset export|info|fetch``
- :mod:`~craterlab.commands.report`: ``report SOURCE`` (a sweep's tables and figures)
- :mod:`~craterlab.commands.plan`: ``plan`` (the budget planner)
- :mod:`~craterlab.commands.pretrain`: ``pretrain`` (self-supervised DINO pretraining)
- :mod:`~craterlab.commands.workflows`: ``ingest``, ``index``, ``search``, ``dedup``, ``match``
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from craterlab.hookspecs import Register, hookimpl


@dataclass(frozen=True)
class LazyCommand:
    """A command handler that imports ``module`` when the command runs, then calls its
    ``function(argv)``."""

    module: str
    function: str = "main"

    def __call__(self, argv: list[str]) -> int:
        return getattr(importlib.import_module(self.module), self.function)(argv)


def _command(module: str, function: str = "main") -> LazyCommand:
    return LazyCommand(f"craterlab.commands.{module}", function)


# name -> (handler, description), in the order --help lists them.
BUILTIN: dict[str, tuple[LazyCommand, str]] = {
    "plugins": (
        _command("plugins"),
        "installed plugins, their components and commands; plugins new NAME --kind KIND",
    ),
    "cache": (_command("cache"), "inspect or clear the feature cache (info, clear)"),
    "dataset": (
        _command("dataset"),
        "export, inspect, fetch or build a dataset (export, info, fetch, build)",
    ),
    "report": (
        _command("report"),
        "tables beside the paper's numbers, and figures, of a sweep",
    ),
    "plan": (_command("plan"), "Pareto front of tracked runs; best config within a budget"),
    "pretrain": (
        _command("pretrain", "pretrain_command"),
        "self-supervised DINO pretraining on unlabeled crater images (a new backbone)",
    ),
    "ingest": (
        _command("workflows", "ingest_command"),
        "crops, or a tile + crater catalog -> a manifest",
    ),
    "index": (
        _command("workflows", "index_command"),
        "encode crops into a searchable index (also add, remove, info, log)",
    ),
    "search": (
        _command("workflows", "search_command"),
        "search query crops in an index (CSV + JSON)",
    ),
    "dedup": (
        _command("workflows", "dedup_command"),
        "duplicate craters in an index (pairs, groups, calibration)",
    ),
    "match": (
        _command("workflows", "match_command"),
        "mutual best matches between two indexes",
    ),
}


@hookimpl
def register_commands(register: Register) -> None:
    for name, (handler, description) in BUILTIN.items():
        register(name, handler, description)
