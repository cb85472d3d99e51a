"""The plugin contract, as a pytest plugin: ``check_component`` and tiny fixtures.

Use it from a plugin package's tests (``conftest.py``: ``pytest_plugins = ["craterlab.testing"]``)
or import the functions directly::

    from craterlab.testing import check_component

    def test_my_selector_keeps_the_contract():
        check_component("selector", "center")          # config from the plugin's conf/ file

``check_component(kind, name, config=None)`` builds the component from its config (by default
the one its ``conf/`` option composes to, with ``k=4``) and checks what its kind promises:

============  =====================================================================  ========
kind          output checked                                                         L2 norm
============  =====================================================================  ========
pooling       (N, D') float tensor, finite                                           rows
selector      Tokens (N, K, D), each one of the image's patches; None ('none')        tokens
aggregator    Tokens (N, K, D'), finite; a factory may return None ('none')           tokens
matcher       score (Nq, Ng); rerank == score gathered; padding tokens are ignored    -
quantizer     store: len, nbytes == bytes_per_image x N, decode shape and fidelity    -
stage         Ranking (Nq, depth): distinct in-range indices, scores best first      -
loss          finite scalar with gradients to the embeddings                         -
backbone      Features: cls (N, D), tokens (N, rows x cols, D), attention rows sum 1  -
dataset       records, unique ids, every query has a relevant gallery image, RGB      -
tracking      start, log params/metrics/artifact, tags, finish, without raising       -
============  =====================================================================  ========

and, for every kind:

- **batch independence**: the output for a batch equals the outputs for its two halves
  concatenated (queries for matchers and stages, images for the rest). Components that learn
  (``fit``: VLAD, NetVLAD, PQ) are fitted once, on a separate gallery, before both. Exceptions:
  losses (a batch is the unit a loss is defined on), datasets and trackers (no batches).
- **determinism under a seed**: building and running the component twice with the same seed
  gives identical outputs (seeded selectors, K-means, PQ, random weights); not for trackers.
- **config errors**: an unknown key raises :class:`craterlab.errors.ConfigError` naming the
  component's valid keys; a value of the wrong type for a typed key names the expected type.

A kind without a contract here gets the config checks only. Fixtures: ``craterlab_registry``
(the process-wide registry), ``tiny_dataset`` (a synthetic set of 6 identities),
``composed_config`` (``conf/config.yaml`` composed for a seconds-long run, with installed
plugins' ``conf/`` folders on the search path), ``tiny_features`` and ``tiny_tokens``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from craterlab.errors import ConfigError
from craterlab.kinds import GROUP_KINDS, KIND_GROUPS, KINDS
from craterlab.plugins import (
    config_dir,
    fill_registry,
    get_registry,
    make_manager,
    plugin_config_dirs,
)
from craterlab.registry import Registry
from craterlab.types import Features, Fittable, Ranking, RetrievalInputs, Tokens

SEED = 0

# Overrides for a run that takes seconds offline: tiny synthetic set, random weights, no MLflow.
TINY_OVERRIDES: tuple[str, ...] = (
    "dataset=synthetic",
    "dataset.n_identities=12",
    "dataset.n_query_craters=4",
    "dataset.image_size=64",
    "backbone.weights=random",
    "batch_size=16",
    "k=8",
    "shortlist=5",
    "depth=20",
    "tracking=none",
)

# Small inputs shared by the checks (N images of a 4x4 grid of 8-d tokens).
N_IMAGES, GRID, DIM = 6, (4, 4), 8


# ------------------------------------------------------------------ tiny inputs


def random_features(
    n: int = 4,
    grid: tuple[int, int] = (4, 4),
    dim: int = 8,
    *,
    attention: bool = True,
    seed: int = 0,
) -> Features:
    """Random features with a valid attention distribution (rows sum to one)."""
    g = torch.Generator().manual_seed(seed)
    t = grid[0] * grid[1]
    attn = torch.rand(n, t, generator=g).softmax(dim=-1) if attention else None
    return Features(
        cls=torch.randn(n, dim, generator=g),
        tokens=torch.randn(n, t, dim, generator=g),
        attn=attn,
        grid=grid,
    )


def random_tokens(n: int = 4, k: int = 3, dim: int = 8, *, seed: int = 0) -> Tokens:
    """Random L2-normalized token sets (N, K, D)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(n, k, dim, generator=g), dim=-1)
    return Tokens(v)


