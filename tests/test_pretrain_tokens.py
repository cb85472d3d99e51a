"""The token-level contrastive objective of pretraining (``pretrain.token_loss=late_interaction``).

What is checked: the loss is the contrastive softmax over late-interaction scores with the
other crops of a batch element as positives (against an independent computation); a bad token
layout and bad values are refused naming the fix; runs without it keep their run key; a tiny
run logs the DINO and token losses beside their weighted sum, names the objective in its
weights' lineage, and resumes to the uninterrupted run's weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_pretrain import TINY, GreyImages, vit
from test_pretrain_patch import (
    IBOT,
    assert_objective_refusals,
    assert_resumes_to_the_uninterrupted_weights,
)

from craterlab.backbones.lineage import read_lineage
from craterlab.errors import ConfigError
from craterlab.train.pretrain import ImageSource, pretrain
from craterlab.train.pretrain_config import PretrainConfig, run_key
from craterlab.train.ssl_tokens import require_patch_tokens, token_contrast_loss

TOKENS = {**TINY, "token_loss": "late_interaction", "token_weight": 0.5}


def reference_loss(tokens: np.ndarray, batch: int, temperature: float) -> float:
    """Written from the definition, loops and numpy: s(q, g) = mean over q's tokens of the
    best cosine with g's tokens; anchor i's positives are the rows of its batch element."""
    z = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
    n = len(z)
    scores = np.array([[(z[i] @ z[j].T).max(1).mean() for j in range(n)] for i in range(n)])
    losses = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        logits = scores[i, others] / temperature
        log_norm = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
        positives = [j for j in others if j % batch == i % batch]
        losses.append(-np.mean([scores[i, j] / temperature - log_norm for j in positives]))
    return float(np.mean(losses))


@pytest.mark.parametrize("crops", [2, 3])
def test_the_loss_is_the_late_interaction_contrast_of_a_batch(crops: int) -> None:
    gen = torch.Generator().manual_seed(crops)
    tokens = torch.randn(crops * 4, 5, 6, generator=gen, dtype=torch.float64)
    got = token_contrast_loss(tokens, batch_size=4, temperature=0.1)
    assert float(got) == pytest.approx(reference_loss(tokens.numpy(), 4, 0.1), rel=1e-5)


def test_matched_crops_score_lower_than_shuffled_ones() -> None:
    """Crops of one element that share their tokens are easy positives: the loss is lower
    than with the second crops assigned to other elements."""
    gen = torch.Generator().manual_seed(0)
    first = torch.randn(6, 4, 8, generator=gen)
    second = first + 0.05 * torch.randn(6, 4, 8, generator=gen)
    matched = token_contrast_loss(torch.cat([first, second]), 6, 0.05)
    shuffled = token_contrast_loss(torch.cat([first, second.roll(1, 0)]), 6, 0.05)
    assert float(matched) < 0.1 < float(shuffled)


def test_a_layout_without_two_crops_per_element_is_refused() -> None:
    with pytest.raises(ValueError, match="2 or more crops of each of the 4"):
        token_contrast_loss(torch.randn(6, 3, 2), batch_size=4, temperature=0.1)
    with pytest.raises(ValueError, match="2 or more crops"):
        token_contrast_loss(torch.randn(4, 3, 2), batch_size=4, temperature=0.1)


def test_token_config_refusals_name_the_fix() -> None:
    cases = [
        ({"token_weight": 0.0}, "token_weight must be > 0"),
        ({"token_temperature": -1.0}, "token_temperature must be > 0"),
    ]
    assert_objective_refusals({"token_loss": "late_interaction"}, cases, unknown="colbert")


def test_a_model_without_patch_tokens_or_a_second_crop_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="timm VisionTransformer") as info:
        require_patch_tokens(torch.nn.Linear(2, 2), 2)
    assert "pretrain.token_loss=none" in str(info.value)
    cfg = {**TOKENS, "global_crops": 1}
    with pytest.raises(ConfigError, match="pretrain.global_crops is 1"):
        pretrain(cfg, vit(), ImageSource(GreyImages()), device="cpu", seed=0, out_dir=tmp_path)
    assert not (tmp_path / "train_state.pt").exists()


def test_run_key_of_a_run_without_the_token_loss_is_unchanged() -> None:
    ident = ({"model": "test_vit"}, {"dataset": "grey"})
    assert run_key(PretrainConfig(token_weight=3.0), *ident, 0) == "6cc7d1b40c1f5484"
    on = PretrainConfig(token_loss="late_interaction")
    assert run_key(on, *ident, 0) != run_key(PretrainConfig(), *ident, 0)
    assert run_key(on, *ident, 0) != run_key(
        PretrainConfig(token_loss="late_interaction", token_temperature=0.2), *ident, 0
    )


def test_a_token_run_logs_both_losses_and_names_the_objective(tmp_path: Path) -> None:
    steps: list[dict] = []
    ckpt = pretrain(
        TOKENS, vit(), ImageSource(GreyImages()), device="cpu", seed=0, out_dir=tmp_path,
        on_step=lambda s, m: steps.append(m),
    )  # fmt: skip
    assert len(steps) == 2
    for m in steps:
        assert m["token_loss"] > 0
        assert m["loss"] == pytest.approx(m["dino_loss"] + 0.5 * m["token_loss"], rel=1e-5)
    assert read_lineage(ckpt)[-1]["method"] == "dino + late-interaction contrast x0.5"
    start, learned = vit().model.state_dict(), vit(str(ckpt)).model.state_dict()
    assert any(not torch.equal(learned[k], start[k]) for k in start)


def test_token_and_patch_losses_add_up(tmp_path: Path) -> None:
    steps: list[dict] = []
    pretrain(
        {**IBOT, **{k: TOKENS[k] for k in ("token_loss", "token_weight")}}, vit(),
        ImageSource(GreyImages()), device="cpu", seed=0, out_dir=tmp_path,
        on_step=lambda s, m: steps.append(m),
    )  # fmt: skip
    for m in steps:
        total = m["dino_loss"] + 0.5 * m["patch_loss"] + 0.5 * m["token_loss"]
        assert m["loss"] == pytest.approx(total, rel=1e-5)


def test_an_interrupted_token_run_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    assert_resumes_to_the_uninterrupted_weights(TOKENS, tmp_path)
