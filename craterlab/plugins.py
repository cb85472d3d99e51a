"""The plugin manager: built-in components and installed plugin packages, loaded once.

Built-in modules register through the same hooks as third-party packages, which are found via
the ``craterlab`` entry-point group. Set ``CRATERLAB_LOAD_PLUGINS=0`` to skip entry points
(e.g. to rule out a broken third-party plugin).

A third-party plugin that fails to import, implements a hook craterlab does not define (a
misspelling such as ``register_pooling``), takes arguments its hook does not pass, raises in a
registration hook or registers a name another plugin owns is *broken*: it is skipped with one
paragraph naming the plugin, its entry point, the hook and the fix, and every other plugin keeps
working. ``python -m craterlab plugins`` lists it as broken. A broken *built-in* is a bug in
craterlab and raises.

Every hook is documented, with an example, in ``docs/plugins.md``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from craterlab import hookspecs
from craterlab.errors import ConfigError, CraterlabError, closest
from craterlab.kinds import REGISTER_HOOKS
from craterlab.registry import LazyFactory, Registry, first_doc_line

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger("craterlab.plugins")

ENTRY_POINT_GROUP = "craterlab"
DOCS = "docs/plugins.md"

# Built-in plugin modules, each with ``@hookimpl`` registration functions.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "craterlab.data",
    "craterlab.backbones",
    "craterlab.tokens",
    "craterlab.retrieval",  # matchers, quantizers and stages
    "craterlab.train",
    "craterlab.commands",
    "craterlab.tracking",
)

# The hook that adds ``python -m craterlab <name>`` subcommands (not a registry kind).
COMMAND_HOOK = "register_commands"
COMMAND_NAME = re.compile(r"[a-z][a-z0-9_-]*")


@dataclass(frozen=True)
class BrokenPlugin:
    """A third-party plugin that was skipped, and why."""

    name: str
    """The entry point's name (the plugin's name in ``python -m craterlab plugins``)."""
    entry_point: str
    """``name = module[:attr]``, as the package's ``[project.entry-points.craterlab]`` says."""
    distribution: str
    """The installed package that declares the entry point (``name version``), if known."""
    hook: str
    """The hook at fault, or '' when the plugin could not be imported."""
    problem: str
    fix: str

    def message(self) -> str:
        """One paragraph: plugin, entry point, hook, problem and fix."""
        where = f"entry point 'craterlab: {self.entry_point}'"
        if self.distribution:
            where += f" of package {self.distribution}"
        hook = f" in hook {self.hook!r}" if self.hook else ""
        return (
            f"Plugin {self.name!r} ({where}) is broken and was skipped{hook}: {self.problem} "
            f"Fix: {self.fix} The other plugins are loaded as usual; "
            "CRATERLAB_LOAD_PLUGINS=0 skips every third-party plugin."
        )


@dataclass(frozen=True)
class Command:
    """A ``python -m craterlab <name> [args]`` subcommand: ``handler(args) -> exit status``."""

    name: str
    handler: Callable[[list[str]], int]
    description: str
    plugin: str


class PluginManager(pluggy.PluginManager):
    """pluggy's manager with craterlab's hookspecs and a record of the broken plugins."""

    def __init__(self) -> None:
        super().__init__("craterlab")
        self.add_hookspecs(hookspecs)
        self.broken: list[BrokenPlugin] = []
        self.sources: dict[str, tuple[str, str]] = {}
        """plugin name -> ('name = value' of its entry point, 'package version')."""

    def mark_broken(self, broken: BrokenPlugin) -> None:
        if self.has_plugin(broken.name):
            self.unregister(name=broken.name)
        if all(b.name != broken.name for b in self.broken):
            self.broken.append(broken)
            log.warning("%s", broken.message())

    def load_entry_point(self, ep: EntryPoint) -> None:
        """Import and register one entry point; on any problem, record it as broken."""
        target = f"{ep.name} = {ep.value}"
        dist = getattr(ep, "dist", None)
        dist_name = f"{dist.name} {dist.version}" if dist is not None else ""
        uninstall = f"pip uninstall {dist.name}" if dist is not None else "uninstall its package"

        def broken(hook: str, problem: str, fix: str) -> None:
            self.mark_broken(BrokenPlugin(ep.name, target, dist_name, hook, problem, fix))

        if self.has_plugin(ep.name):
            return
        try:
            plugin = ep.load()
        except Exception as exc:  # any import-time error of someone else's package
            broken(
                "",
                f"importing {ep.value!r} failed with {type(exc).__name__}: {exc}.",
                f"install what it needs (pip install {dist.name if dist else 'PACKAGE'} "
                f"--force-reinstall) or {uninstall}.",
            )
            return
        if self.is_registered(plugin):  # an entry point that names a built-in module
            return
        problem = hook_problem(self, plugin)
        if problem is not None:
            hook, text, fix = problem
            broken(hook, text, fix + f" (or {uninstall}).")
            return
        try:
            self.register(plugin, name=ep.name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            broken("", f"{exc}.", f"see {DOCS} for each hook's arguments (or {uninstall}).")
            return
        self.sources[ep.name] = (target, dist_name)


def hook_names() -> list[str]:
    """Every hook craterlab defines (its hookspecs)."""
    marker = f"{hookspecs.hookspec.project_name}_spec"
    return sorted(n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, marker))