def with_padding(tokens: Tokens, *, seed: int = 0) -> Tokens:
    """The same token sets with a random tail of each set marked as padding (first kept)."""
    g = torch.Generator().manual_seed(seed)
    n, k, _ = tokens.vectors.shape
    real = torch.randint(1, k + 1, (n, 1), generator=g)
    return Tokens(tokens.vectors, torch.arange(k).expand(n, k) < real)


def retrieval_inputs(
    registry: Registry, nq: int = 4, ng: int = 20, k: int = 3, dim: int = 8, depth: int = 10
) -> RetrievalInputs:
    """Queries and a gallery of random token sets, an fp32 store and late interaction."""
    gallery, queries = random_tokens(ng, k, dim, seed=4), random_tokens(nq, k, dim, seed=5)
    quantizer = registry.build("quantizer", {"name": "fp32"})
    quantizer.fit(gallery)
    return RetrievalInputs(
        query_vectors=torch.nn.functional.normalize(queries.vectors.mean(1), dim=-1),
        gallery_vectors=torch.nn.functional.normalize(gallery.vectors.mean(1), dim=-1),
        query_tokens=queries,
        gallery_store=quantizer.encode(gallery),
        matcher=registry.build("matcher", {"name": "late_interaction"}),
        depth=depth,
    )


def query_slice(inputs: RetrievalInputs, part: slice) -> RetrievalInputs:
    """The same retrieval problem for a subset of the queries."""
    return RetrievalInputs(
        query_vectors=inputs.query_vectors[part],
        gallery_vectors=inputs.gallery_vectors,
        query_tokens=inputs.query_tokens[part],
        gallery_store=inputs.gallery_store,
        matcher=inputs.matcher,
        depth=inputs.depth,
    )


# ------------------------------------------------------------------ configs


def builtin_registry() -> Registry:
    """A registry of craterlab's own components only (installed plugins left out).

    Tests that count or enumerate components use it, so installing a plugin cannot change them.
    """
    return fill_registry(make_manager(load_entry_points=False))


def compose_config(*overrides: str, plugins: bool = True) -> DictConfig:
    """``conf/config.yaml`` composed with overrides (and installed plugins' conf/ folders)."""
    from hydra import compose, initialize_config_dir

    extra = list(overrides)
    dirs = plugin_config_dirs() if plugins else []
    if dirs:
        extra.append("hydra.searchpath=[" + ",".join(f"file://{d}" for d in dirs) + "]")
    if not any(o.split("=", 1)[0].lstrip("+") == "output_dir" for o in extra):
        extra.append("output_dir=null")  # ${hydra:...} resolves only inside a Hydra job
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=extra)


def component_configs(cfg: DictConfig) -> list[tuple[str, dict[str, Any]]]:
    """(kind, component config) for every component a composed config builds."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(plain, dict)

    def resolved(*path: str) -> Any:
        return OmegaConf.to_container(OmegaConf.select(cfg, ".".join(path)), resolve=True)

    pairs = [(group, resolved(group)) for group in GROUP_KINDS if group in plain]
    for kind, config in pairs:
        if kind == "tracking":
            config.pop("run_name", None)  # chosen per run, not a tracker setting
    stages = plain.get("retrieval", {}).get("stages", {})
    pairs += [("stage", resolved("retrieval", "stages", key)) for key in stages]
    train = plain.get("train") or {}
    if train.get("name", "none") != "none" and "loss" in train:
        pairs.append(("loss", resolved("train", "loss")))
    return pairs


def config_options() -> dict[str, list[str]]:
    """Config group -> options, from conf/ and installed plugins' conf/ folders."""
    groups: dict[str, set[str]] = {}
    for root in (config_dir(), *plugin_config_dirs()):
        for folder in Path(root).iterdir():
            if folder.is_dir() and folder.name != "experiment":
                names = {p.stem for p in folder.glob("*.yaml")}
                groups.setdefault(folder.name, set()).update(names)
    return {g: sorted(o) for g, o in sorted(groups.items())}


@lru_cache(maxsize=64)
def _group_configs(group: str, options: tuple[str, ...]) -> dict:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for option in options:
        cfg = compose_config(f"{group}={option}", "k=4", "shortlist=3")
        for kind, config in component_configs(cfg):
            if KIND_GROUPS.get(kind, kind) == group:
                found.setdefault((kind, config["name"]), config)
    return found


