"""The token-aware fine-tuning loss (SupCon over late-interaction scores) and multi-view data.

The loss is checked against a loop-by-loop computation of Eq. 1 and of SupCon; its token
selection against the token modules; and fine-tuning with it (and with rendered extra views
per identity) runs through ``finetune``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from craterlab.errors import ConfigError
from craterlab.tokens.aggregation import InstanceAggregator
from craterlab.train.losses import LateInteractionContrastiveLoss, SupConLoss
from craterlab.types import Features


def reference_loss(z: torch.Tensor, labels: list[int], temperature: float) -> float:
    """Eq. 1 for every (query, gallery) pair, then SupCon L_out, with plain loops."""
    b = z.shape[0]
    z = F.normalize(z, dim=-1)
    s = [
        [
            sum(max(float(z[i, a] @ z[j, c]) for c in range(z.shape[1])) for a in range(z.shape[1]))
            / z.shape[1]
            for j in range(b)
        ]
        for i in range(b)
    ]
    total, anchors = 0.0, 0
    for i in range(b):
        pos = [j for j in range(b) if j != i and labels[j] == labels[i]]
        if not pos:
            continue
        denom = sum(math.exp(s[i][j] / temperature) for j in range(b) if j != i)
        total += -sum(math.log(math.exp(s[i][p] / temperature) / denom) for p in pos) / len(pos)
        anchors += 1
    return total / anchors


def test_loss_matches_a_loop_by_loop_reference() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 3, 5, generator=g)
    labels = [0, 0, 1, 1, 2, 5]  # the last anchor has no positive: skipped
    loss = LateInteractionContrastiveLoss(temperature=0.2)(z, torch.tensor(labels))
    assert float(loss) == pytest.approx(reference_loss(z, labels, 0.2), rel=1e-5)


def test_one_token_per_image_is_supcon() -> None:
    g = torch.Generator().manual_seed(1)
    e = torch.randn(8, 16, generator=g)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    a = LateInteractionContrastiveLoss(temperature=0.1)(e, y)
    assert float(a) == pytest.approx(float(SupConLoss(temperature=0.1)(e, y)), rel=1e-6)


def test_features_become_instance_tokens_with_gradients() -> None:
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(4, 9, 8, generator=g, requires_grad=True)
    attn = torch.softmax(torch.randn(4, 9, generator=g), -1)
    features = Features(cls=torch.randn(4, 8), tokens=tokens, attn=attn, grid=(3, 3))
    loss_fn = LateInteractionContrastiveLoss(temperature=0.1, tokens="instance", k=4)
    expected = InstanceAggregator(k=4)(features).vectors
    assert torch.allclose(loss_fn.token_sets(features), expected)
    y = torch.tensor([0, 0, 1, 1])
    loss = loss_fn(features, y)
    assert float(loss.detach()) == pytest.approx(reference_loss(expected, [0, 0, 1, 1], 0.1), 1e-4)
    loss.backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    # K above the token count uses every token
    all_tokens = LateInteractionContrastiveLoss(k=64).token_sets(features)
    assert all_tokens.shape == (4, 9, 8)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="tokens must be"):
        LateInteractionContrastiveLoss(tokens="cls")
    with pytest.raises(ValueError, match="temperature"):
        LateInteractionContrastiveLoss(temperature=0)


def test_fine_tuning_with_the_token_loss_and_rendered_views(tmp_path) -> None:
    from craterlab.backbones import timm_vit
    from craterlab.data.synthetic import SyntheticCraters
    from craterlab.train.finetune import finetune, with_train_views

    data = SyntheticCraters("tiny", image_size=32)
    more = with_train_views(data, 4)
    ids = {r.crater_id for r in data.records("train")}
    assert len(more.records("train")) == len(ids) * (2 + 4)  # 2 gallery crops + 4 views
    assert more.records("query") == data.records("query")
    cfg = {
        "name": "late_interaction",
        "loss": {"name": "late_interaction", "k": 2},
        "epochs": 1,
        "steps_per_epoch": 1,
        "batch_size": 8,
        "augment": "none",
        "val_fraction": 0.0,
        "progress": False,
        "lr": 1e-3,
        "train_views": 4,
    }
    backbone = timm_vit("test_vit", weights="random", image_size=32, precision="fp32")
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    ckpt = finetune(cfg, backbone, data, device="cpu", seed=0, out_dir=tmp_path)
    after = torch.load(ckpt, weights_only=True)
    assert any(not torch.equal(after[k], before[k]) for k in before)


def test_rendered_views_need_a_dataset_that_can_render_them() -> None:
    from craterlab.train.finetune import with_train_views

    class Fixed:
        name = "my-crops"

    with pytest.raises(ConfigError, match="'my-crops' holds fixed images"):
        with_train_views(Fixed(), 3)  # type: ignore[arg-type]
