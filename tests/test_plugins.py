"""Plugin hooks: every registration hook, commands, observers, broken plugins, entry points,
the documented contract (docs/plugins.md) and what ``craterlab`` exports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from importlib.metadata import EntryPoint
from pathlib import Path

import pluggy
import pytest

import craterlab
from craterlab import __main__ as cli
from craterlab import hookimpl, hookspecs, plugins
from craterlab.commands.plugins import main as plugins_command
from craterlab.errors import ConfigError
from craterlab.plugins import (
    DEFAULT_PLUGINS,
    REGISTER_HOOKS,
    fill_commands,
    fill_registry,
    get_registry,
    hook_names,
    make_manager,
)
from craterlab.registry import KINDS, LazyFactory, resolve_factory

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = [ROOT / "plugins" / "craterlab-center", ROOT / "plugins" / "craterlab-qe"]
DOCS = ROOT / "docs" / "plugins.md"


def make_component(k: int = 1) -> int:
    """A toy component."""
    return k


class EveryKind:
    """A plugin registering one component of every kind."""


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
    assert {c.plugin for c in registry} <= set(DEFAULT_PLUGINS)
    for kind in KINDS:
        assert registry.names(kind), f"no built-in {kind}"
    commands = fill_commands(pm)
    assert {"cache", "dataset", "plugins"} <= set(commands)
    assert commands["plugins"].plugin == "craterlab.commands"


def test_a_builtin_with_a_misspelled_hook_fails_loudly(monkeypatch) -> None:
    module = types.ModuleType("craterlab_typo_builtin")

    @hookimpl
    def register_pooling(register):  # missing the 's'
        register("x", make_component)

    module.register_pooling = register_pooling
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(plugins, "DEFAULT_PLUGINS", (*DEFAULT_PLUGINS, module.__name__))
    with pytest.raises(pluggy.PluginValidationError, match="register_pooling"):
        make_manager(load_entry_points=False)


def test_observer_hooks_are_called_with_config_results_and_tracker() -> None:
    calls = []

    class Observer:
        @hookimpl
        def run_started(self, config, run_dir, tracker):
            calls.append(("started", config["k"], run_dir, tracker))

        @hookimpl
        def run_finished(self, run_dir, results):  # any subset of the arguments
            calls.append(("finished", results["single"]["mAP"], run_dir))

    pm = make_manager(load_entry_points=False)
    pm.register(Observer())
    pm.hook.run_started(config={"k": 8}, run_dir="d", tracker="T")
    pm.hook.run_finished(config={"k": 8}, run_dir="d", results={"single": {"mAP": 0.5}}, tracker=0)
    assert calls == [("started", 8, "d", "T"), ("finished", 0.5, "d")]


# ------------------------------------------------------------------ broken plugins


def fake_plugin(monkeypatch, module_name: str, **hooks) -> EntryPoint:
    """A module in sys.modules with the given hook implementations, and its entry point."""
    module = types.ModuleType(module_name)
    for name, fn in hooks.items():
        fn.__name__ = name
        setattr(module, name, hookimpl(fn))
    monkeypatch.setitem(sys.modules, module_name, module)
    return EntryPoint(module_name.replace("_", "-"), module_name, "craterlab")


def good_selector(register):
    register("good_selector", make_component, "from a working plugin")


@pytest.mark.parametrize(
    ("hooks", "hook", "problem", "fix"),
    [
        (
            {"register_pooling": lambda register: None},
            "register_pooling",
            "craterlab defines no hook 'register_pooling'. Did you mean 'register_poolings'?",
            "rename the function to one of the hooks in docs/plugins.md",
        ),
        (
            {"register_selectors": lambda reg: None},
            "register_selectors",
            "it takes argument(s) reg, but the hook passes only register.",
            "rename its parameters",
        ),
        (
            {"register_selectors": lambda register: 1 / 0},
            "register_selectors",
            "it raised ZeroDivisionError: division by zero.",
            "fix the plugin's register_selectors",
        ),
        (
            {"register_selectors": lambda register: register("attention", make_component)},
            "register_selectors",
            "selector 'attention' is already registered by 'craterlab.tokens'.",
            "rename its component",
        ),
        (
            {"register_commands": lambda register: register("k=3", make_component)},
            "register_commands",
            "command name 'k=3' is not a lowercase word",
            "fix the plugin's register_commands: command names never contain '='",
        ),
    ],
)
def test_broken_plugin_is_named_and_the_others_keep_working(
    monkeypatch, hooks, hook: str, problem: str, fix: str
) -> None:
    broken = fake_plugin(monkeypatch, "craterlab_broken", **hooks)
    good = fake_plugin(monkeypatch, "craterlab_good", register_selectors=good_selector)
    pm = make_manager(load_entry_points=True, entry_points=[broken, good])
    registry = fill_registry(pm)
    fill_commands(pm)
    assert "good_selector" in registry.names("selector")
    assert [b.name for b in pm.broken] == ["craterlab-broken"]
    message = pm.broken[0].message()
    assert message.startswith(
        "Plugin 'craterlab-broken' (entry point 'craterlab: craterlab-broken = craterlab_broken') "
        f"is broken and was skipped in hook {hook!r}: "
    )
    assert problem in message and f"Fix: {fix}" in message
    assert "\n" not in message
    assert not pm.has_plugin("craterlab-broken")  # none of its hooks is called any more


def test_plugin_that_fails_to_import_is_named(monkeypatch) -> None:
    missing = EntryPoint("ghost", "craterlab_ghost_module_xyz", "craterlab")
    good = fake_plugin(monkeypatch, "craterlab_good", register_selectors=good_selector)
    pm = make_manager(load_entry_points=True, entry_points=[missing, good])
    assert "good_selector" in fill_registry(pm).names("selector")
    (broken,) = pm.broken
    assert broken.hook == ""
    assert (
        "Plugin 'ghost' (entry point 'craterlab: ghost = craterlab_ghost_module_xyz') is broken "
        "and was skipped: importing 'craterlab_ghost_module_xyz' failed with "
        "ModuleNotFoundError: No module named 'craterlab_ghost_module_xyz'." in broken.message()
    )


def test_plugins_command_lists_broken_plugins(monkeypatch, capsys) -> None:
    broken = fake_plugin(monkeypatch, "craterlab_typo", register_pooling=lambda register: None)
    good = fake_plugin(monkeypatch, "craterlab_good", register_selectors=good_selector)
    monkeypatch.setattr(plugins, "installed_entry_points", lambda: [broken, good])
    monkeypatch.setenv("CRATERLAB_LOAD_PLUGINS", "1")
    plugins.reset()
    try:
        assert plugins_command([]) == 0
        text = capsys.readouterr().out
        assert "craterlab-typo  [BROKEN]" in text
        assert "Did you mean 'register_poolings'?" in text
        assert re.search(r"craterlab-good\n  selector +good_selector +from a working plugin", text)
        assert plugins_command(["--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        (row,) = [r for r in rows if r["kind"] == "broken"]
        assert {k: v for k, v in row.items() if k != "description"} == {
            "plugin": "craterlab-typo",
            "kind": "broken",
            "name": "register_pooling",
        }
        # its selector has no conf/ option (the fake module has no folder): named as well
        (row,) = [r for r in rows if r["kind"] == "no-config"]
        assert (row["plugin"], row["name"]) == ("craterlab-good", "good_selector")
    finally:
        plugins.reset()


@pytest.fixture(scope="module")
def fake_dist(tmp_path_factory) -> Path:
    """A broken plugin 'installed' as a dist-info folder on sys.path (misspelled hook)."""
    site = tmp_path_factory.mktemp("site")
    (site / "craterlab_typo.py").write_text(
        "from craterlab import hookimpl\n\n\n@hookimpl\ndef register_selector(register):\n"
        "    pass\n"
    )
    info = site / "craterlab_typo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: craterlab-typo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[craterlab]\ntypo = craterlab_typo\n")
    return site


def test_installed_broken_plugin_shows_in_the_plugins_command(fake_dist: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake_dist), str(ROOT)]))
    env.pop("CRATERLAB_LOAD_PLUGINS", None)
    result = subprocess.run(
        [sys.executable, "-m", "craterlab", "plugins"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "typo  [BROKEN]" in result.stdout
    assert (
        "Plugin 'typo' (entry point 'craterlab: typo = craterlab_typo' of package "
        "craterlab-typo 0.1) is broken and was skipped in hook 'register_selector': craterlab "
        "defines no hook 'register_selector'. Did you mean 'register_selectors'?"
    ) in result.stdout
    assert "craterlab.tokens" in result.stdout  # the built-ins are still listed


# ------------------------------------------------------------------ the command line


def run_main(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["craterlab", *argv])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_help_lists_commands_and_how_to_run(monkeypatch, capsys) -> None:
    code, out, _ = run_main(monkeypatch, capsys, "--help")
    assert code == 0
    for name in ("cache", "dataset", "plugins"):
        assert re.search(rf"^  {name} +\S", out, re.M), name
    assert "python -m craterlab backbone=dinov2_s14 aggregator=instance k=64" in out
    assert re.search(r"^  selector: .*attention", out, re.M)


def test_unknown_command_is_one_line(monkeypatch, capsys) -> None:
    code, out, err = run_main(monkeypatch, capsys, "plugin")
    assert code == 2
    known = ", ".join(sorted(plugins.get_commands()))
    assert {"cache", "dataset", "plugins"} <= set(plugins.get_commands())
    assert err.strip().splitlines() == [
        f"Error: Unknown command 'plugin'. Did you mean 'plugins'? Commands: {known}. To run "
        "an experiment, pass overrides as KEY=VALUE (python -m craterlab aggregator=instance "
        "k=64); python -m craterlab --help shows both."
    ]
    assert "EQUAL" not in err


def test_command_after_overrides_is_refused(monkeypatch, capsys) -> None:
    code, _, err = run_main(monkeypatch, capsys, "k=3", "plugins")
    assert code == 2 and "'plugins' is a command: put it first" in err


def test_hydra_flags_and_their_values_are_not_commands() -> None:
    argv = ["-m", "--cfg", "job", "-cn", "config", "--info", "searchpath", "k=3", "~tracking"]
    assert cli.bare_words(argv) == []
    assert cli.bare_words(["k=3", "report", "--cfg", "job"]) == [(1, "report")]


def test_a_plugin_command_runs_from_the_command_line(monkeypatch, capsys) -> None:
    def hello(args: list[str]) -> int:
        """Say hello."""
        print("hello", *args)
        return 3

    ep = fake_plugin(
        monkeypatch, "craterlab_hello", register_commands=lambda register: register("hello", hello)
    )
    monkeypatch.setattr(plugins, "installed_entry_points", lambda: [ep])
    monkeypatch.setenv("CRATERLAB_LOAD_PLUGINS", "1")
    plugins.reset()
    try:
        code, out, _ = run_main(monkeypatch, capsys, "hello", "crater", "k=1")
        assert (code, out) == (3, "hello crater k=1\n")
        _, out, _ = run_main(monkeypatch, capsys, "--help")
        assert re.search(r"^  hello +Say hello\.$", out, re.M)
    finally:
        plugins.reset()


# ------------------------------------------------------------------ docs and exports


def doc_sections() -> dict[str, str]:
    text = DOCS.read_text()
    parts = re.split(r"^#{3,4} `([a-z_]+)`\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_is_documented_with_an_example(hook: str) -> None:
    sections = doc_sections()
    assert hook in sections, f"docs/plugins.md has no heading `{hook}` (### or ####)"
    section = sections[hook]
    assert "Called" in section, f"{hook}: say when it is called"
    assert "Arguments" in section, f"{hook}: name its arguments"
    assert "```python" in section and f"def {hook}(" in section, f"{hook}: give an example"
    assert f"[`{hook}`](#{hook})" in DOCS.read_text(), f"{hook}: missing from the hooks table"


def test_docs_document_no_hook_that_does_not_exist() -> None:
    assert set(doc_sections()) <= set(hook_names())


def test_craterlab_exports_what_a_plugin_needs() -> None:
    for name in craterlab.__all__:
        assert getattr(craterlab, name) is not None, name
    assert craterlab.hookimpl is hookspecs.hookimpl
    from craterlab.types import RetrievalInputs

    assert craterlab.RetrievalInputs is RetrievalInputs
    selector = craterlab.build("selector", {"name": "norm", "k": 2})
    assert selector.k == 2
    from craterlab.experiment import run

    assert craterlab.run is run and run.__module__ == "craterlab.experiment"


def test_import_craterlab_is_cheap() -> None:
    code = (
        "import sys, craterlab\n"
        "print(sorted(m for m in ('torch', 'hydra', 'pluggy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


HEAVY = ("torch", "torchvision", "timm", "faiss", "mlflow", "lightly", "rasterio", "geopandas")


def test_help_and_plugins_import_no_heavy_library() -> None:
    """``--help``, ``plugins`` and every command's ``--help`` print without torch, timm, FAISS or
    MLflow (they would cost seconds): built-ins are registered by name, imported when built."""
    from craterlab.commands import BUILTIN

    invocations = [["--help"], ["plugins"], *([name, "--help"] for name in BUILTIN)]
    code = (
        "import contextlib, io, json, sys\n"
        "from craterlab.__main__ import main\n"
        f"heavy, out = {HEAVY!r}, {{}}\n"
        f"for argv in {invocations!r}:\n"
        "    sys.argv = ['craterlab', *argv]\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as text:\n"
        "        try:\n"
        "            main()\n"
        "        except SystemExit as exc:\n"
        "            assert exc.code in (0, None), (argv, exc.code)\n"
        "    assert len(text.getvalue()) > 100, (argv, text.getvalue())\n"
        "    out[' '.join(argv)] = [m for m in heavy if m in sys.modules]\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, CRATERLAB_LOAD_PLUGINS="0")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(imported) == {" ".join(argv) for argv in invocations}
    assert {argv: mods for argv, mods in imported.items() if mods} == {}


def test_every_builtin_component_named_lazily_resolves() -> None:
    """Each built-in factory and schema named as 'module:attribute' imports, with a schema and
    a description (a typo in a name would otherwise surface only when that component is built)."""
    lazy = [c for c in get_registry() if isinstance(c.factory, LazyFactory)]
    assert len(lazy) > 30
    for component in get_registry():
        assert callable(resolve_factory(component.factory)), component
        assert component.description, component
        names = [p.name for p in component.params]
        assert len(names) == len(set(names)), component


def test_a_plugin_can_name_its_factory_lazily(monkeypatch) -> None:
    """A third-party ``register("gem2", "package.module:attribute")`` builds the named class;
    a name that does not import is one message naming it; a malformed one marks the plugin
    broken."""
    from craterlab.tokens.pooling import GeMPooling

    ep = fake_plugin(
        monkeypatch,
        "craterlab_lazy",
        register_poolings=lambda register: (
            register("gem2", "craterlab.tokens.pooling:GeMPooling", "GeM, named lazily"),
            register("gone", "craterlab.tokens.pooling:NoSuchPooling", "a typo"),
        ),
    )
    registry = fill_registry(make_manager(load_entry_points=True, entry_points=[ep]))
    component = registry.get("pooling", "gem2")
    assert isinstance(component.factory, LazyFactory) and component.plugin == "craterlab-lazy"
    assert "p" in [p.name for p in component.params]
    assert isinstance(registry.build("pooling", {"name": "gem2"}), GeMPooling)
    with pytest.raises(ConfigError, match=r"'craterlab.tokens.pooling:NoSuchPooling'.*import"):
        registry.build("pooling", {"name": "gone"})

    bad = fake_plugin(
        monkeypatch,
        "craterlab_malformed",
        register_poolings=lambda register: register("x", "no_colon_here"),
    )
    pm = make_manager(load_entry_points=True, entry_points=[bad])
    registry = fill_registry(pm)
    assert "x" not in registry.names("pooling")
    assert "package.module:attribute" in pm.broken[0].message()


# ------------------------------------------------------------------ the example packages


@pytest.fixture(scope="module")
def installed_examples(tmp_path_factory) -> dict[str, str]:
    """The example plugin packages installed into a private target directory."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
        + ["--target", str(target), *map(str, EXAMPLES)],
        check=True,
        capture_output=True,
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]))
    env.pop("CRATERLAB_LOAD_PLUGINS", None)
    return env


