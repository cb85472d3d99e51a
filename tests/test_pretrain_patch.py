"""The iBOT masked patch-token objective of DINO pretraining (``pretrain.patch_loss=ibot``).

What is checked: the masked student forward (lightly's masked ViT around the student's own
timm model) is the plain forward without a mask and replaces exactly the masked input tokens;
the block masks spare the prefix tokens and follow the ratio and share; the patch loss is the
iBOT formula over the masked positions only (against an independent computation); bad values
are refused naming the fix; a tiny run trains, logs its two losses, saves weights that load
as a backbone, and resumes to the same weights as an uninterrupted run; an old run without the
patch parts keeps its run key, and is refused (naming the fix) when the patch loss is asked for.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_pretrain import TINY, GreyImages, tiny_command_overrides, vit

from craterlab.backbones.lineage import read_lineage
from craterlab.errors import ConfigError
from craterlab.train.pretrain import STATE_FILE, ImageSource, pretrain
from craterlab.train.pretrain_config import PretrainConfig, run_key, validate_pretrain_config
from craterlab.train.ssl_patch import (
    block_masks,
    grid_of,
    masked_encoder,
    patch_loss,
    python_random,
    require_vit,
)

# 32 px test_vit: a 2x2 patch grid; every global crop masked, 2-3 of its 4 tokens
IBOT = {**TINY, "patch_loss": "ibot", "patch_weight": 0.5, "mask_ratio": [0.5, 0.75]}
IBOT["mask_share"] = 1.0


# --------------------------------------------------------------------------- config


def test_patch_config_refusals_name_the_fix() -> None:
    cases = [
        ({"patch_weight": 0.0}, "patch_weight must be > 0"),
        ({"mask_ratio": [0.5, 0.1]}, "mask_ratio must be"),
        ({"mask_ratio": [0.0, 0.5]}, "mask_ratio must be"),
        ({"mask_ratio": [0.1, 1.0]}, "mask_ratio must be"),
        ({"mask_share": 0.0}, "mask_share must be in"),
        ({"patch_teacher_temp": 0.0}, "patch_teacher_temp must be > 0 or null"),
    ]
    assert_objective_refusals({"patch_loss": "ibot"}, cases, unknown="mae")


def assert_objective_refusals(
    switch: dict[str, str], cases: list[tuple[dict, str]], unknown: str
) -> None:
    """Each bad value beside the objective's ``switch`` is refused naming the problem and the
    way to set it; an ``unknown`` objective name is refused naming the valid one."""
    (key, valid) = next(iter(switch.items()))
    for values, problem in cases:
        with pytest.raises(ConfigError, match=problem) as info:
            validate_pretrain_config({**switch, **values})
        assert "pretrain.KEY=VALUE" in str(info.value)
    with pytest.raises(ConfigError, match=key) as info:
        validate_pretrain_config({key: unknown})
    assert valid in str(info.value)  # names the valid choices


def test_a_model_without_patch_tokens_is_refused() -> None:
    with pytest.raises(ConfigError, match="timm VisionTransformer") as info:
        require_vit(torch.nn.Linear(2, 2))
    assert "pretrain.patch_loss=none" in str(info.value)


def test_a_mask_ratio_that_masks_nothing_is_refused(tmp_path: Path) -> None:
    cfg = {**IBOT, "mask_ratio": [0.1, 0.2]}  # 4 tokens x 0.2 < 1
    with pytest.raises(ConfigError, match="masks no token of a 2x2 patch grid"):
        pretrain(cfg, vit(), ImageSource(GreyImages()), device="cpu", seed=0, out_dir=tmp_path)
    assert not (tmp_path / STATE_FILE).exists()


def test_run_key_of_a_run_without_the_patch_loss_is_unchanged() -> None:
    """Keys computed before the patch settings existed: such runs still resume."""
    ident = ({"model": "test_vit"}, {"dataset": "grey"})
    assert run_key(PretrainConfig(), *ident, 0) == "6cc7d1b40c1f5484"
    paired = PretrainConfig(lr=2e-3, pair_views="place")
    assert run_key(paired, *ident, 1) == "d81f7b92766affb3"
    # off, its settings do not matter; on, they do
    assert run_key(PretrainConfig(patch_weight=0.3), *ident, 0) == "6cc7d1b40c1f5484"
    on = PretrainConfig(patch_loss="ibot")
    assert run_key(on, *ident, 0) != run_key(PretrainConfig(), *ident, 0)
    assert run_key(on, *ident, 0) != run_key(
        PretrainConfig(patch_loss="ibot", mask_share=1), *ident, 0
    )


# --------------------------------------------------------------------------- masking


def test_the_masked_encoder_is_the_plain_forward_without_a_mask() -> None:
    model = vit().model.eval()
    token = torch.nn.Parameter(torch.randn(1, 1, model.embed_dim))
    encoder = masked_encoder(model, token)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        plain = model.forward_features(x)
        none = encoder.encode(x, mask=torch.zeros(3, 5, dtype=torch.bool))
        masked = encoder.encode(x, mask=torch.tensor([[0, 1, 0, 0, 1]] * 3, dtype=torch.bool))
    torch.testing.assert_close(none, plain, rtol=0, atol=0)
    assert not torch.allclose(masked, plain)
    assert torch.equal(model.state_dict()["pos_embed"], vit().model.state_dict()["pos_embed"])


def test_masking_replaces_exactly_the_masked_input_tokens() -> None:
    model = vit().model.eval()
    token = torch.nn.Parameter(torch.randn(1, 1, model.embed_dim))
    encoder = masked_encoder(model, token)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.tensor([[0, 1, 0, 0, 1], [0, 0, 0, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        plain = encoder.preprocess(x)
        masked = encoder.preprocess(x, mask=mask)
    changed = (masked != plain).any(-1)
    assert torch.equal(changed, mask)
    # a masked input token is the mask token at its position, whatever the image
    pos = model.pos_embed[0]
    for b, i in mask.nonzero().tolist():
        torch.testing.assert_close(masked[b, i], token[0, 0] + pos[i])


def test_block_masks_spare_the_prefix_and_follow_ratio_and_share() -> None:
    grid = (6, 6)
    with python_random(3):
        seq, block = block_masks(8, grid, 1, [0.1, 0.5], 0.5, "cpu")
    assert seq.shape == (8, 37) and block.shape == (8, 6, 6)
    assert not seq[:, 0].any() and torch.equal(seq[:, 1:], block.flatten(1))
    counts = block.sum((1, 2))
    assert int((counts > 0).sum()) == 4  # int(8 * 0.5) crops masked
    assert int(counts.max()) <= int(36 * 0.5)
    # seeded: the same masks again, and the caller's random state is given back
    state = random.getstate()
    with python_random(3):
        _, again = block_masks(8, grid, 1, [0.1, 0.5], 0.5, "cpu")
    assert torch.equal(again, block) and random.getstate() == state
    assert grid_of(vit().model, 32) == (2, 2)


# --------------------------------------------------------------------------- the loss


def test_patch_loss_is_the_ibot_formula_over_masked_positions() -> None:
    from lightly.loss import IBOTPatchLoss

    torch.manual_seed(0)  # 3 crops of 2x3 patches, one unmasked
    n, dim, tt, st, m = 3, 5, 0.07, 0.2, 0.8
    block = torch.tensor(
        [[[1, 0, 0], [1, 1, 0]], [[0, 0, 0], [0, 0, 0]], [[0, 1, 0], [0, 0, 1]]],
        dtype=torch.bool,
    )
    mask = torch.cat([torch.zeros(n, 1, dtype=torch.bool), block.flatten(1)], 1)
    teacher, student = torch.randn(n, 7, dim), torch.randn(n, 7, dim)
    criterion = IBOTPatchLoss(output_dim=dim, student_temp=st, center_momentum=m)
    centre = torch.randn(1, dim)
    criterion.center.center = centre.clone()
    head = torch.nn.Identity()
    got = patch_loss(criterion, teacher, student, mask, block, head, head, tt)
    # independent: per crop, the mean over its masked tokens of the cross-entropy between the
    # teacher's centred, sharpened softmax and the student's; summed over crops / crops
    per_crop = []
    for b in range(n):
        idx = mask[b].nonzero().flatten()
        if len(idx) == 0:
            per_crop.append(torch.tensor(0.0))
            continue
        p = F.softmax((teacher[b, idx] - centre) / tt, -1)
        logq = F.log_softmax(student[b, idx] / st, -1)
        per_crop.append((-(p * logq).sum(-1)).mean())
    torch.testing.assert_close(got, torch.stack(per_crop).sum() / n)
    # the centre moved towards the mean of the masked teacher tokens only
    torch.testing.assert_close(criterion.center.value, m * centre + (1 - m) * teacher[mask].mean(0))
    # what the student outputs at unmasked positions (and the prefix) does not count
    criterion.center.center = centre.clone()
    other = student.clone()
    other[~mask] = torch.randn_like(other[~mask]) * 10
    torch.testing.assert_close(
        patch_loss(criterion, teacher, other, mask, block, head, head, tt), got
    )
    # fewer than 2 masked tokens: no loss, no centre update
    few = torch.zeros_like(mask)
    few[0, 1] = True
    assert patch_loss(criterion, teacher, student, few, block, head, head, tt) is None


# --------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("head", ["separate", "shared"])
def test_ibot_run_trains_logs_both_losses_and_loads_as_a_backbone(tmp_path: Path, head) -> None:
    steps: list[dict] = []
    ckpt = pretrain(
        {**IBOT, "patch_head": head}, vit(), ImageSource(GreyImages()), device="cpu", seed=0,
        out_dir=tmp_path, on_step=lambda s, m: steps.append(m),
    )  # fmt: skip
    assert len(steps) == 2
    for m in steps:
        assert m["patch_loss"] > 0
        assert m["loss"] == pytest.approx(m["dino_loss"] + 0.5 * m["patch_loss"], rel=1e-5)
    start = vit().model.state_dict()
    backbone = vit(str(ckpt))  # the teacher's backbone loads as weights
    learned = backbone.model.state_dict()
    assert set(learned) == set(start) and any(not torch.equal(learned[k], start[k]) for k in start)
    assert read_lineage(ckpt)[-1]["method"].startswith("dino + ibot patch loss x0.5")
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert set(state["patch"]) == (
        {"mask_token", "loss", "head", "teacher_head"}
        if head == "separate"
        else {"mask_token", "loss"}
    )
    assert state["patch"]["loss"]["center.center"].abs().sum() > 0  # the patch centre moved
    assert state["patch"]["mask_token"].abs().sum() > 0  # the mask token was trained


class Interrupted(Exception):
    pass


def stop_after_first_epoch(epoch: int, metrics: dict) -> None:
    if epoch == 1:
        raise Interrupted  # after epoch 1's state was saved, as a killed run would


def assert_resumes_to_the_uninterrupted_weights(cfg: dict, tmp_path: Path) -> tuple[Path, Path]:
    """Run ``cfg`` for 2 epochs straight, and again killed after epoch 1 and resumed: the
    resumed call runs only epoch 2 and ends on bit-identical weights. The two checkpoints."""
    data = ImageSource(GreyImages())
    cfg = {**cfg, "epochs": 2}
    straight = pretrain(cfg, vit(), data, device="cpu", seed=0, out_dir=tmp_path / "a")
    with pytest.raises(Interrupted):
        pretrain(
            cfg, vit(), data, device="cpu", seed=0, out_dir=tmp_path / "b",
            on_epoch_end=stop_after_first_epoch,
        )  # fmt: skip
    steps: list[int] = []
    resumed = pretrain(
        cfg, vit(), data, device="cpu", seed=0, out_dir=tmp_path / "b",
        on_step=lambda s, m: steps.append(s),
    )  # fmt: skip
    assert steps == [3, 4]  # only the second epoch ran
    a, b = (torch.load(p, weights_only=True) for p in (straight, resumed))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    return straight, resumed


def test_an_interrupted_ibot_run_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    straight, resumed = assert_resumes_to_the_uninterrupted_weights(IBOT, tmp_path)
    sa, sb = (torch.load(p.parent / STATE_FILE, weights_only=True) for p in (straight, resumed))
    torch.testing.assert_close(sb["patch"], sa["patch"], rtol=0, atol=0)


def test_a_run_without_the_patch_parts_is_refused_naming_the_fix(tmp_path: Path) -> None:
    data = ImageSource(GreyImages())
    pretrain(TINY, vit(), data, device="cpu", seed=0, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="cannot gain it midway") as info:
        pretrain({**IBOT, "epochs": 2}, vit(), data, device="cpu", seed=0, out_dir=tmp_path)
    assert f"backbone.weights={tmp_path / 'model.pt'}" in str(info.value)
    # and the run itself still resumes without the patch loss
    steps: list[int] = []
    pretrain(
        {**TINY, "epochs": 2}, vit(), data, device="cpu", seed=0, out_dir=tmp_path,
        on_step=lambda s, m: steps.append(s),
    )  # fmt: skip
    assert steps == [3, 4]


def test_the_command_logs_the_patch_loss_to_mlflow(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from craterlab.commands.pretrain import compose_pretrain_config, run_pretrain

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    plain = {k: v for k, v in IBOT.items() if k not in ("mask_ratio", "eval_every")}
    overrides = [f"pretrain.{k}={v}".replace("False", "false") for k, v in plain.items()]
    cfg = compose_pretrain_config(
        [
            *overrides,
            "pretrain.mask_ratio=[0.5,0.75]",
            "pretrain.eval_every=null",
            *tiny_command_overrides(uri, tmp_path),
        ]
    )
    result = run_pretrain(cfg)
    assert "dino + ibot patch loss x0.5" in result["weights"]
    run = MlflowClient(uri).get_run(result["run_id"])
    metrics = set(run.data.metrics)
    assert {"pretrain/patch_loss", "pretrain/dino_loss", "pretrain/epoch_patch_loss"} <= metrics
    assert run.data.params["pretrain.patch_loss"] == "ibot"


def test_the_patch_teacher_temperature_is_its_own_when_set(tmp_path: Path) -> None:
    """Same init, data and masks: only the patch teacher's sharpening differs, so the first
    step's DINO loss is the same and its patch loss is not."""
    first = {}
    for temp in (None, 0.5):
        steps: list[dict] = []
        pretrain(
            {**IBOT, "patch_teacher_temp": temp}, vit(), ImageSource(GreyImages()),
            device="cpu", seed=0, out_dir=tmp_path / str(temp),
            on_step=lambda s, m, steps=steps: steps.append(m),
        )  # fmt: skip
        first[temp] = steps[0]
    assert first[None]["dino_loss"] == pytest.approx(first[0.5]["dino_loss"])
    assert first[None]["patch_loss"] != pytest.approx(first[0.5]["patch_loss"])
