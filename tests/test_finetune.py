"""Fine-tuning loop: loss goes down, checkpoint reloads, resume is exact, bad input is clear.

Uses a tiny timm ViT (32 px, 8 px patches, depth 2, dim 32) wrapped in a Backbone test double
and a tiny in-memory dataset, so every test runs in about a second on one CPU core.
"""

from __future__ import annotations

import functools
import math
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw
from torchvision.transforms import v2

from craterlab import train
from craterlab.backbones.lineage import read_lineage
from craterlab.errors import ConfigError, DataError
from craterlab.metrics import evaluate, rank_scores
from craterlab.registry import Registry
from craterlab.tokens.pooling import ClsPooling, GeMPooling
from craterlab.train.augment import make_views
from craterlab.train.config import validate_train_config
from craterlab.train.finetune import (
    best_checkpoint,
    embed,
    finetune,
    finetune_dir,
    lr_factor,
    split_validation,
    training_neck,
)
from craterlab.train.sampling import pk_batches
from craterlab.types import Features, ImageRecord

CONF = Path(__file__).resolve().parents[1] / "conf" / "train"


class TinyBackbone:
    """A Backbone test double around a tiny, randomly initialized timm ViT."""

    dim = 32
    has_attention = False
    weights_status = "random (requested)"

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = make_model()
        self.model.eval().requires_grad_(False)  # frozen, as a real backbone is
        self.seed = seed
        self.batch_sizes: list[int] = []
        self._transform = v2.Compose(
            [
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Resize((32, 32), antialias=True),
                v2.Normalize([0.5] * 3, [0.5] * 3),
            ]
        )

    def transform(self, image: Image.Image) -> torch.Tensor:
        return self._transform(image)

    def forward_features(self, images: torch.Tensor) -> Features:
        self.batch_sizes.append(images.shape[0])
        out = self.model.forward_features(images)
        return Features(cls=out[:, 0], tokens=out[:, 1:], attn=None, grid=(4, 4))

    def encode(self, images: torch.Tensor) -> Features:
        with torch.no_grad():
            return self.forward_features(images)

    def to(self, device: torch.device | str) -> TinyBackbone:
        self.model.to(device)
        return self

    def identity(self) -> dict[str, object]:
        return {"model": "tiny-vit", "seed": self.seed}


def make_model() -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        num_classes=0,
    )


class TinyDataset:
    """Identities as discs of distinct colour and position; images differ by noise and size."""

    name = "tiny"

    def __init__(self, n_ids: int = 4, per_id: int = 3, train: bool = True) -> None:
        self._train = [
            ImageRecord(image_id=f"{c}-{j}", crater_id=10 + c)
            for c in range(n_ids)
            for j in range(per_id)
        ]
        if not train:
            self._train = []

    def records(self, split: str) -> list[ImageRecord]:
        return self._train if split == "train" else []

    def load_image(self, record: ImageRecord) -> Image.Image:
        c, j = (int(x) for x in record.image_id.split("-"))
        g = torch.Generator().manual_seed(100 * c + j)
        noise = (torch.rand(32, 32, 3, generator=g) * 40).to(torch.uint8).numpy()
        image = Image.fromarray(noise, "RGB")
        colour = [(255, 40, 40), (40, 255, 40), (40, 40, 255), (255, 255, 40)][c % 4]
        x, y, r = 8 + 6 * (c % 3), 8 + 5 * (c // 3), 6 + j
        ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=colour)
        return image

    def identity(self) -> str:
        return f"tiny-{len(self._train)}"


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    train.register_losses(register=partial(reg.register, "loss"))
    return reg


def config(**overrides: object) -> dict[str, object]:
    """An easy problem: each batch holds all 4 identities x 3 images, no augmentation."""
    base: dict[str, object] = {
        "name": "supcon",
        "loss": {"name": "supcon", "temperature": 0.1},
        "epochs": 4,
        "lr": 1e-3,
        "head_lr": 5e-2,
        "batch_size": 12,
        "classes_per_batch": 4,
        "steps_per_epoch": 2,
        "augment": "none",
        "embedding": "cls",
        "schedule": "constant",  # extending a run is then exact (a cosine spans epochs)
        "warmup": 0.0,
        "progress": False,
    }
    base.update(overrides)
    return base