def configs_by_component(kinds: Sequence[str] | None = None) -> dict[tuple[str, str], dict]:
    """(kind, name) -> the config its conf/ option composes to (with ``k=4``, ``shortlist=3``).

    Only the groups of ``kinds`` (default: every kind) are composed. When several options build
    the same component, the first option in sorted order wins.
    """
    options = config_options()
    groups = [KIND_GROUPS.get(k, k) for k in (kinds or KINDS)]
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for group in dict.fromkeys(groups):
        for key, config in _group_configs(group, tuple(options.get(group, ()))).items():
            found.setdefault(key, dict(config))
    return found


def default_config(kind: str, name: str) -> dict[str, Any]:
    """The config ``check_component`` uses when given none: its conf/ option, else the name."""
    return configs_by_component([kind]).get((kind, name), {"name": name})


# ------------------------------------------------------------------ the contract


def seeded(fn: Callable[[], Any]) -> Any:
    """``fn()`` with torch, random and numpy seeded to :data:`SEED`."""
    import numpy as np

    torch.manual_seed(SEED)
    random.seed(SEED)
    np.random.seed(SEED)
    return fn()


def check_component(
    kind: str,
    name: str,
    config: dict[str, Any] | None = None,
    *,
    registry: Registry | None = None,
) -> None:
    """Check one registered component against its kind's contract; raise AssertionError.

    ``config`` defaults to the component's conf/ option (:func:`default_config`); ``registry``
    to the process-wide one (every installed plugin).
    """
    registry = registry or get_registry()
    config = {**(default_config(kind, name) if config is None else config), "name": name}
    component = registry.get(kind, name)
    assert component.description, f"{kind} {name!r}: give it a description (docstring)"
    check_config_errors(registry, kind, config)

    def build() -> Any:
        return registry.build(kind, config, seed=SEED)

    check = CONTRACTS.get(kind)
    if check is not None:
        check(build, registry, f"{kind} {name!r}")


def check_config_errors(registry: Registry, kind: str, config: dict[str, Any]) -> None:
    """Unknown keys name the valid keys; wrong types name the expected type."""
    component = registry.get(kind, config["name"])
    valid = [p.name for p in component.params]
    label = f"{kind} {config['name']!r}"
    with pytest.raises(ConfigError) as err:
        registry.validate(kind, {**config, "no_such_key": 1})
    message = str(err.value)
    assert "no_such_key" in message, f"{label}: the error must name the unknown key: {message}"
    assert f"Valid keys: {', '.join(valid) or '(none)'}" in message, message
    typed = next((p for p in component.params if _scalar(p.annotation)), None)
    if typed is not None:
        with pytest.raises(ConfigError, match=f"key '{typed.name}' must be"):
            registry.validate(kind, {**config, typed.name: {"not": "a scalar"}})


def _scalar(annotation: Any) -> bool:
    """Whether a mapping value is certainly the wrong type for this annotation."""
    if annotation in (int, float, str, bool):
        return True
    if get_origin(annotation) is Literal:
        return True
    args = get_args(annotation)
    return bool(args) and all(a is type(None) or _scalar(a) for a in args)


Check = Callable[[Callable[[], Any], Registry, str], None]
CONTRACTS: dict[str, Check] = {}


def contract(kind: str) -> Callable[[Check], Check]:
    """Declare the contract check of one component kind."""

    def add(check: Check) -> Check:
        CONTRACTS[kind] = check
        return check

    return add


def assert_unit_norm(x: torch.Tensor, label: str, mask: torch.Tensor | None = None) -> None:
    norms = x.float().norm(dim=-1)
    if mask is not None:
        norms = norms[mask]
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-3), (
        f"{label}: outputs must be L2-normalized (norms {norms.min():.4f}..{norms.max():.4f})"
    )


def assert_close(a: torch.Tensor, b: torch.Tensor, label: str, what: str) -> None:
    assert a.shape == b.shape, f"{label}: {what}: shapes {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-4), (
        f"{label}: {what}: max difference {(a.float() - b.float()).abs().max():.3g}"
    )


def _fitted(build: Callable[[], Any], gallery: Any) -> Any:
    component = build()
    if isinstance(component, Fittable):
        component.fit(gallery)
    return component


