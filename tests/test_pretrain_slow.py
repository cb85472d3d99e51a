"""DINO from random init on the benchmark's data does not collapse (slow: minutes on 2 CPU cores).

The benchmark's setting in small (benchmarks/bench_pretrain.py): timm's test_vit at 96 px from
random init, DINO (the CPU recipe, craterlab.train.recipes) on the unlabeled train split of a
200-identity synthetic set for 250 steps. What is asserted is what was measured to hold on
every seed tried (0, 1, 2): the loss leaves the uniform-collapse value ln(out_dim) (about 6.9)
for about 5 by the end, where DINO's ViT defaults drift up to it; and the weights load as a
backbone reported as self-supervised. A test-mAP gain over random init is NOT asserted: the
measured GeM gains (+0.018, +0.030, +0.001 mAP) are not above the seed-to-seed spread
(docs/pretraining.md, "Measured").
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

STEPS = 250


@pytest.mark.slow
def test_dino_from_random_init_leaves_the_collapsed_loss(tmp_path: Path) -> None:
    import torch
    from bench_pretrain import CachedImages, backbone

    from craterlab.data.synthetic import SyntheticCraters
    from craterlab.train.pretrain import ImageSource, pretrain
    from craterlab.train.recipes import PRETRAIN_CPU_RECIPE, pretrain_cpu_config

    torch.set_num_threads(1)
    data = CachedImages(SyntheticCraters(n_identities=200, n_query_craters=30, image_size=96))
    losses: list[float] = []
    checkpoint = pretrain(
        pretrain_cpu_config(STEPS),
        backbone(),
        ImageSource(data, ["train"]),
        device="cpu",
        seed=0,
        out_dir=tmp_path,
        on_step=lambda step, m: losses.append(m["loss"]),
    )
    collapsed = math.log(PRETRAIN_CPU_RECIPE["out_dim"])
    assert statistics.mean(losses[-20:]) < collapsed - 1.0, losses[-20:]
    trained = backbone(str(checkpoint))
    assert trained.weights_status.startswith("self-supervised on synthetic-small [train")