def hook_problem(pm: pluggy.PluginManager, plugin: Any) -> tuple[str, str, str] | None:
    """(hook, problem, fix) for the first hook implementation craterlab cannot call, or None.

    Catches misspelled hook names and arguments the hook does not pass.
    """
    known = hook_names()
    for attr in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, attr)
        if opts is None:
            continue
        hook = opts.get("specname") or attr
        caller = getattr(pm.hook, hook, None)
        if caller is None or caller.spec is None:
            return (
                hook,
                f"craterlab defines no hook {hook!r}.{closest(hook, known)}",
                f"rename the function to one of the hooks in {DOCS} ({', '.join(known)})",
            )
        params = list(inspect.signature(getattr(plugin, attr)).parameters)
        params = [p for p in params if p != "self"]
        extra = [p for p in params if p not in caller.spec.argnames]
        if extra:
            return (
                hook,
                f"it takes argument(s) {', '.join(extra)}, but the hook passes only "
                f"{', '.join(caller.spec.argnames) or '(none)'}.",
                f"rename its parameters to the hook's argument names ({DOCS})",
            )
    return None


def make_manager(
    load_entry_points: bool | None = None, entry_points: Iterable[EntryPoint] | None = None
) -> PluginManager:
    """A plugin manager with built-ins and (unless disabled) installed plugin packages.

    ``entry_points`` replaces the installed ``craterlab`` entry points (tests pass fake ones).
    A broken third-party plugin is recorded in ``pm.broken`` and skipped; a built-in with a
    misspelled hook fails here, loudly (``check_pending``).
    """
    pm = PluginManager()
    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)
        if not pm.is_registered(module):
            pm.register(module, name=module_name)
    pm.check_pending()
    if load_entry_points is None:
        load_entry_points = os.environ.get("CRATERLAB_LOAD_PLUGINS", "1") != "0"
    if load_entry_points:
        eps = installed_entry_points() if entry_points is None else list(entry_points)
        for ep in eps:
            pm.load_entry_point(ep)
    return pm


def installed_entry_points() -> list[EntryPoint]:
    """The ``craterlab`` entry points of the installed packages, sorted by name."""
    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


# ------------------------------------------------------------------ registration


@dataclass(frozen=True)
class _Call:
    kind: str  # a registry kind, or "command"
    name: str
    factory: Any
    description: str
    schema: type | str | None


def collect(pm: pluggy.PluginManager) -> dict[str, list[_Call]]:
    """Every plugin's ``register(...)`` calls, by plugin (built-ins first).

    A third-party plugin whose registration hook raises, or that registers a name another
    plugin owns, is marked broken and dropped as a whole.
    """
    hooks = {**REGISTER_HOOKS, COMMAND_HOOK: "command"}
    calls: dict[str, list[_Call]] = {}
    failures: dict[str, tuple[str, str, str]] = {}
    for hook_name, kind in hooks.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin = pm.get_name(impl.plugin) or repr(impl.plugin)
            out = calls.setdefault(plugin, [])

            def register(
                name: str,
                factory: Any,
                description: str = "",
                schema: type | str | None = None,
                _kind: str = kind,
                _out: list[_Call] = out,
            ) -> None:
                if isinstance(factory, str) and _kind != "command":
                    factory = LazyFactory(factory)  # a malformed name fails in the plugin's hook
                _out.append(_Call(_kind, name, factory, description, schema))

            if plugin in DEFAULT_PLUGINS:
                impl.function(register=register)
                continue
            try:
                impl.function(register=register)
            except Exception as exc:
                failures.setdefault(
                    plugin,
                    (
                        hook_name,
                        f"it raised {type(exc).__name__}: {exc}.",
                        f"fix the plugin's {hook_name} ({DOCS}), or uninstall it.",
                    ),
                )
    order = sorted(calls, key=lambda p: (p not in DEFAULT_PLUGINS, p))
    owners: dict[tuple[str, str], tuple[str, Any]] = {}
    kept: dict[str, list[_Call]] = {}
    for plugin in order:
        problem = failures.get(plugin) or _conflict(plugin, calls[plugin], owners)
        if problem is not None:
            if plugin in DEFAULT_PLUGINS:
                raise ValueError(f"Built-in plugin {plugin!r}: {problem[1]}")
            _mark_broken(pm, plugin, *problem)
            continue
        for call in calls[plugin]:
            owners.setdefault((call.kind, call.name), (plugin, call.factory))
        kept[plugin] = calls[plugin]
    return kept