def _halves(n: int) -> tuple[slice, slice]:
    return slice(0, n // 2), slice(n // 2, n)


def _check_token_method(build: Callable[[], Any], kind: str, label: str) -> None:
    gallery = random_features(n=40, grid=GRID, dim=DIM, seed=1)
    features = random_features(n=N_IMAGES, grid=GRID, dim=DIM, seed=2)
    component = seeded(lambda: _fitted(build, gallery))
    if component is None:
        assert kind in ("aggregator", "selector"), (
            f"{label}: only an aggregator or a selector ('none': no tokens) may build to None"
        )
        return

    def vectors(out: Any) -> torch.Tensor:
        return out if kind == "pooling" else out.vectors

    out = component(features)
    if kind == "pooling":
        assert isinstance(out, torch.Tensor), f"{label}: must return a tensor, got {type(out)}"
        assert out.ndim == 2 and out.shape[0] == N_IMAGES, f"{label}: shape {tuple(out.shape)}"
        assert torch.isfinite(out).all(), f"{label}: non-finite values"
        assert_unit_norm(out, label)
    else:
        assert isinstance(out, Tokens), f"{label}: must return Tokens, got {type(out)}"
        v, mask = out.vectors, out.mask
        assert v.ndim == 3 and v.shape[0] == N_IMAGES and v.shape[1] >= 1, f"{label}: {v.shape}"
        assert torch.isfinite(v).all(), f"{label}: non-finite values"
        if mask is not None:
            assert mask.dtype == torch.bool and mask.shape == v.shape[:2], f"{label}: bad mask"
            assert mask.any(dim=1).all(), f"{label}: every image needs a real token"
        assert_unit_norm(v, label, mask)
        if kind == "selector":
            assert v.shape[2] == DIM, f"{label}: tokens must keep the backbone's dimension"
            patches = torch.nn.functional.normalize(features.tokens, dim=-1)
            best = torch.einsum("nkd,ntd->nkt", v.float(), patches).amax(dim=-1)
            real = best if mask is None else best[mask]
            assert (real > 1 - 1e-4).all(), f"{label}: must select the image's own patch tokens"
    first, second = _halves(N_IMAGES)
    parts = torch.cat([vectors(component(features[first])), vectors(component(features[second]))])
    assert_close(parts, vectors(out), label, "a batch must equal its halves")
    again = seeded(lambda: _fitted(build, gallery))(features)
    assert_close(vectors(again), vectors(out), label, "two seeded builds must agree")


@contract("pooling")
def check_pooling(build: Callable[[], Any], registry: Registry, label: str) -> None:
    _check_token_method(build, "pooling", label)


@contract("selector")
def check_selector(build: Callable[[], Any], registry: Registry, label: str) -> None:
    _check_token_method(build, "selector", label)


@contract("aggregator")
def check_aggregator(build: Callable[[], Any], registry: Registry, label: str) -> None:
    _check_token_method(build, "aggregator", label)


@contract("matcher")
def check_matcher(build: Callable[[], Any], registry: Registry, label: str) -> None:
    matcher = seeded(build)
    queries = with_padding(random_tokens(5, 4, DIM, seed=1), seed=2)
    gallery = with_padding(random_tokens(7, 5, DIM, seed=3), seed=4)
    scores = matcher.score(queries, gallery)
    assert scores.shape == (5, 7), f"{label}: score shape {tuple(scores.shape)} != (5, 7)"
    assert torch.isfinite(scores).all(), f"{label}: non-finite scores"
    candidates = torch.tensor([[6, 0], [1, 2], [3, 3], [5, 4], [0, 6]])
    assert_close(
        matcher.rerank(queries, gallery, candidates),
        scores.gather(1, candidates),
        label,
        "rerank must equal score at the candidates",
    )
    noise = random_tokens(7, 5, DIM, seed=9).vectors
    scrambled = torch.where(gallery.mask[..., None], gallery.vectors, noise)
    assert_close(
        matcher.score(queries, Tokens(scrambled, gallery.mask)),
        scores,
        label,
        "padding tokens (mask False) must not change scores",
    )
    first, second = _halves(5)
    parts = torch.cat(
        [matcher.score(queries[first], gallery), matcher.score(queries[second], gallery)]
    )
    assert_close(parts, scores, label, "scores for a batch of queries must equal its halves")
    assert_close(seeded(build).score(queries, gallery), scores, label, "two builds must agree")


@contract("quantizer")
def check_quantizer(build: Callable[[], Any], registry: Registry, label: str) -> None:
    tokens = random_tokens(64, 8, 384, seed=3)  # 512 tokens: enough for PQ's 256 centroids

    def fitted() -> Any:
        quantizer = build()
        quantizer.fit(tokens)
        return quantizer

    quantizer = seeded(fitted)
    store = quantizer.encode(tokens)
    assert len(store) == 64, f"{label}: the store holds {len(store)} of 64 images"
    assert store.bytes_per_image() * 64 == pytest.approx(store.nbytes), (
        f"{label}: bytes_per_image() x N must equal nbytes"
    )
    decoded = store.decode().vectors
    assert decoded.shape == tokens.vectors.shape, f"{label}: decode shape {tuple(decoded.shape)}"
    cosine = torch.nn.functional.cosine_similarity(decoded.float(), tokens.vectors, dim=-1)
    assert cosine.mean() > 0.3, f"{label}: decoded tokens far from the originals ({cosine.mean()})"
    first, second = _halves(64)
    parts = torch.cat(
        [
            quantizer.encode(tokens[first]).decode().vectors,
            quantizer.encode(tokens[second]).decode().vectors,
        ]
    )
    assert_close(parts, decoded, label, "encoding a batch must equal encoding its halves")
    assert_close(seeded(fitted).encode(tokens).decode().vectors, decoded, label, "two seeded fits")


def check_ranking(ranking: Ranking, inputs: RetrievalInputs, label: str) -> None:
    """A stage's output: (Nq, depth) distinct in-range indices with scores best first."""
    nq, ng = len(inputs.query_vectors), len(inputs.gallery_vectors)
    depth = min(inputs.depth, ng)
    assert isinstance(ranking, Ranking), f"{label}: search must return a Ranking"
    assert ranking.indices.shape == (nq, depth), f"{label}: indices {tuple(ranking.indices.shape)}"
    assert ranking.scores.shape == (nq, depth), f"{label}: scores {tuple(ranking.scores.shape)}"
    assert not ranking.indices.is_floating_point(), f"{label}: indices must be integers"
    assert ((ranking.indices >= 0) & (ranking.indices < ng)).all(), f"{label}: index out of range"
    for row in ranking.indices.tolist():
        assert len(set(row)) == len(row), f"{label}: a gallery image appears twice in {row}"
    s = ranking.scores
    assert (s[:, :-1] >= s[:, 1:] - 1e-6).all(), f"{label}: scores must be sorted best first"
    if ranking.shortlist is not None:
        assert ranking.shortlist.shape[0] == nq, f"{label}: one shortlist per query"


@contract("stage")
def check_stage(build: Callable[[], Any], registry: Registry, label: str) -> None:
    inputs = retrieval_inputs(registry)
    stage = seeded(build)
    ranking = stage.search(inputs)
    check_ranking(ranking, inputs, label)
    first, second = _halves(len(inputs.query_vectors))
    parts = [stage.search(query_slice(inputs, part)) for part in (first, second)]
    indices = torch.cat([p.indices for p in parts])
    assert torch.equal(indices, ranking.indices), f"{label}: a batch must rank like its halves"
    assert_close(torch.cat([p.scores for p in parts]), ranking.scores, label, "scores of halves")
    again = seeded(build).search(inputs)
    assert torch.equal(again.indices, ranking.indices), f"{label}: two builds must agree"


@contract("loss")
def check_loss(build: Callable[[], Any], registry: Registry, label: str) -> None:
    embeddings = torch.nn.functional.normalize(torch.randn(8, 16, generator=_gen(1)), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])

    def value() -> torch.Tensor:
        x = embeddings.clone().requires_grad_()
        out = build()(x, labels)
        out.backward()
        assert x.grad is not None and torch.isfinite(x.grad).all(), f"{label}: no gradient"
        return out.detach()

    out = seeded(value)
    assert out.ndim == 0 and torch.isfinite(out), f"{label}: must return a finite scalar"
    assert_close(seeded(value), out, label, "two seeded builds must agree")


