"""DINO from random init learns crater retrieval without labels (slow: minutes on 2 CPU cores).

The benchmark's setting in small (benchmarks/bench_pretrain.py): timm's test_vit at 96 px from
random init, DINO on the unlabeled train split of a 200-identity synthetic set for a fixed
number of steps (the CPU recipe, craterlab.train.recipes), then test mAP of GeM against the
same random init. The margin is set from seed-to-seed spread measured with the benchmark
(docs/pretraining.md, "Measured").
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

STEPS = 250
SEED = 0
MARGIN = 0.02  # absolute GeM mAP above random init (seed spread of the gain: see the docs)


@pytest.mark.slow
def test_dino_from_random_init_beats_random_init(tmp_path: Path) -> None:
    import torch
    from bench_pretrain import CachedImages, backbone, run_dino

    from craterlab.data.synthetic import SyntheticCraters
    from craterlab.train.evaluation import retrieval_suite
    from craterlab.train.pretrain import ImageSource

    torch.set_num_threads(1)
    data = CachedImages(
        SyntheticCraters(n_identities=200, n_query_craters=30, image_size=96, seed=SEED)
    )
    before = retrieval_suite(backbone(seed=SEED), data, 32)
    checkpoint = run_dino(ImageSource(data, ["train"]), SEED, STEPS, str(tmp_path))
    trained = backbone(str(checkpoint), seed=SEED)
    assert trained.weights_status.startswith("self-supervised on synthetic-small [train")
    after = retrieval_suite(trained, data, 32)
    assert after["gem_mAP"] > before["gem_mAP"] + MARGIN, (before, after)