def _conflict(
    plugin: str, calls: list[_Call], owners: dict[tuple[str, str], tuple[str, Any]]
) -> tuple[str, str, str] | None:
    """(hook, problem, fix) for a command name that is not a word or a name already taken."""
    for call in calls:
        hook = COMMAND_HOOK if call.kind == "command" else _hook_of(call.kind)
        if call.kind == "command" and not COMMAND_NAME.fullmatch(call.name):
            return (
                hook,
                f"command name {call.name!r} is not a lowercase word (letters, digits, - and _).",
                f"fix the plugin's {hook}: command names never contain '=' ({DOCS}).",
            )
        owner = owners.get((call.kind, call.name))
        if owner is not None and owner[1] != call.factory:
            return (
                hook,
                f"{call.kind} {call.name!r} is already registered by {owner[0]!r}.",
                "rename its component, or uninstall one of the two plugins.",
            )
    return None


def _hook_of(kind: str) -> str:
    return next((h for h, k in REGISTER_HOOKS.items() if k == kind), kind)


def _mark_broken(pm: pluggy.PluginManager, plugin: str, hook: str, problem: str, fix: str) -> None:
    if not isinstance(pm, PluginManager):
        raise CraterlabError(f"Plugin {plugin!r}, hook {hook!r}: {problem} Fix: {fix}")
    target, dist = pm.sources.get(plugin, (plugin, ""))
    pm.mark_broken(BrokenPlugin(plugin, target, dist, hook, problem, fix))


def fill_registry(pm: pluggy.PluginManager) -> Registry:
    """Call every registration hook, recording which plugin registered each component."""
    registry = Registry()
    for plugin, calls in collect(pm).items():
        for call in calls:
            if call.kind != "command":
                registry.register(
                    call.kind,
                    call.name,
                    call.factory,
                    description=call.description,
                    schema=call.schema,
                    plugin=plugin,
                )
    return registry


def fill_commands(pm: pluggy.PluginManager) -> dict[str, Command]:
    """The subcommands every plugin registers through ``register_commands``, by name."""
    commands: dict[str, Command] = {}
    for plugin, calls in collect(pm).items():
        for call in calls:
            if call.kind == "command":
                description = call.description or first_doc_line(call.factory)
                commands[call.name] = Command(call.name, call.factory, description, plugin)
    return dict(sorted(commands.items()))


# ------------------------------------------------------------------ process-wide state

_manager: PluginManager | None = None
_registry: Registry | None = None
_commands: dict[str, Command] | None = None


def get_manager() -> PluginManager:
    global _manager
    if _manager is None:
        _manager = make_manager()
    return _manager


def get_registry() -> Registry:
    """The process-wide registry (built on first use)."""
    global _registry
    if _registry is None:
        _registry = fill_registry(get_manager())
    return _registry


def get_commands() -> dict[str, Command]:
    """The process-wide subcommands (built on first use)."""
    global _commands
    if _commands is None:
        _commands = fill_commands(get_manager())
    return _commands


def broken_plugins() -> list[BrokenPlugin]:
    """Third-party plugins skipped in this process (after loading components and commands)."""
    get_registry()
    get_commands()
    return list(get_manager().broken)


def reset() -> None:
    """Forget the loaded plugins (tests use this after registering a plugin)."""
    global _manager, _registry, _commands
    _manager = None
    _registry = None
    _commands = None


def plugin_table(registry: Registry | None = None) -> list[tuple[str, str, str, str]]:
    """(plugin, kind, name, description) for every registered component, sorted."""
    registry = registry or get_registry()
    rows = [(c.plugin, c.kind, c.name, c.description) for c in registry]
    return sorted(rows, key=lambda r: (not r[0].startswith("craterlab."), r[0], r[1], r[2]))


# ------------------------------------------------------------------ config folders


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