@contract("backbone")
def check_backbone(build: Callable[[], Any], registry: Registry, label: str) -> None:
    from PIL import Image

    backbone = seeded(build)
    images = torch.stack(
        [backbone.transform(Image.new("RGB", (64, 48), c)) for c in ("red", "blue", "gray")]
    )
    features = backbone.encode(images)
    rows, cols = features.grid
    assert features.tokens.shape == (3, rows * cols, backbone.dim), f"{label}: tokens shape"
    assert features.cls.shape == (3, backbone.dim), f"{label}: cls shape"
    if backbone.has_attention:
        assert features.attn is not None and features.attn.shape == (3, rows * cols)
        assert_close(features.attn.sum(-1), torch.ones(3), label, "attention rows must sum to 1")
    else:
        assert features.attn is None, f"{label}: has_attention is False but attn is set"
    assert isinstance(backbone.weights_status, str) and backbone.weights_status
    assert backbone.identity(), f"{label}: identity() must describe the weights and transform"
    parts = [backbone.encode(images[:1]), backbone.encode(images[1:])]
    assert_close(torch.cat([p.tokens for p in parts]), features.tokens, label, "batch vs halves")
    again = seeded(build).encode(images)
    assert_close(again.tokens, features.tokens, label, "two seeded builds must agree")


