"""In-domain self-supervised pretraining learns: DINO from random init vs random init vs SupCon.

A small timm ViT (``test_vit``: 6 blocks, width 64, patch 16; 96 px input, so 36 patch tokens)
starts from random init and is trained on the synthetic benchmark's train split
(200 identities by default, 660 images: each identity's two gallery crops and two query-like
views):

- **DINO** (:func:`craterlab.train.pretrain.pretrain`, recipe
  :data:`craterlab.train.recipes.PRETRAIN_CPU_RECIPE`) on the images alone, labels unused,
  for ``--steps`` optimizer steps;
- **DINO with paired views** (``dino_paired``: ``pretrain.pair_views=place``, the two global
  crops of a place from two of its renderings under different suns; in the synthetic set a
  place is the catalogue crater a rendering is aimed at), same recipe and steps;
- **DINO + iBOT** (``dino_ibot``, ``dino_paired_ibot``: ``pretrain.patch_loss=ibot``, the
  student also predicts the teacher's projected patch tokens at block-masked positions of its
  global crops; ``--patch-weight``, ``--mask-ratio``), same recipe and steps;
- **DINO + late-interaction contrast** (``dino_li``, ``dino_paired_li``:
  ``pretrain.token_loss=late_interaction``, the student's global crops scored against each
  other with late interaction, the crops of one place the positives of a softmax over the
  batch; ``--token-weight``, ``--token-temperature``), same recipe and steps;
- **SupCon fine-tuning** (:func:`craterlab.train.finetune.finetune`, the from-scratch recipe of
  ``bench_finetune.py``) on the same images with their crater labels, for the same wall-clock
  time as that seed's DINO run (its step count is set from 3 timed steps just before);

then the test queries (30 craters x 5 views) are ranked against the gallery (identities disjoint
from training) with GeM single vectors and with late interaction over K=32 instance tokens
(:func:`craterlab.train.evaluation.retrieval_suite`). Random init is the same architecture and
seed untouched; the seed changes the synthetic set and the init. The machine's load average is
printed with every result: wall times on a shared machine say little without it.

    .venv/bin/python benchmarks/bench_pretrain.py                   # 500 steps, seeds 0,1,2
    .venv/bin/python benchmarks/bench_pretrain.py --steps 1000 --methods dino --seeds 0
    .venv/bin/python benchmarks/bench_pretrain.py --methods dino_paired --steps 1600 --set lr=2e-3
    .venv/bin/python benchmarks/bench_pretrain.py --methods dino_paired,dino_paired_ibot \
        --steps 1600 --set lr=2e-3
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from craterlab.backbones import timm_vit  # noqa: E402
from craterlab.data.synthetic import SyntheticCraters  # noqa: E402
from craterlab.train.evaluation import retrieval_suite  # noqa: E402
from craterlab.train.finetune import finetune  # noqa: E402
from craterlab.train.pretrain import ImageSource, pretrain  # noqa: E402
from craterlab.train.recipes import from_scratch_config, pretrain_cpu_config  # noqa: E402

DATA = {"n_identities": 200, "n_query_craters": 30, "image_size": 96}
IMAGE_SIZE = 96
K = 32
METHODS = (
    "dino",
    "dino_paired",
    "dino_ibot",
    "dino_paired_ibot",
    "dino_li",
    "dino_paired_li",
    "supcon",
)
STEPS = 500
"""DINO steps of the default run: 12 minutes on this shared 2-core machine at load average 9.5
(three seeds at once, one torch thread each), about 3 minutes when it was quiet."""


class CachedImages:
    """The dataset with its images rendered once (training revisits them every step)."""

    def __init__(self, dataset: SyntheticCraters) -> None:
        self.dataset = dataset
        self.name = dataset.name
        self.image_size = dataset.image_size
        self.load_image = functools.lru_cache(maxsize=None)(dataset.load_image)

    def records(self, split: str):  # noqa: ANN201
        return self.dataset.records(split)

    def place_of(self, record):  # noqa: ANN001, ANN201
        return self.dataset.place_of(record)

    def place_xy(self, record):  # noqa: ANN001, ANN201
        return self.dataset.place_xy(record)

    def identity(self) -> str:
        return self.dataset.identity()


def synthetic(
    seed: int, identities: int = DATA["n_identities"], train_views: int = 2
) -> CachedImages:
    """The benchmark's synthetic set for ``seed`` (``train_views`` query-like renderings per
    train place besides its two gallery crops), every image rendered once."""
    data = CachedImages(
        SyntheticCraters(**{**DATA, "n_identities": identities}, train_views=train_views, seed=seed)
    )
    for split in ("train", "gallery", "query"):
        for r in data.records(split):
            data.load_image(r)
    return data


def backbone(weights: str = "random", seed: int = 0):  # noqa: ANN201
    return timm_vit("test_vit", weights=weights, seed=seed, image_size=IMAGE_SIZE, precision="fp32")


def run_dino(
    data: CachedImages,
    seed: int,
    steps: int,
    out: str,
    curve: int | None = None,
    **overrides: Any,
) -> Path:
    """DINO-pretrain the seed's random init on the unlabeled train split; the teacher's weights.
    ``overrides``: pretrain keys over the CPU recipe (``pair_views="place"``: paired views).
    ``curve``: also print the teacher's test metrics every ``curve`` steps (the schedule is
    the same; the run is cut into epochs of that length, so its batches are drawn otherwise,
    and its minutes include the evaluations)."""
    cfg = pretrain_cpu_config(steps, **overrides)
    evaluate = on_epoch_end = None
    if curve:
        cfg.update(epochs=steps // curve, steps_per_epoch=curve, eval_every=1)

        def evaluate(b):  # noqa: ANN001, ANN202
            return retrieval_suite(b, data, K)

        def on_epoch_end(epoch: int, m: dict[str, float]) -> None:
            shown = {k: round(m[k], 4) for k in ("loss", "gem_mAP", "li_mAP", "gem_R@1")}
            print(f"    step {epoch * curve}: {shown}", flush=True)

    source = ImageSource(data, ["train"])
    return pretrain(
        cfg,
        backbone(seed=seed),
        source,
        device="cpu",
        seed=seed,
        out_dir=out,
        evaluate=evaluate,
        on_epoch_end=on_epoch_end,
    )


def run_supcon(data: CachedImages, seed: int, steps: int, out: str) -> Path:
    cfg = from_scratch_config("supcon", "single_crop", epochs=1, steps_per_epoch=steps)
    return finetune(cfg, backbone(seed=seed), data, device="cpu", seed=seed, out_dir=out)


def trained_metrics(fn, steps: int, data: CachedImages) -> tuple[dict[str, float], Any]:  # noqa: ANN001
    """Train ``steps`` steps with ``fn(steps, out)``; test metrics on ``data`` with the minutes
    and the 5-minute load average at the end."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        checkpoint = fn(steps, tmp)
        minutes = (time.perf_counter() - t0) / 60
        trained = backbone(str(checkpoint))
        result = retrieval_suite(trained, data, K)
    load = os.getloadavg()[1]
    return {**result, "minutes": minutes, "steps": steps, "load": load}, trained.weights_status


