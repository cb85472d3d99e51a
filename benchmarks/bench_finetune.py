"""Fine-tuning learns: test mAP before and after, per loss, single-crop and multi-crop.

A tiny timm ViT (``test_vit``, 64 px, random init) is fine-tuned on the synthetic benchmark's
train split (identities disjoint from the test queries) with each loss, then the test queries
are ranked against the gallery with the CLS single vector (the frozen runs' evaluation).
Before = the same random weights, untouched. Sized to run in a few minutes per loss on 2 CPU
cores; quote the ratios, the absolute figures move with the machine and the seed.

    .venv/bin/python benchmarks/bench_finetune.py                      # every loss x crop mode
    .venv/bin/python benchmarks/bench_finetune.py --losses supcon --augments single_crop
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from craterlab.backbones import timm_vit  # noqa: E402
from craterlab.data.synthetic import SyntheticCraters  # noqa: E402
from craterlab.train.evaluation import retrieval_metrics  # noqa: E402
from craterlab.train.finetune import finetune  # noqa: E402

LOSSES = {
    "supcon": {"name": "supcon", "temperature": 0.1},
    "arcface": {"name": "arcface", "scale": 16.0, "margin": 0.2},
    "triplet": {"name": "triplet", "margin": 0.2},
}


class CachedImages:
    """The dataset with its images rendered once (training revisits them every epoch)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.name = getattr(dataset, "name", "synthetic")
        self.load_image = functools.lru_cache(maxsize=None)(dataset.load_image)

    def records(self, split):
        return self.dataset.records(split)

    def identity(self):
        return self.dataset.identity()


def backbone(weights: str = "random", seed: int = 0):
    return timm_vit("test_vit", weights=weights, seed=seed, image_size=64, precision="fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--losses", default="supcon,arcface,triplet")
    parser.add_argument("--augments", default="single_crop,multi_crop")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--size", default="small", help="synthetic size (tiny, small, ...)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    data = CachedImages(SyntheticCraters(size=args.size, image_size=64, seed=args.seed))
    n_train = len(data.records("train"))
    print(
        f"synthetic {args.size}: {n_train} train images of "
        f"{len({r.crater_id for r in data.records('train')})} identities, "
        f"{len(data.records('query'))} queries, {len(data.records('gallery'))} gallery; "
        f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}"
    )
    before = retrieval_metrics(backbone(seed=args.seed), data, "cls")
    rows = []
    for loss in args.losses.split(","):
        for augment in args.augments.split(","):
            cfg = {
                "name": loss,
                "loss": LOSSES[loss],
                "epochs": args.epochs,
                "lr": args.lr,
                "head_lr": 1e-2,
                "batch_size": 32,
                "augment": augment,
                "global_crops": 2,
                "local_crops": 2,
                "val_fraction": 0.0,
                "progress": False,
            }
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                checkpoint = finetune(
                    cfg, backbone(seed=args.seed), data, device="cpu", seed=args.seed, out_dir=tmp
                )
                seconds = time.perf_counter() - t0
                after = retrieval_metrics(backbone(str(checkpoint)), data, "cls")
            rows.append((loss, augment, before["mAP"], after["mAP"], after["R@1"], seconds))
            print(f"  {loss} {augment}: mAP {before['mAP']:.3f} -> {after['mAP']:.3f}", flush=True)

    print()
    print("| loss | augment | test mAP before | after | ratio | R@1 after | train s |")
    print("|---|---|---|---|---|---|---|")
    for loss, augment, b, a, r1, s in rows:
        print(f"| {loss} | {augment} | {b:.3f} | {a:.3f} | {a / b:.2f}x | {r1:.3f} | {s:.0f} |")
    print(f"\nbefore (random init): R@1 {before['R@1']:.3f}, mAP {before['mAP']:.3f}")


if __name__ == "__main__":
    main()