@contract("dataset")
def check_dataset(build: Callable[[], Any], registry: Registry, label: str) -> None:
    dataset = build()
    gallery, queries = dataset.records("gallery"), dataset.records("query")
    assert gallery and queries, f"{label}: needs gallery and query records"
    assert len({r.image_id for r in gallery}) == len(gallery), f"{label}: duplicate image ids"
    gallery_ids = {r.crater_id for r in gallery}
    assert all(q.relevant_ids & gallery_ids for q in queries), (
        f"{label}: every query needs a relevant gallery image"
    )
    image = dataset.load_image(queries[0])
    assert image.mode == "RGB" and min(image.size) > 0, f"{label}: images must be RGB"
    identity = dataset.identity()
    assert isinstance(identity, str) and identity, f"{label}: identity() must be a string"
    again = build()
    assert again.identity() == identity, f"{label}: identity must not change between builds"
    assert list(again.records("query")) == list(queries), f"{label}: records must be stable"
    assert again.load_image(queries[0]).tobytes() == image.tobytes(), f"{label}: images differ"


@contract("tracking")
def check_tracking(build: Callable[[], Any], registry: Registry, label: str) -> None:
    """A tracker's whole life, in a scratch working directory (default stores land there)."""
    import contextlib
    import math
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        tracker = build()
        tracker.start({"craterlab.contract": "yes"}, run_name="contract", parent=None)
        tracker.log_params({"group": {"key": 1}, "k": 8})
        tracker.log_metrics({"single/mAP": 0.5, "nan": math.nan}, step=0)
        artifact = Path(tmp, "artifact.txt")
        artifact.write_text("contract")
        tracker.log_artifact(artifact)
        tracker.set_tags({"craterlab.more": "tags"})
        tracker.finish("FINISHED")
        assert isinstance(tracker.not_logged, list), f"{label}: not_logged must be a list"
        assert isinstance(tracker.summary(), str), f"{label}: summary() must return a line"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def craterlab_registry() -> Registry:
    """The process-wide registry: craterlab's components and every installed plugin's."""
    return get_registry()


@pytest.fixture(scope="session")
def tiny_dataset() -> Any:
    """A synthetic crater set of 6 identities and 2 query craters at 64 px (renders lazily)."""
    config = {
        "name": "synthetic",
        "size": "tiny",
        "n_identities": 6,
        "n_query_craters": 2,
        "image_size": 64,
    }
    return get_registry().build("dataset", config, seed=SEED)


@pytest.fixture
def composed_config(tmp_path: Path) -> DictConfig:
    """``conf/config.yaml`` composed for a seconds-long offline run into ``tmp_path``."""
    return compose_config(*TINY_OVERRIDES, f"output_dir={tmp_path / 'run'}")


@pytest.fixture
def tiny_features() -> Features:
    return random_features(n=N_IMAGES, grid=GRID, dim=DIM, seed=2)


@pytest.fixture
def tiny_tokens() -> Tokens:
    return random_tokens(N_IMAGES, 4, DIM, seed=3)


__all__ = [
    "CONTRACTS",
    "SEED",
    "TINY_OVERRIDES",
    "builtin_registry",
    "check_component",
    "check_config_errors",
    "check_ranking",
    "component_configs",
    "compose_config",
    "configs_by_component",
    "contract",
    "default_config",
    "random_features",
    "random_tokens",
    "retrieval_inputs",
    "with_padding",
]
