"""DINO pretraining (tiny: timm's test_vit at 32 px, a handful of grey images) and its lineage.

What is checked: the config's errors, the grey multi-crop views, that the loop trains the
weights and follows its schedules, resumes, and that the result loads as a backbone whose
weights status reads "self-supervised on <data>, from <start>" and is not untrained; and each
bad input named in one paragraph (too few images, images below the local crop size, a start
checkpoint of another architecture, a NaN loss that keeps the last good checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from craterlab.backbones import timm_vit
from craterlab.backbones.lineage import (
    is_untrained,
    lineage_params,
    read_lineage,
    status_of,
)
from craterlab.errors import ConfigError, CraterlabError, DataError
from craterlab.hashing import file_sha256
from craterlab.train.pretrain import (
    STATE_FILE,
    ImageSource,
    PretrainDiverged,
    items_source,
    pretrain,
)
from craterlab.train.pretrain_config import PretrainConfig, validate_pretrain_config
from craterlab.train.ssl_views import GreyView, MultiCrop, gaussian_blur
from craterlab.types import ImageRecord

TINY = {
    "batch_size": 4,
    "epochs": 1,
    "steps_per_epoch": 2,
    "out_dim": 32,
    "hidden_dim": 16,
    "bottleneck_dim": 8,
    "local_crops": 2,
    "local_size": 16,
    "eval_every": None,
    "progress": False,
    "warmup": 0.5,
    "teacher_temp_warmup": 0.5,
}


class GreyImages:
    """A few random grey images in memory (a dataset whose labels pretraining ignores)."""

    name = "grey"

    def __init__(self, n: int = 8, size: int = 32, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.images = [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(n)]
        self._records = [ImageRecord(f"img{i}", i, "2x") for i in range(n)]

    def records(self, split: str) -> list[ImageRecord]:
        return self._records if split == "train" else []

    def load_image(self, record: ImageRecord) -> Image.Image:
        return Image.fromarray(self.images[record.crater_id], mode="L").convert("RGB")

    def identity(self) -> str:
        return f"grey-{len(self.images)}-{self.images[0].shape[0]}"


def vit(weights: str = "random", seed: int = 0):
    return timm_vit("test_vit", weights=weights, seed=seed, image_size=32, precision="fp32")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, dict]]]:
    out = tmp_path_factory.mktemp("dino")
    steps: list[tuple[int, dict]] = []
    ckpt = pretrain(
        TINY,
        vit(),
        ImageSource(GreyImages()),
        device="cpu",
        seed=0,
        out_dir=out,
        on_step=lambda s, m: steps.append((s, m)),
        run_id="run123",
    )
    return ckpt, steps


# --------------------------------------------------------------------------- config


def test_config_errors_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="teacher_tmp") as info:
        validate_pretrain_config({"teacher_tmp": 0.04})
    assert "teacher_temp" in str(info.value)  # names the valid key
    with pytest.raises(ConfigError, match="at least 2 views"):
        validate_pretrain_config({"global_crops": 1, "local_crops": 0})
    with pytest.raises(ConfigError, match=r"pretrain\.KEY=VALUE"):
        validate_pretrain_config({"lr": -1.0, "local_scale": [0.5, 0.1]})


# --------------------------------------------------------------------------- views


def test_views_are_grey_normalized_and_sized() -> None:
    cfg = PretrainConfig(local_crops=3)
    crops = MultiCrop(cfg, 32, 16, [0.5, 0.4, 0.3], [0.2, 0.25, 0.5])
    torch.manual_seed(0)
    globals_, locals_ = crops([torch.rand(1, 40, 40) for _ in range(5)])
    assert [g.shape for g in globals_] == [torch.Size([5, 3, 32, 32])] * 2
    assert [v.shape for v in locals_] == [torch.Size([5, 3, 16, 16])] * 3
    # no colour: un-normalized, the three channels are one grey image in [0, 1]
    grey = globals_[0] * crops.std + crops.mean
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-5)
    assert torch.allclose(grey[:, 0], grey[:, 2], atol=1e-5)
    assert grey.min() >= -1e-5 and grey.max() <= 1 + 1e-5


def test_batched_blur_matches_torchvision_per_image() -> None:
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(3, 1, 20, 20)
    sigma = torch.tensor([0.5, 1.0, 1.5])
    out = gaussian_blur(x, sigma, radius=4)
    for i in range(3):
        s = float(sigma[i])
        ref = TF.gaussian_blur(x[i], [9, 9], [s, s])
        assert torch.allclose(out[i], ref, atol=1e-5)


def test_azimuth_view_is_a_rotation_or_flip_of_the_crop() -> None:
    cfg = PretrainConfig(
        global_scale=[1.0, 1.0], gamma=[1.0, 1.0], contrast=0.0, brightness=0.0,
        blur_prob=0.0, noise=0.0, azimuth="dihedral",
    )  # fmt: skip
    image = torch.rand(1, 16, 16)
    square = {
        tuple(torch.flip(torch.rot90(image, k, (-2, -1)), (-1,)).flatten().tolist())
        for k in range(4)
    } | {tuple(torch.rot90(image, k, (-2, -1)).flatten().tolist()) for k in range(4)}
    torch.manual_seed(1)
    seen = set()
    for _ in range(40):
        out = GreyView(cfg, 16, cfg.global_scale)(image)
        key = tuple(out.flatten().tolist())
        assert key in square  # exactly one of the 8 symmetries of the square
        seen.add(key)
    assert len(seen) > 4  # and several of them are drawn


# --------------------------------------------------------------------------- the loop


def test_pretraining_trains_the_weights_and_records_its_lineage(trained) -> None:
    ckpt, _ = trained
    start = vit().model.state_dict()
    learned = torch.load(ckpt, weights_only=True)
    assert set(learned) == set(start)
    assert any(not torch.equal(learned[k], start[k]) for k in start)
    backbone = vit(str(ckpt))
    status = backbone.weights_status
    assert status.startswith("self-supervised on grey [train, 8 images], from random init")
    lineage = read_lineage(ckpt)
    assert lineage is not None and [s["kind"] for s in lineage] == ["random", "pretrain"]
    assert lineage[1]["sha256"] == file_sha256(ckpt) and lineage[1]["mlflow_run_id"] == "run123"
    assert not is_untrained(lineage)  # random init + DINO is a trained model
    params = lineage_params(lineage, status)
    assert params["weights.untrained"] == "false" and params["weights.pretrain_steps"] == "1"
    from craterlab.results import is_untrained as marked_untrained

    assert not marked_untrained(status)


def test_schedules_follow_the_config(trained) -> None:
    _, steps = trained
    assert [s for s, _ in steps] == [1, 2]
    first, last = steps[0][1], steps[-1][1]
    cfg = PretrainConfig(**TINY)
    assert first["teacher_temp"] == pytest.approx(cfg.warmup_teacher_temp)
    assert last["teacher_temp"] == pytest.approx(cfg.teacher_temp)
    assert first["lr"] == pytest.approx(cfg.lr / 2)  # linear warmup over 1 of 2 steps
    assert last["momentum"] == pytest.approx(cfg.momentum_end)
    assert last["weight_decay"] == pytest.approx(cfg.weight_decay_end)
    assert all(np.isfinite(m["loss"]) for _, m in steps)


def test_finished_run_is_reused_and_longer_run_continues(tmp_path: Path) -> None:
    data = ImageSource(GreyImages())
    ckpt = pretrain(TINY, vit(), data, device="cpu", seed=0, out_dir=tmp_path)
    sha = file_sha256(ckpt)
    again = pretrain(TINY, vit(), data, device="cpu", seed=0, out_dir=tmp_path)
    assert file_sha256(again) == sha  # finished: returned as it is
    steps: list[int] = []
    pretrain(
        {**TINY, "epochs": 2}, vit(), data, device="cpu", seed=0, out_dir=tmp_path,
        on_step=lambda s, m: steps.append(s),
    )  # fmt: skip
    assert steps == [3, 4]  # only the second epoch ran
    assert torch.load(tmp_path / STATE_FILE, weights_only=True)["epoch"] == 2
    with pytest.raises(ConfigError, match="different config"):
        pretrain({**TINY, "lr": 1e-3}, vit(), data, device="cpu", seed=0, out_dir=tmp_path)


def test_a_folder_of_crops_is_an_input(tmp_path: Path) -> None:
    for i, image in enumerate(GreyImages(n=5).images):
        Image.fromarray(image).save(tmp_path / f"c{i}.png")
    source = items_source(str(tmp_path))
    assert len(source) == 5 and source.sizes() == [(32, 32)] * 5
    assert source.grey(0).shape == (1, 32, 32)


def test_fine_tuning_after_pretraining_names_the_pretraining_as_origin(trained) -> None:
    ckpt, _ = trained
    lineage = read_lineage(ckpt) + [
        {"kind": "finetune", "loss": "supcon", "epochs": 1, "checkpoint": "x", "sha256": "y"}
    ]
    status = status_of(lineage, "checkpoint:x")
    assert status.startswith("fine-tuned (") and "origin: self-supervised on grey" in status
    assert not is_untrained(lineage)
    assert is_untrained([{"kind": "random"}, {"kind": "finetune"}])  # unchanged without DINO


# --------------------------------------------------------------------------- bad input


def test_too_few_images_for_the_batch() -> None:
    with pytest.raises(DataError, match=r"has 3, pretrain\.batch_size is 4") as info:
        pretrain(TINY, vit(), ImageSource(GreyImages(n=3)), device="cpu", seed=0)
    assert "Lower pretrain.batch_size" in str(info.value)


def test_images_smaller_than_the_local_crop(tmp_path: Path) -> None:
    source = ImageSource(GreyImages(n=4, size=12))
    with pytest.raises(DataError, match=r"smaller than the local crop size \(16 px\)") as info:
        pretrain(TINY, vit(), source, device="cpu", seed=0, out_dir=tmp_path)
    assert "img0 (12x12)" in str(info.value) and "pretrain.local_size" in str(info.value)


def test_start_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    import timm

    other = timm.create_model("test_vit", embed_dim=32, num_heads=2, num_classes=0, img_size=32)
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(CraterlabError, match="does not fit") as info:
        vit(str(path))
    assert "Pick the backbone config that matches the checkpoint" in str(info.value)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path: Path,
) -> None:
    data = ImageSource(GreyImages())
    ckpt = pretrain(TINY, vit(), data, device="cpu", seed=0, out_dir=tmp_path)
    good = file_sha256(ckpt)
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    state["student"] = {k: torch.full_like(v, float("nan")) for k, v in state["student"].items()}
    torch.save(state, tmp_path / STATE_FILE)  # the student diverged in epoch 2
    with pytest.raises(PretrainDiverged, match=r"became nan at step 3 \(epoch 2, batch 1\)") as e:
        pretrain({**TINY, "epochs": 2}, vit(), data, device="cpu", seed=0, out_dir=tmp_path)
    assert e.value.checkpoint == ckpt and file_sha256(ckpt) == good
    assert "lower pretrain.lr" in str(e.value) and str(ckpt) in str(e.value)


def test_the_command_composes_the_pretrain_group() -> None:
    from craterlab.commands.pretrain import compose_pretrain_config

    cfg = compose_pretrain_config(["pretrain=dino_cpu", "backbone.image_size=64"])
    assert cfg.pretrain.name == "dino" and cfg.pretrain.out_dim == 1024
    assert cfg.backbone.image_size == 64
    validate_pretrain_config(cfg.pretrain)
    with pytest.raises(ConfigError, match="not an override"):
        compose_pretrain_config(["dino"])


def test_the_cpu_config_is_the_benchmarks_recipe() -> None:
    from craterlab.commands.pretrain import compose_pretrain_config
    from craterlab.train.recipes import PRETRAIN_CPU_RECIPE

    group = compose_pretrain_config(["pretrain=dino_cpu"]).pretrain
    for key, value in PRETRAIN_CPU_RECIPE.items():
        if key not in ("eval_every", "progress"):  # logging only
            assert group[key] == value, key


def test_the_paired_cpu_config_is_the_measured_paired_recipe() -> None:
    """pretrain=dino_cpu_paired is the CPU recipe plus the two settings the paired table ran
    with (bench_pretrain.py --methods dino_paired --set lr=2e-3), nothing else."""
    from craterlab.commands.pretrain import compose_pretrain_config

    plain = compose_pretrain_config(["pretrain=dino_cpu"]).pretrain
    paired = compose_pretrain_config(["pretrain=dino_cpu_paired"]).pretrain
    changed = {k for k in plain if plain[k] != paired[k]}
    assert changed == {"pair_views", "lr"}
    assert paired.pair_views == "place" and paired.lr == 2e-3
    validate_pretrain_config(paired)


def test_the_paired_token_cpu_config_is_the_measured_token_recipe() -> None:
    """pretrain=dino_cpu_paired_li is the CPU recipe with views paired by place and the
    late-interaction contrast the benchmark ran (bench_pretrain.py --methods dino_paired_li
    --set lr=1e-3: token weight 0.3, temperature 0.05), nothing else."""
    from craterlab.commands.pretrain import compose_pretrain_config

    plain = compose_pretrain_config(["pretrain=dino_cpu"]).pretrain
    tokens = compose_pretrain_config(["pretrain=dino_cpu_paired_li"]).pretrain
    changed = {k: tokens[k] for k in plain if plain[k] != tokens[k]}
    assert changed == {"pair_views": "place", "token_loss": "late_interaction", "token_weight": 0.3}
    assert tokens.lr == 1e-3 and tokens.token_temperature == 0.05
    validate_pretrain_config(tokens)


def tiny_command_overrides(uri: str, tmp_path: Path) -> list[str]:
    """The `pretrain` command's overrides for a random-init test_vit on the tiny synthetic
    set at 32 px, tracked to ``uri``."""
    return [
        "backbone.model=test_vit",
        "backbone.pretrained_tag=r160_in1k",
        "backbone.weights=random",
        "backbone.precision=fp32",
        "backbone.image_size=32",
        "dataset.size=tiny",
        "dataset.image_size=32",
        f"tracking.uri={uri}",
        f"tracking.artifact_location={tmp_path / 'artifacts'}",
    ]


def test_the_command_records_a_run_whose_weights_load_as_run_id(
    tmp_path: Path, monkeypatch
) -> None:
    from craterlab.backbones.lineage import resolve_run_weights
    from craterlab.commands.pretrain import compose_pretrain_config, run_pretrain

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    overrides = [f"pretrain.{k}={v}" for k, v in TINY.items() if k not in ("eval_every",)]
    overrides = [o.replace("None", "null").replace("False", "false") for o in overrides]
    cfg = compose_pretrain_config(
        [
            *overrides,
            "pretrain.eval_k=4",
            *tiny_command_overrides(uri, tmp_path),
        ]
    )
    result = run_pretrain(cfg)
    assert result["weights"].startswith("self-supervised on synthetic-tiny [train, ")
    assert "from random init" in result["weights"]
    path = resolve_run_weights(f"run:{result['run_id']}")
    assert file_sha256(path) == file_sha256(result["checkpoint"])
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(result["run_id"])
    assert run.data.tags["craterlab.kind"] == "pretrain"
    assert run.data.params["weights.untrained"] == "false"
    assert {"pretrain/loss", "pretrain/lr", "pretrain/teacher_temp"} <= set(run.data.metrics)
    assert "pretrain/epoch_li_mAP" in run.data.metrics  # the labelled query/gallery check