def run(cfg, tmp_path, registry, backbone=None, dataset=None, **kwargs):
    return finetune(
        cfg,
        backbone or TinyBackbone(),
        dataset or TinyDataset(),
        device="cpu",
        seed=0,
        out_dir=tmp_path,
        registry=registry,
        **kwargs,
    )


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "loss",
    [
        {"name": "supcon", "temperature": 0.1},
        {"name": "arcface", "scale": 8.0, "margin": 0.3},
        {"name": "triplet", "margin": 0.2},
    ],
)
def test_training_reduces_the_loss_on_an_easy_problem(loss, tmp_path, registry):
    seen: list[tuple[int, dict[str, float]]] = []
    cfg = config(loss=loss, epochs=6)
    run(cfg, tmp_path, registry, on_epoch_end=lambda e, m: seen.append((e, m)))
    assert [e for e, _ in seen] == [1, 2, 3, 4, 5, 6]
    losses = [m["loss"] for _, m in seen]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0]
    assert seen[0][1]["steps"] == 2.0


def test_checkpoint_is_a_state_dict_that_reloads_into_the_same_architecture(tmp_path, registry):
    backbone = TinyBackbone()
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    path = run(config(epochs=1), tmp_path, registry, backbone=backbone)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert list(state) == list(before)
    fresh = make_model()
    fresh.load_state_dict(state, strict=True)
    trained = backbone.model.state_dict()
    assert all(torch.equal(fresh.state_dict()[k], trained[k]) for k in state)
    assert not torch.equal(state["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    # The backbone comes back frozen and in eval mode.
    assert not backbone.model.training
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_resume_continues_from_the_saved_epoch_and_matches_an_uninterrupted_run(tmp_path, registry):
    # arcface + single_crop: the resumed run must restore the model, optimizer, class weights
    # and augmentation randomness to reproduce the uninterrupted run bit for bit.
    cfg = config(loss={"name": "arcface", "scale": 16.0, "margin": 0.3}, augment="single_crop")
    full = run({**cfg, "epochs": 3}, tmp_path / "full", registry)

    epochs: list[int] = []
    run(
        {**cfg, "epochs": 1},
        tmp_path / "split",
        registry,
        on_epoch_end=lambda e, m: epochs.append(e),
    )
    resumed = run(
        {**cfg, "epochs": 3},
        tmp_path / "split",
        registry,
        backbone=TinyBackbone(seed=0),
        on_epoch_end=lambda e, m: epochs.append(e),
    )
    assert epochs == [1, 2, 3]
    a = torch.load(full, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    # Started again once finished: no epoch is redone, the same checkpoint comes back.
    backbone = TinyBackbone()
    again = run(
        {**cfg, "epochs": 3},
        tmp_path / "split",
        registry,
        backbone=backbone,
        on_epoch_end=lambda e, m: epochs.append(e),
    )
    assert again == resumed and epochs == [1, 2, 3] and backbone.batch_sizes == []


def test_an_interrupted_run_resumes_after_its_last_finished_epoch(tmp_path, registry):
    def crash_after_second(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(config(epochs=3), tmp_path, registry, on_epoch_end=crash_after_second)
    backbone = TinyBackbone()
    epochs: list[int] = []
    run(
        config(epochs=3),
        tmp_path,
        registry,
        backbone=backbone,
        on_epoch_end=lambda e, m: epochs.append(e),
    )
    assert epochs == [3]
    assert len(backbone.batch_sizes) == 2  # one epoch of 2 steps


def test_multi_crop_and_gem_feed_every_view_through_the_backbone(tmp_path, registry):
    cfg = config(
        epochs=1,
        steps_per_epoch=1,
        augment="multi_crop",
        global_crops=2,
        local_crops=3,
        embedding="gem",
    )
    backbone = TinyBackbone()
    run(cfg, tmp_path, registry, backbone=backbone)
    assert backbone.batch_sizes == [12 * 5]


def test_views_per_augmentation_mode():
    image = TinyDataset().load_image(ImageRecord("1-0", 11))
    for mode, count in [("none", 1), ("single_crop", 1), ("multi_crop", 2 + 3)]:
        cfg = validate_train_config({"augment": mode, "local_crops": 3})
        views = make_views(cfg)(image)
        assert len(views) == count
        assert all(v.size == image.size for v in views)
    torch.manual_seed(0)
    crop = make_views(validate_train_config({"augment": "single_crop"}))(image)[0]
    assert list(crop.getdata()) != list(image.getdata())


def test_gem_embedding_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 5, 3, generator=g)
    feats = Features(cls=torch.zeros(2, 3), tokens=tokens, attn=None, grid=(1, 5))
    got = embed(feats, "gem", 3.0)
    for i in range(2):
        vec = [
            (sum(max(tokens[i, t, d].item(), 1e-6) ** 3 for t in range(5)) / 5) ** (1 / 3)
            for d in range(3)
        ]
        norm = math.sqrt(sum(v * v for v in vec))
        assert got[i].tolist() == pytest.approx([v / norm for v in vec], rel=1e-5)


def test_pk_batches_hold_p_classes_of_k_images_and_are_deterministic():
    labels = [c for c in range(5) for _ in range(4)]
    batches = pk_batches(labels, classes_per_batch=2, images_per_class=2, num_batches=10, seed=3)
    assert batches == pk_batches(labels, 2, 2, 10, seed=3)
    for b in batches:
        classes = [labels[i] for i in b]
        assert len(b) == 4 and len(set(classes)) == 2
        assert all(classes.count(c) == 2 for c in set(classes))
        assert len(set(b)) == 4  # distinct images while a class has enough
    counts = [sum(i in b for b in batches) for i in range(len(labels))]
    assert set(counts) == {2}  # 10 batches x 4 = 40 draws = every image twice


# --------------------------------------------------------------------------- configs and errors


def test_conf_train_files_validate(registry):
    files = sorted(CONF.glob("*.yaml"))
    assert {f.stem for f in files} >= {"none", "supcon", "arcface", "triplet"}
    for f in files:
        cfg = validate_train_config(OmegaConf.load(f), registry)
        assert cfg.enabled == (f.stem != "none")
        if cfg.enabled:
            assert cfg.loss["name"] == f.stem
            assert (cfg.lr, cfg.epochs) == (1e-5, 30)


def test_config_mistakes_name_the_fix(registry):
    with pytest.raises(ConfigError, match=r"'lrr'.*Did you mean 'lr'.*Valid keys: name, loss"):
        validate_train_config(config(lrr=1.0), registry)
    with pytest.raises(ConfigError, match="'epochs' must be int"):
        validate_train_config(config(epochs="ten"), registry)
    with pytest.raises(ConfigError, match="'augment' must be one of 'none'"):
        validate_train_config(config(augment="two_crop"), registry)
    with pytest.raises(ConfigError, match="at least 2 x classes_per_batch"):
        validate_train_config(config(batch_size=6), registry)
    with pytest.raises(ConfigError, match="no config key 'temp'"):
        validate_train_config(config(loss={"name": "supcon", "temp": 0.1}), registry)
    with pytest.raises(ConfigError, match="'loss' is missing"):
        validate_train_config({"name": "supcon"}, registry)


def test_finetune_refuses_bad_inputs(tmp_path, registry):
    with pytest.raises(ConfigError, match="frozen backbone"):
        run({"name": "none"}, tmp_path, registry)
    with pytest.raises(DataError, match="no training split"):
        run(config(), tmp_path, registry, dataset=TinyDataset(train=False))
    with pytest.raises(DataError, match="at least 2"):
        run(config(), tmp_path, registry, dataset=TinyDataset(n_ids=1))


def test_an_out_dir_of_another_run_is_not_silently_reused(tmp_path, registry):
    run(config(epochs=2), tmp_path, registry)
    with pytest.raises(ConfigError, match="different config"):
        run(config(epochs=2, lr=5e-4), tmp_path, registry)
    with pytest.raises(ConfigError, match="already trained for 2 epochs"):
        run(config(epochs=1), tmp_path, registry)


def test_finetune_dir_is_stable_per_run_and_ignores_epochs(tmp_path, registry):
    def key(**kw):
        return finetune_dir(tmp_path, config(**kw), TinyBackbone(), TinyDataset(), 0, registry)

    assert key() == key() == key(epochs=30)
    assert key(lr=1e-4) != key() and key(neck="bn") != key() == key(neck="none")
    assert (
        finetune_dir(tmp_path, config(), TinyBackbone(), TinyDataset(n_ids=3), 0, registry) != key()
    )
    assert key().parent == tmp_path


# --------------------------------------------------------------------------- recipe and feedback


def test_two_seeded_cpu_runs_give_identical_weights(tmp_path, registry):
    # The full recipe: warmup + cosine, gradient clipping, augmentation, held-out validation.
    cfg = config(
        epochs=2,
        schedule="cosine",
        warmup=0.25,
        grad_clip=0.5,
        augment="single_crop",
        val_fraction=0.5,
    )
    a = torch.load(run(cfg, tmp_path / "a", registry), weights_only=True)
    b = torch.load(run(cfg, tmp_path / "b", registry), weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = torch.load(
        finetune(
            cfg,
            TinyBackbone(),
            TinyDataset(),
            device="cpu",
            seed=1,
            out_dir=tmp_path / "c",
            registry=registry,
        ),
        weights_only=True,
    )
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_an_interrupted_cosine_run_resumes_to_the_uninterrupted_weights(tmp_path, registry):
    cfg = config(epochs=3, schedule="cosine", warmup=0.2, augment="single_crop")
    full = torch.load(run(cfg, tmp_path / "full", registry), weights_only=True)

    def crash(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "split", registry, on_epoch_end=crash)
    resumed = torch.load(run(cfg, tmp_path / "split", registry), weights_only=True)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_lr_warms_up_linearly_then_follows_a_cosine_to_zero():
    total, warmup = 100, 10
    factors = [lr_factor(s, total, warmup, "cosine") for s in range(total)]
    assert factors[:3] == pytest.approx([1 / 11, 2 / 11, 3 / 11])
    assert factors[warmup] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(b <= a for a, b in zip(factors[warmup:], factors[warmup + 1 :], strict=False))
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_factor(50, total, 0, "constant") == 1.0


def test_every_step_reports_loss_and_scheduled_lr_and_clipped_gradients(tmp_path, registry):
    steps: list[tuple[int, dict[str, float]]] = []
    cfg = config(epochs=2, schedule="cosine", warmup=0.25, grad_clip=1e-3)
    run(cfg, tmp_path, registry, on_step=lambda s, m: steps.append((s, m)))
    assert [s for s, _ in steps] == [1, 2, 3, 4]
    total, warm = 4, 1
    for s, m in steps:
        assert m["lr"] == pytest.approx(1e-3 * lr_factor(s - 1, total, warm, "cosine"))
        assert math.isfinite(m["loss"]) and m["grad_norm"] > 0


def test_validation_scores_held_out_identities_with_the_frozen_evaluation(tmp_path, registry):
    dataset = TinyDataset(n_ids=6, per_id=3)
    records = dataset.records("train")
    train_idx, split = split_validation(records, 0.5, seed=0)
    assert split is not None and len(split.identities) == 3
    held = set(split.identities)
    assert {records[i].crater_id for i in train_idx}.isdisjoint(held)
    assert {records[i].crater_id for i in split.images} == held
    assert len(split.queries) == 3 and len(split.gallery) == 6

    seen: list[tuple[int, dict[str, float]]] = []
    backbone = TinyBackbone()
    cfg = config(epochs=2, val_fraction=0.5, val_every=1, batch_size=6, classes_per_batch=3)
    path = run(
        cfg,
        tmp_path,
        registry,
        backbone=backbone,
        dataset=dataset,
        on_validation=lambda s, m: seen.append((s, m)),
    )
    assert [s for s, _ in seen] == [0, 1, 2, 3, 4]
    assert all(0 <= m["val_mAP"] <= 1 for _, m in seen)
    # The reported mAP is craterlab.metrics.evaluate on cosine rankings of the held-out slice.
    model_state = torch.load(path, weights_only=True)
    backbone.model.load_state_dict(model_state)
    x = torch.stack([backbone.transform(dataset.load_image(records[i])) for i in split.images])
    v = torch.nn.functional.normalize(backbone.encode(x).cls, dim=-1)
    q, g = v[: len(split.queries)], v[len(split.queries) :]
    expected = evaluate(
        rank_scores(q @ g.T),
        [records[i].crater_id for i in split.gallery],
        [{records[i].crater_id} for i in split.queries],
    ).metrics["mAP"]
    assert seen[-1][1]["val_mAP"] == pytest.approx(expected, abs=1e-6)
    best = best_checkpoint(path)
    best_step = max(seen[1:], key=lambda sm: sm[1]["val_mAP"])
    assert best is not None
    assert read_lineage(best)[-1]["val_mAP"] == pytest.approx(best_step[1]["val_mAP"])


def test_the_readme_example_config_is_valid(registry):
    # README: train=supcon train.augment=single_crop train.batch_size=16 train.epochs=1
    base = OmegaConf.load(CONF / "supcon.yaml")
    cfg = validate_train_config(
        OmegaConf.merge(base, {"augment": "single_crop", "batch_size": 16, "epochs": 1}), registry
    )
    assert (cfg.classes, cfg.images_per_class) == (4, 4)
    assert validate_train_config(OmegaConf.load(CONF / "supcon.yaml"), registry).classes == 16


def test_finetune_uses_the_pooling_modules_gem():
    g = torch.Generator().manual_seed(1)
    feats = Features(
        cls=torch.zeros(3, 4), tokens=torch.randn(3, 6, 4, generator=g), attn=None, grid=(2, 3)
    )
    assert torch.equal(embed(feats, "gem", 2.5), GeMPooling(p=2.5)(feats))
    assert torch.equal(embed(feats, "cls"), ClsPooling()(feats))


def test_the_bn_neck_makes_collapse_useless_to_the_loss():
    """Batch-hard triplet and ArcFace from random weights lower their loss by pulling every
    embedding towards one shared vector. Behind the BN neck the loss no longer sees that
    shrinkage: embeddings c + eps * x score like x for any shared c and eps (>> BN eps)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g)
    labels = torch.arange(4).repeat_interleave(4)
    neck = training_neck("bn", 8)
    spread = neck(x)
    assert torch.allclose(spread.mean(0), torch.zeros(8), atol=1e-6)
    assert torch.allclose(spread.var(0, unbiased=False), torch.ones(8), atol=1e-3)
    shared = torch.randn(8, generator=g) * 10
    loss = train.losses.BatchHardTripletLoss(margin=0.2)
    collapsing = loss(neck(shared + 0.05 * x), labels)
    assert collapsing == pytest.approx(loss(neck(x), labels).item(), rel=1e-3)
    assert loss(shared + 0.05 * x, labels) == pytest.approx(0.2, abs=0.02)  # without: the margin
    assert isinstance(training_neck("none", 8), torch.nn.Identity)
    assert not list(neck.parameters()) and not list(neck.buffers())  # nothing to checkpoint


def test_bn_neck_training_keeps_the_checkpoint_the_backbones_alone(tmp_path, registry):
    backbone = TinyBackbone()
    keys = list(backbone.model.state_dict())
    path = run(config(neck="bn", epochs=1), tmp_path, registry, backbone=backbone)
    assert list(torch.load(path, map_location="cpu", weights_only=True)) == keys
    with pytest.raises(ConfigError, match="neck"):
        validate_train_config({**config(), "neck": "layernorm"}, registry)


@pytest.fixture(scope="module")
def learning_data():
    """The synthetic benchmark with 600 identities (about 560 train identities, 30 query
    craters x 5 views, 1,200 gallery crops) at 64 px, each image rendered once."""
    from craterlab.data.synthetic import SyntheticCraters

    class Rendered:
        def __init__(self, dataset):
            self.dataset, self.name = dataset, dataset.name
            self.load_image = functools.lru_cache(maxsize=None)(dataset.load_image)

        def records(self, split):
            return self.dataset.records(split)

        def identity(self):
            return self.dataset.identity()

    return Rendered(SyntheticCraters(n_identities=600, n_query_craters=30, image_size=64, seed=0))


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["supcon", "arcface", "triplet"])
def test_fine_tuning_from_random_weights_raises_test_map(loss, learning_data, tmp_path):
    """It learns: a tiny timm ViT from random weights, fine-tuned on the synthetic train split
    (identities disjoint from the queries and their relevant craters), ranks the test queries
    clearly better with the embedding it trained (GeM). The recipe is the benchmark's
    (benchmarks/bench_finetune.py): lr 3e-4, 10% warmup, cosine, 10 epochs, mild crops, a BN
    neck (without it triplet and ArcFace collapse to about 0.6x)."""
    from craterlab.backbones import timm_vit
    from craterlab.train.evaluation import retrieval_metrics
    from craterlab.train.recipes import from_scratch_config

    def vit(weights: str = "random"):
        return timm_vit("test_vit", weights=weights, image_size=64, precision="fp32")

    before = retrieval_metrics(vit(), learning_data, "gem")["mAP"]
    cfg = from_scratch_config(loss, "single_crop")  # the benchmark's recipe, one definition
    checkpoint = finetune(cfg, vit(), learning_data, device="cpu", seed=0, out_dir=tmp_path)
    after = retrieval_metrics(vit(str(checkpoint)), learning_data, "gem")["mAP"]
    assert after >= 1.3 * before, (before, after)