def plugin_config_dirs(pm: pluggy.PluginManager | None = None) -> list[Path]:
    """``conf/`` folders shipped beside third-party plugin modules (added to Hydra's path)."""
    pm = pm or get_manager()
    dirs = []
    for name, plugin in pm.list_name_plugin():
        module_file = getattr(plugin, "__file__", None)
        if name in DEFAULT_PLUGINS or not module_file:
            continue
        conf = Path(module_file).resolve().parent / "conf"
        if conf.is_dir():
            dirs.append(conf)
    return dirs


def compose_outside_job(overrides: Sequence[str], hint: str) -> DictConfig:
    """``conf/config.yaml`` composed with Hydra ``overrides`` outside a Hydra job (commands and
    the Python API): installed plugins' config folders join the search path, ``output_dir``
    (a ``${hydra:...}`` value) is null unless set, and overrides that do not compose are one
    :class:`ConfigError` naming Hydra's first line and ending with ``hint``."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    extra = plugin_config_dirs()
    if extra and not any(o.startswith("hydra.searchpath") for o in overrides):
        overrides.append("hydra.searchpath=[" + ",".join(f"file://{d}" for d in extra) + "]")
    if not any(o.split("=", 1)[0].lstrip("+") == "output_dir" for o in overrides):
        overrides.append("output_dir=null")  # ${hydra:...} only resolves inside a Hydra job
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"The overrides {' '.join(overrides)!r} do not compose: {first}. {hint}"
        ) from None


# ------------------------------------------------------------------ options without a config

OPTION_NAME = re.compile(r"^name:\s*['\"]?([\w.-]+)", re.MULTILINE)


@dataclass(frozen=True)
class MissingConfig:
    """A third-party component of a config group that no ``<group>/<option>.yaml`` selects."""

    plugin: str
    distribution: str
    kind: str
    name: str
    conf: Path
    """Where the plugin's ``conf/`` folder should be: beside its module."""

    def message(self) -> str:
        """One paragraph: which plugin, what is missing, why ``kind=name`` fails, the fix."""
        package = f" (package {self.distribution})" if self.distribution else ""
        option = f"{self.kind}/{self.name}.yaml"
        if self.conf.is_dir():
            what = f"its conf/ folder {self.conf} has no {option}"
            fix = f"add conf/{option} (name: {self.name} and its parameters) to the package"
        else:
            what = (
                f"its conf/ folder was not shipped with the package (nothing at {self.conf}), "
                "so the wheel was built without its package data"
            )
            fix = (
                "give the plugin's pyproject.toml a [build-system] (hatchling ships conf/ "
                "inside the package folder; see 'A plugin package' in docs/plugins.md)"
            )
        return (
            f"Plugin {self.plugin!r}{package} registers {self.kind} {self.name!r}, but {what}: "
            f"`{self.kind}={self.name}` has no config option to select. Fix: {fix}, then "
            "rebuild and reinstall it (pip install --force-reinstall PATH_OR_WHEEL)."
        )


def group_options(group: str, dirs: Iterable[Path]) -> set[str]:
    """Names an option file of ``group`` selects: file stems and their ``name:`` values."""
    found: set[str] = set()
    for root in dirs:
        for path in Path(root, group).glob("*.yaml"):
            found.add(path.stem)
            match = OPTION_NAME.search(path.read_text(encoding="utf-8", errors="replace"))
            if match:
                found.add(match.group(1))
    return found


def missing_configs(
    pm: PluginManager | None = None, registry: Registry | None = None
) -> list[MissingConfig]:
    """Third-party components of a config group (``pooling``, ``selector``, ...) without a
    config option: usually a plugin installed from a wheel that left its ``conf/`` out."""
    from craterlab.registry import GROUP_KINDS

    pm = pm or get_manager()
    registry = registry or (get_registry() if pm is _manager else fill_registry(pm))
    dirs = [config_dir(), *plugin_config_dirs(pm)]
    options: dict[str, set[str]] = {}
    out = []
    for component in registry:
        if component.plugin in DEFAULT_PLUGINS or component.kind not in GROUP_KINDS:
            continue
        if component.kind not in options:
            options[component.kind] = group_options(component.kind, dirs)
        if component.name in options[component.kind]:
            continue
        plugin = pm.get_plugin(component.plugin)
        module_file = getattr(plugin, "__file__", None) or ""
        conf = Path(module_file).resolve().parent / "conf" if module_file else Path("conf")
        dist = pm.sources.get(component.plugin, ("", ""))[1] if hasattr(pm, "sources") else ""
        out.append(MissingConfig(component.plugin, dist, component.kind, component.name, conf))
    return out