def dino_vs_random(  # noqa: ANN201
    seed: int,
    steps: int,
    identities: int = DATA["n_identities"],
    train_views: int = 2,
    **overrides: Any,
):
    """(random-init metrics, DINO metrics, DINO weights status) of one seed: what the slow
    tests compare (``overrides``: pretrain keys, e.g. ``pair_views="place"``)."""
    data = synthetic(seed, identities, train_views)
    before = retrieval_suite(backbone(seed=seed), data, K)
    fn = functools.partial(run_dino, data, seed, **overrides)
    after, status = trained_metrics(fn, steps, data)
    return before, after, status


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pretrain overrides (numbers as numbers, 2e-3 too; else YAML: [0.4, 1.0])."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set takes key=value, got {pair!r}")
        try:
            out[key] = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            out[key] = yaml.safe_load(value)
    return out


def seconds_per_step(fn, steps: int = 3) -> float:  # noqa: ANN001
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fn(steps, tmp)
        return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="DINO optimizer steps")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument(
        "--methods",
        default="dino,supcon",
        help="dino, dino_paired (views of one place from two images: pair_views), dino_ibot, "
        "dino_paired_ibot (+ iBOT masked patch loss), dino_li, dino_paired_li (+ contrast "
        "over late-interaction scores), supcon",
    )
    parser.add_argument(
        "--token-weight", type=float, default=0.3, help="the *_li methods' pretrain.token_weight"
    )
    parser.add_argument(
        "--token-temperature",
        type=float,
        default=0.05,
        help="the *_li methods' pretrain.token_temperature",
    )
    parser.add_argument(
        "--patch-weight", type=float, default=1.0, help="the *_ibot methods' pretrain.patch_weight"
    )
    parser.add_argument(
        "--mask-ratio",
        default="0.1,0.5",
        help="the *_ibot methods' pretrain.mask_ratio (low,high share of a crop's patch tokens)",
    )
    parser.add_argument(
        "--patch-teacher-temp",
        type=float,
        default=None,
        help="the *_ibot methods' pretrain.patch_teacher_temp (default: the DINO teacher's)",
    )
    parser.add_argument(
        "--mask-share",
        type=float,
        default=0.5,
        help="the *_ibot methods' pretrain.mask_share (share of global crops masked)",
    )
    parser.add_argument("--identities", type=int, default=DATA["n_identities"])
    parser.add_argument(
        "--train-views",
        type=int,
        default=2,
        help="query-like renderings per train place besides its 2 gallery crops (all methods)",
    )
    parser.add_argument(
        "--pair",
        default="place",
        choices=["place", "coordinates"],
        help="dino_paired's pretrain.pair_views (coordinates needs --set pair_radius=R)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pretrain key over the CPU recipe for the DINO methods (repeatable)",
    )
    parser.add_argument(
        "--curve",
        type=int,
        default=None,
        metavar="N",
        help="DINO methods: print the teacher's test metrics every N steps (minutes include them)",
    )
    parser.add_argument(
        "--supcon-minutes",
        type=float,
        default=None,
        help="SupCon's budget when DINO is not run (default: the seed's DINO minutes)",
    )
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
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}: use {', '.join(METHODS)}")
    overrides = parse_overrides(args.set)
    ibot = {
        "patch_loss": "ibot",
        "patch_weight": args.patch_weight,
        "mask_ratio": [float(v) for v in args.mask_ratio.split(",")],
        "mask_share": args.mask_share,
        "patch_teacher_temp": args.patch_teacher_temp,
    }
    rows: dict[str, list[dict[str, float]]] = {"random init": []}
    for seed in seeds:
        t0 = time.perf_counter()
        data = synthetic(seed, args.identities, args.train_views)
        train = data.records("train")
        print(
            f"seed {seed}: {len(train)} unlabeled train images "
            f"({len({r.crater_id for r in train})} identities), {len(data.records('query'))} "
            f"queries, {len(data.records('gallery'))} gallery; rendered in "
            f"{time.perf_counter() - t0:.0f} s; torch threads {args.threads}",
            flush=True,
        )
        rows["random init"].append(
            {**retrieval_suite(backbone(seed=seed), data, K), "minutes": 0.0, "steps": 0}
        )
        print(f"  random init: {rows['random init'][-1]}", flush=True)
        dino_minutes = args.supcon_minutes
        for method in METHODS:
            if method not in methods:
                continue
            if method.startswith("dino"):
                keys = dict(overrides)
                label = "DINO"
                if "paired" in method:
                    keys["pair_views"] = args.pair
                    label += f", views paired by {args.pair}"
                if method.endswith("ibot"):
                    keys.update(ibot)
                    label += (
                        f" + iBOT x{args.patch_weight:g} (mask {args.mask_ratio}, "
                        f"share {args.mask_share:g}"
                        + (
                            f", patch teacher temp {args.patch_teacher_temp:g})"
                            if args.patch_teacher_temp
                            else ")"
                        )
                    )
                if method.endswith("_li"):
                    keys.update(
                        token_loss="late_interaction",
                        token_weight=args.token_weight,
                        token_temperature=args.token_temperature,
                    )
                    label += (
                        f" + LI contrast x{args.token_weight:g} "
                        f"(temperature {args.token_temperature:g})"
                    )
                fn = functools.partial(run_dino, data, seed, curve=args.curve, **keys)
                steps = args.steps
                label += " (unlabeled)"
            else:
                fn = functools.partial(run_supcon, data, seed)
                budget = 60 * (dino_minutes if dino_minutes is not None else 10.0)
                steps = max(10, int(budget / seconds_per_step(fn)))
                label = "SupCon (labelled)"
            result, status = trained_metrics(fn, steps, data)
            if method.startswith("dino") and dino_minutes is None:
                dino_minutes = result["minutes"]
            rows.setdefault(label, []).append(result)
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
            print(f"  {label}: {shown}\n    weights: {status}", flush=True)

    def mean_sd(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

    base = rows["random init"]
    print()
    print(f"test_vit {IMAGE_SIZE} px, {args.identities} identities, seeds {args.seeds}")
    print(
        "| weights | GeM mAP | x random | LI K=32 mAP | x random | GeM R@1 | minutes | steps "
        "| load |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, runs in rows.items():
        gem = [r["gem_mAP"] for r in runs]
        li = [r["li_mAP"] for r in runs]
        # the ratio per seed (same data and init), then averaged
        x_gem = statistics.mean(
            r["gem_mAP"] / b["gem_mAP"] for r, b in zip(runs, base, strict=True)
        )
        x_li = statistics.mean(r["li_mAP"] / b["li_mAP"] for r, b in zip(runs, base, strict=True))
        load = [r["load"] for r in runs if "load" in r]
        print(
            f"| {label} | {mean_sd(gem)} | {x_gem:.2f}x | {mean_sd(li)} | {x_li:.2f}x | "
            f"{statistics.mean(r['gem_R@1'] for r in runs):.3f} | "
            f"{statistics.mean(r['minutes'] for r in runs):.1f} | "
            f"{statistics.mean(r['steps'] for r in runs):.0f} | "
            f"{f'{statistics.mean(load):.1f}' if load else '-'} |"
        )


if __name__ == "__main__":
    main()