def test_example_plugins_are_listed_once_installed(installed_examples) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "craterlab", "plugins", "--json"],
        env=installed_examples,
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
    assert any(r["plugin"] == "qe" and (r["kind"], r["name"]) == ("stage", "qe") for r in rows)
    assert not [r for r in rows if r["kind"] == "broken"]


def test_example_plugins_own_tests_pass(installed_examples) -> None:
    """Both packages' tests (craterlab.testing contract checks included), in one pytest."""
    tests = [str(example / "tests") for example in EXAMPLES]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *tests],
        env=installed_examples,
        capture_output=True,
        text=True,
        cwd=ROOT / "plugins",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b9 passed", result.stdout), result.stdout


def test_register_passes_schema_through(monkeypatch) -> None:
    """``register(name, factory, description, schema)``: a dataclass schema gives the keys."""
    from dataclasses import dataclass

    @dataclass
    class Options:
        size: int = 2
        mode: str = "a"

    def factory(**options):
        return Options(**options)

    ep = fake_plugin(
        monkeypatch,
        "craterlab_schema",
        register_poolings=lambda register: register("opts", factory, "with a schema", Options),
    )
    registry = fill_registry(make_manager(load_entry_points=True, entry_points=[ep]))
    assert [p.name for p in registry.get("pooling", "opts").params] == ["size", "mode"]
    assert registry.build("pooling", {"name": "opts", "size": 5}) == Options(5, "a")
