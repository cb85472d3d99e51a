"""Every config composes and validates; every registered component passes its contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from craterlab.plugins import get_registry
from craterlab.registry import GROUP_KINDS, KINDS
from craterlab.testing import random_features, random_tokens
from craterlab.types import Fittable, RetrievalInputs, Tokens

CONF = Path(__file__).resolve().parent.parent / "conf"
# Config groups whose options build one registry component each (the group name is its kind).
COMPONENT_GROUPS = set(GROUP_KINDS)
GROUPS = sorted(COMPONENT_GROUPS) + ["retrieval", "train", "tracking", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


def component_configs(cfg) -> list[tuple[str, dict]]:
    """(kind, component config) pairs a composed config will build."""
    plain = {
        g: OmegaConf.to_container(cfg[g], resolve=True)
        for g in (*COMPONENT_GROUPS, "retrieval", "train")
    }
    pairs = [(group, plain[group]) for group in COMPONENT_GROUPS]
    pairs += [("stage", stage) for stage in plain["retrieval"]["stages"].values()]
    if plain["train"]["name"] != "none":
        pairs.append(("loss", plain["train"]["loss"]))
    return pairs


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no options"


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, o) for g in GROUPS for o in options(g)],
)
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    cfg = compose_config(f"{group}={option}")
    registry = get_registry()
    for kind, config in component_configs(cfg):
        registry.validate(kind, config)  # raises on unknown names, keys or wrong types


def test_k_is_one_knob_interpolated_everywhere() -> None:
    cfg = compose_config("k=48", "selector=attention", "aggregator=instance")
    assert cfg.selector.k == 48 and cfg.aggregator.k == 48


def test_group_files_carry_a_registry_name() -> None:
    registry = get_registry()
    for group in COMPONENT_GROUPS:
        for option in options(group):
            name = OmegaConf.load(CONF / group / f"{option}.yaml").get("name")
            assert name in registry.names(group), f"conf/{group}/{option}.yaml: name {name!r}"


# ------------------------------------------------------------------ contracts, per component


def configs_by_component() -> dict[tuple[str, str], dict]:
    """One composed config per registered component, from the conf/ file that selects it."""
    found: dict[tuple[str, str], dict] = {}
    for group in GROUPS:
        if group == "experiment":
            continue
        for option in options(group):
            cfg = compose_config(f"{group}={option}", "k=4", "shortlist=3")
            for kind, config in component_configs(cfg):
                found.setdefault((kind, config["name"]), config)
    return found


CONFIGS = configs_by_component()
COMPONENTS = sorted((c.kind, c.name) for c in get_registry())


@pytest.mark.parametrize(("kind", "name"), COMPONENTS)
def test_every_component_ships_a_config(kind: str, name: str) -> None:
    assert (kind, name) in CONFIGS, f"{kind} {name!r} has no config under conf/"


def unit_norm(x: torch.Tensor) -> bool:
    return torch.allclose(x.norm(dim=-1), torch.ones(x.shape[:-1]), atol=1e-4)


@pytest.mark.parametrize(
    ("kind", "name"), [c for c in COMPONENTS if c[0] in ("pooling", "selector", "aggregator")]
)
def test_token_method_contract(kind: str, name: str) -> None:
    component = get_registry().build(kind, CONFIGS[(kind, name)], seed=0)
    if component is None:  # aggregator 'none': the run uses the selector's tokens
        assert (kind, name) == ("aggregator", "none")
        return
    gallery = random_features(n=40, grid=(4, 4), dim=8, seed=1)
    features = random_features(n=3, grid=(4, 4), dim=8, seed=2)
    if isinstance(component, Fittable):
        component.fit(gallery)
    out = component(features)
    if kind == "pooling":
        assert out.shape[0] == 3 and unit_norm(out)
    else:
        assert isinstance(out, Tokens) and out.vectors.shape[0] == 3
        assert out.vectors.shape[2] == 8 and out.vectors.shape[1] >= 1
        assert unit_norm(out.vectors)
        one_by_one = torch.cat([component(features[i : i + 1]).vectors for i in range(3)])
        torch.testing.assert_close(one_by_one, out.vectors, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", [n for k, n in COMPONENTS if k == "matcher"])
def test_matcher_contract(name: str) -> None:
    matcher = get_registry().build("matcher", CONFIGS[("matcher", name)])
    q, g = random_tokens(3, 2, 8, seed=1), random_tokens(5, 2, 8, seed=2)
    scores = matcher.score(q, g)
    assert scores.shape == (3, 5)
    candidates = torch.tensor([[4, 0], [1, 2], [3, 3]])
    torch.testing.assert_close(matcher.rerank(q, g, candidates), scores.gather(1, candidates))


@pytest.mark.parametrize("name", [n for k, n in COMPONENTS if k == "quantizer"])
def test_quantizer_contract(name: str) -> None:
    quantizer = get_registry().build("quantizer", CONFIGS[("quantizer", name)], seed=0)
    tokens = random_tokens(64, 8, 384, seed=3)
    quantizer.fit(tokens)
    store = quantizer.encode(tokens)
    assert len(store) == 64
    assert store.bytes_per_image() * 64 == pytest.approx(store.nbytes)
    decoded = store.decode().vectors
    assert decoded.shape == tokens.vectors.shape
    cosine = torch.nn.functional.cosine_similarity(decoded.float(), tokens.vectors, dim=-1)
    assert cosine.mean() > 0.3  # PQ on random data is coarse; scalar formats are near 1


@pytest.mark.parametrize("name", [n for k, n in COMPONENTS if k == "stage"])
def test_stage_contract(name: str) -> None:
    registry = get_registry()
    stage = registry.build("stage", CONFIGS[("stage", name)])
    matcher = registry.build("matcher", {"name": "late_interaction"})
    store_q = registry.build("quantizer", {"name": "fp32"})
    g_tokens, q_tokens = random_tokens(20, 3, 8, seed=4), random_tokens(4, 3, 8, seed=5)
    store_q.fit(g_tokens)
    inputs = RetrievalInputs(
        query_vectors=torch.nn.functional.normalize(q_tokens.vectors.mean(1), dim=-1),
        gallery_vectors=torch.nn.functional.normalize(g_tokens.vectors.mean(1), dim=-1),
        query_tokens=q_tokens,
        gallery_store=store_q.encode(g_tokens),
        matcher=matcher,
        depth=10,
    )
    ranking = stage.search(inputs)
    assert ranking.indices.shape == (4, 10)
    assert (ranking.scores[:, :-1] >= ranking.scores[:, 1:] - 1e-6).all()
    for row in ranking.indices:
        assert len(set(row.tolist())) == 10  # no gallery image twice


@pytest.mark.parametrize("name", [n for k, n in COMPONENTS if k == "loss"])
def test_loss_contract(name: str) -> None:
    loss = get_registry().build("loss", CONFIGS[("loss", name)])
    embeddings = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    value = loss(embeddings, labels)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert embeddings.grad is not None


def test_kinds_covered() -> None:
    kinds = {k for k, _ in COMPONENTS}
    assert kinds == set(KINDS)


@pytest.mark.parametrize("name", [n for k, n in COMPONENTS if k == "backbone"])
def test_backbone_contract(name: str) -> None:
    """Each registered backbone factory, built from its config with random weights and, for
    the generic timm factories, timm's tiny test models (every study config's shapes are
    checked in test_backbones.py)."""
    from PIL import Image

    config = dict(CONFIGS[("backbone", name)], weights="random")
    tiny = {"timm_vit": "test_vit", "timm_cnn": "test_resnet"}
    if name in tiny:
        config.update(model=tiny[name], pretrained_tag="r160_in1k")
    if name == "marsdino":
        config["size"] = "s"
    backbone = get_registry().build("backbone", config, seed=0)
    images = torch.stack(
        [backbone.transform(Image.new("RGB", (64, 48), c)) for c in ("red", "blue")]
    )
    features = backbone.encode(images)
    rows, cols = features.grid
    assert features.tokens.shape == (2, rows * cols, backbone.dim)
    assert features.cls.shape == (2, backbone.dim)
    if backbone.has_attention:
        torch.testing.assert_close(features.attn.sum(-1), torch.ones(2))
    else:
        assert features.attn is None
    assert backbone.weights_status.startswith("random")
    assert backbone.identity()


@pytest.mark.parametrize("name", [n for k, n in COMPONENTS if k == "dataset"])
def test_dataset_contract(name: str, tmp_path) -> None:
    registry = get_registry()
    tiny = {
        "name": "synthetic",
        "size": "tiny",
        "n_identities": 6,
        "n_query_craters": 2,
        "image_size": 64,
    }
    if name == "synthetic":
        config = tiny
    elif name == "manifest":
        config = {"name": "manifest", "path": str(CONF.parent / "examples/manifest/manifest.csv")}
    else:  # a release in the CraterBench-R layout, written by the exporter
        from craterlab.data.export import export_dataset

        export_dataset(registry.build("dataset", tiny), tmp_path / "release", progress=False)
        config = {"name": name, "root": str(tmp_path / "release"), "download": False}
    dataset = registry.build("dataset", config)
    gallery, queries = dataset.records("gallery"), dataset.records("query")
    assert gallery and queries
    assert len({r.image_id for r in gallery}) == len(gallery)
    gallery_ids = {r.crater_id for r in gallery}
    assert all(q.relevant_ids & gallery_ids for q in queries)
    image = dataset.load_image(queries[0])
    assert image.mode == "RGB" and min(image.size) > 0
    assert isinstance(dataset.identity(), str) and dataset.identity()
