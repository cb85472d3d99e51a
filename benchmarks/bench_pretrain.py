"""In-domain self-supervised pretraining learns: DINO from random init vs random init vs SupCon.

A small timm ViT (``test_vit``: 6 blocks, width 64, patch 16; 96 px input, so 36 patch tokens)
is trained from random init for the same wall-clock budget (default 10 minutes) two ways:

- **DINO** (:func:`craterlab.train.pretrain.pretrain`, recipe
  :data:`craterlab.train.recipes.PRETRAIN_CPU_RECIPE`) on the synthetic benchmark's train-split
  images, labels unused;
- **SupCon fine-tuning** (:func:`craterlab.train.finetune.finetune`, the from-scratch recipe of
  ``bench_finetune.py``) on the same images with their crater labels;

then the test queries are ranked against the gallery (identities disjoint from training) with
GeM single vectors and with late interaction over K=32 instance tokens
(:func:`craterlab.train.evaluation.retrieval_suite`). The budget is turned into a step count by
timing 3 steps of each method first, so both get about the same minutes on this machine; the
table reports the minutes each actually took. Random init is the same architecture untouched.

    .venv/bin/python benchmarks/bench_pretrain.py                       # 10 min each, seed 0
    .venv/bin/python benchmarks/bench_pretrain.py --minutes 3 --seeds 0,1,2   # seed noise
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from craterlab.backbones import timm_vit  # noqa: E402
from craterlab.data.synthetic import SyntheticCraters  # noqa: E402
from craterlab.train.evaluation import retrieval_suite  # noqa: E402
from craterlab.train.finetune import finetune  # noqa: E402
from craterlab.train.pretrain import ImageSource, pretrain  # noqa: E402
from craterlab.train.recipes import from_scratch_config, pretrain_cpu_config  # noqa: E402

DATA = {"n_identities": 600, "n_query_craters": 30, "image_size": 96}
IMAGE_SIZE = 96
K = 32


class CachedImages:
    """The dataset with its images rendered once (training revisits them every step)."""

    def __init__(self, dataset: SyntheticCraters) -> None:
        self.dataset = dataset
        self.name = dataset.name
        self.image_size = dataset.image_size
        self.load_image = functools.lru_cache(maxsize=None)(dataset.load_image)

    def records(self, split: str):  # noqa: ANN201
        return self.dataset.records(split)

    def identity(self) -> str:
        return self.dataset.identity()


def backbone(weights: str = "random", seed: int = 0):  # noqa: ANN201
    return timm_vit("test_vit", weights=weights, seed=seed, image_size=IMAGE_SIZE, precision="fp32")


def run_dino(source: ImageSource, seed: int, steps: int, out: str) -> Path:
    cfg = pretrain_cpu_config(steps)
    return pretrain(cfg, backbone(seed=seed), source, device="cpu", seed=seed, out_dir=out)


def run_supcon(data: CachedImages, seed: int, steps: int, out: str) -> Path:
    cfg = from_scratch_config("supcon", "single_crop", epochs=1, steps_per_epoch=steps)
    return finetune(cfg, backbone(seed=seed), data, device="cpu", seed=seed, out_dir=out)


def seconds_per_step(fn, steps: int = 3) -> float:  # noqa: ANN001
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fn(steps, tmp)
        return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per method")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (noise: 0,1,2)")
    parser.add_argument("--methods", default="dino,supcon")
    parser.add_argument("--identities", type=int, default=DATA["n_identities"])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a shared, loaded machine 2 threads ran 4-6x slower)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    rows: dict[str, list[dict[str, float]]] = {"random init": []}
    for seed in seeds:
        data = CachedImages(
            SyntheticCraters(**{**DATA, "n_identities": args.identities}, seed=seed)
        )
        source = ImageSource(data, ["train"])
        t0 = time.perf_counter()
        for i in range(len(source)):
            source.grey(i)
        for split in ("gallery", "query"):
            for r in data.records(split):
                data.load_image(r)
        render = time.perf_counter() - t0
        print(
            f"seed {seed}: {len(source)} unlabeled train images "
            f"({len({r.crater_id for r in data.records('train')})} identities), "
            f"{len(data.records('query'))} queries, {len(data.records('gallery'))} gallery; "
            f"rendered in {render:.0f} s; torch threads {args.threads}",
            flush=True,
        )
        rows["random init"].append(
            {**retrieval_suite(backbone(seed=seed), data, K), "minutes": 0.0, "steps": 0}
        )
        print(f"  random init: {rows['random init'][-1]}", flush=True)
        for method in methods:
            if method == "dino":
                fn = functools.partial(run_dino, source, seed)
            elif method == "supcon":
                fn = functools.partial(run_supcon, data, seed)
            else:
                raise SystemExit(f"unknown method {method!r}: use dino, supcon")
            per_step = seconds_per_step(fn)
            steps = max(10, int(args.minutes * 60 / per_step))
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                checkpoint = fn(steps, tmp)
                minutes = (time.perf_counter() - t0) / 60
                trained = backbone(str(checkpoint), seed=seed)
                result = retrieval_suite(trained, data, K)
            label = {"dino": "DINO (unlabeled)", "supcon": "SupCon (labelled)"}[method]
            rows.setdefault(label, []).append({**result, "minutes": minutes, "steps": steps})
            print(f"  {label}: {rows[label][-1]} ({per_step:.2f} s/step)", flush=True)
            print(f"    weights: {trained.weights_status}", flush=True)

    def mean_sd(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

    base_gem = statistics.mean(r["gem_mAP"] for r in rows["random init"])
    base_li = statistics.mean(r["li_mAP"] for r in rows["random init"])
    print()
    print(f"test_vit {IMAGE_SIZE} px, {args.identities} identities, seeds {args.seeds}")
    print("| weights | GeM mAP | x random | LI K=32 mAP | x random | GeM R@1 | minutes | steps |")
    print("|---|---|---|---|---|---|---|---|")
    for label, runs in rows.items():
        gem = [r["gem_mAP"] for r in runs]
        li = [r["li_mAP"] for r in runs]
        print(
            f"| {label} | {mean_sd(gem)} | {statistics.mean(gem) / base_gem:.2f}x | "
            f"{mean_sd(li)} | {statistics.mean(li) / base_li:.2f}x | "
            f"{statistics.mean(r['gem_R@1'] for r in runs):.3f} | "
            f"{statistics.mean(r['minutes'] for r in runs):.1f} | "
            f"{statistics.mean(r['steps'] for r in runs):.0f} |"
        )


if __name__ == "__main__":
    main()
