"""``python -m craterlab plugins new NAME --kind KIND``: a plugin package that builds as a wheel.

Writes ``craterlab-NAME/`` with a complete ``pyproject.toml`` (hatchling build backend, the
``craterlab`` entry point, ``conf/`` shipped as package data), the package with one working
component of the chosen kind, its Hydra option ``conf/<group>/NAME.yaml``, and a contract test
that uses :mod:`craterlab.testing`. ``pip install ./craterlab-NAME`` (editable or not) then
makes ``KIND=NAME`` work in runs and sweeps; docs/plugins.md explains each file.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path

from craterlab.errors import ConfigError

NAME = re.compile(r"[a-z][a-z0-9_]*")

PYPROJECT = """\
[build-system]
requires = ["hatchling>=1.25"]
build-backend = "hatchling.build"

[project]
name = "{dist}"
version = "0.1.0"
description = "{description}"
requires-python = ">=3.11"
dependencies = ["craterlab", "torch"]

[project.optional-dependencies]
test = ["pytest>=8"]

# The entry point craterlab looks for: group "craterlab", the plugin's name, its module.
[project.entry-points.craterlab]
{name} = "{module}"

# The wheel holds the package folder with everything in it, conf/ included (package data):
# conf/{group}/{name}.yaml is what makes `{group}={name}` work after a normal pip install.
[tool.hatch.build.targets.wheel]
packages = ["{module}"]

[tool.hatch.build.targets.sdist]
include = ["{module}", "tests", "README.md"]

[tool.pytest.ini_options]
testpaths = ["tests"]
addopts = "-p no:cacheprovider"
"""

README = """\
# {dist}

A craterlab plugin: {kind} `{name}` ({description}).

    pip install .                          # or pip install -e . while developing
    python -m craterlab plugins            # lists {kind} {name}
    python -m craterlab {group}={name}     # a run with it
    python -m pytest                       # the contract test (craterlab.testing)
"""

CONFTEST = '''\
"""The plugin contract checks and fixtures of craterlab.testing."""

pytest_plugins = ["craterlab.testing"]
'''

TEST = '''\
"""The {kind} keeps craterlab's contract, and its config option composes."""

from __future__ import annotations

from craterlab.testing import check_component, compose_config


def test_registered_through_its_entry_point(craterlab_registry) -> None:
    assert craterlab_registry.get("{kind}", "{name}").plugin == "{name}"


def test_keeps_the_{kind}_contract() -> None:
    check_component("{kind}", "{name}")  # config: conf/{group}/{name}.yaml


def test_the_option_is_shipped_with_the_package() -> None:
    cfg = compose_config("{group}={name}")
    assert cfg.{group}.name == "{name}"
'''

POOLING = '''\
"""craterlab plugin: {description}."""

from __future__ import annotations

from typing import Any

import torch

from craterlab import Features, hookimpl


class {cls}:
    """Attention-weighted mean of the patch tokens (uniform weights without attention),
    sharpened by ``power``: the crater's own tokens count most in one L2-normalized vector."""

    def __init__(self, power: float = 1.0) -> None:
        if power < 0:
            raise ValueError(f"power must be at least 0, got {{power}}")
        self.power = power

    def __call__(self, features: Features) -> torch.Tensor:
        tokens = features.tokens.float()
        if features.attn is None:
            weights = torch.ones(tokens.shape[:2], dtype=tokens.dtype, device=tokens.device)
        else:
            weights = features.attn.float().clamp(min=0) ** self.power
        weights = weights / weights.sum(1, keepdim=True).clamp(min=1e-12)
        pooled = torch.einsum("nt,ntd->nd", weights, tokens)
        return torch.nn.functional.normalize(pooled, dim=-1)


@hookimpl
def register_poolings(register: Any) -> None:
    register("{name}", {cls}, "{description}")
'''

SELECTOR = '''\
"""craterlab plugin: {description}."""

from __future__ import annotations

from typing import Any

import torch

from craterlab import Features, Tokens, hookimpl


class {cls}:
    """The K patch tokens of largest norm, best first, L2-normalized."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {{k}}")
        self.k = k

    def __call__(self, features: Features) -> Tokens:
        tokens = features.tokens
        k = min(self.k, tokens.shape[1])
        order = tokens.norm(dim=-1).topk(k, dim=1).indices
        picked = tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[2]))
        return Tokens(torch.nn.functional.normalize(picked, dim=-1))


@hookimpl
def register_selectors(register: Any) -> None:
    register("{name}", {cls}, "{description}")
'''

AGGREGATOR = '''\
"""craterlab plugin: {description}."""

from __future__ import annotations

from typing import Any

import torch

from craterlab import Features, Tokens, hookimpl


class {cls}:
    """K tokens: the means of K equal horizontal bands of the patch grid, L2-normalized."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {{k}}")
        self.k = k

    def __call__(self, features: Features) -> Tokens:
        n, t, d = features.tokens.shape
        k = min(self.k, t)
        band = torch.arange(t, device=features.tokens.device) * k // t
        sums = torch.zeros(n, k, d, dtype=features.tokens.dtype, device=features.tokens.device)
        sums.index_add_(1, band, features.tokens)
        return Tokens(torch.nn.functional.normalize(sums, dim=-1))


@hookimpl
def register_aggregators(register: Any) -> None:
    register("{name}", {cls}, "{description}")
'''

KINDS: dict[str, tuple[str, str, str]] = {
    # kind: (module template, option yaml, default description)
    "pooling": (POOLING, "name: {name}\npower: 1.0\n", "attention-weighted mean of the tokens"),
    "selector": (SELECTOR, "name: {name}\nk: ${{k}}\n", "the K tokens of largest norm"),
    "aggregator": (AGGREGATOR, "name: {name}\nk: ${{k}}\n", "K band means of the patch grid"),
}
"""The kinds ``plugins new`` writes a skeleton for (their group is named like the kind)."""


def new_plugin(
    name: str, kind: str, directory: str | Path = ".", description: str | None = None
) -> Path:
    """Write the plugin package ``craterlab-NAME`` under ``directory``; returns its folder."""
    if not NAME.fullmatch(name) or keyword.iskeyword(name):
        raise ConfigError(
            f"Plugin name {name!r} must be a lowercase Python identifier (letters, digits, _; "
            "starting with a letter), e.g. attn_mean: it names the module craterlab_NAME, the "
            "entry point and the config option."
        )
    if kind not in KINDS:
        raise ConfigError(
            f"plugins new writes a {', '.join(KINDS)} skeleton, not {kind!r}. For the other "
            "kinds start from one of these and follow docs/plugins.md (each hook's contract)."
        )
    template, option, default_description = KINDS[kind]
    dist = f"craterlab-{name.replace('_', '-')}"
    module = f"craterlab_{name}"
    root = Path(directory) / dist
    if root.exists():
        raise ConfigError(
            f"{root} already exists; plugins new never overwrites. Pick another name or "
            "--dir, or remove that folder."
        )
    values = {
        "name": name,
        "kind": kind,
        "group": kind,
        "dist": dist,
        "module": module,
        "cls": "".join(part.title() for part in name.split("_")) + kind.title(),
        "description": (description or default_description).replace('"', "'"),
    }
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"{module}/__init__.py": template,
        f"{module}/conf/{kind}/{name}.yaml": option,
        "tests/conftest.py": CONFTEST,
        f"tests/test_{name}.py": TEST,
    }
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.format(**values), encoding="utf-8")
    return root
