"""Backbone precision on this machine: fp32 against bf16 autocast, speed and retrieval quality.

    python benchmarks/bench_precision.py                      # synthetic 'small', ViT-S/16
    python benchmarks/bench_precision.py --size tiny --repeats 2
    python benchmarks/bench_precision.py --override backbone=resnet50

Measures, side by side in one process:
- model img/s: ``backbone.encode`` on one batch of 32 (224 px), fp32 and bf16 interleaved
  ``--repeats`` times (median), so machine drift hits both alike;
- the default experiment (``craterlab.run``) on the synthetic benchmark once per precision,
  feature cache off: end-to-end extraction img/s (render + transform + forward) and the mAP of
  every retrieval mode, with the bf16 - fp32 difference.

What ``precision=auto`` picks here is printed with the probe's verdict
(:mod:`craterlab.precision_probe`: bf16 where the CPU has bf16 arithmetic and a one-thread
probe measured it at least 1.15x faster than fp32), so the mAP check below is the check of the
precision the default run actually uses.
Offline the backbone has random weights (``allow_random_weights``); the mAP difference then
measures how much bf16 rounding moves the rankings, not the pretrained model's quality.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from craterlab.devices import cpu_flags, resolve_precision  # noqa: E402
from craterlab.experiment import run  # noqa: E402
from craterlab.plugins import get_registry  # noqa: E402
from craterlab.precision_probe import bf16_pays  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf"
PRECISIONS = ("fp32", "bf16")


def compose_config(overrides: list[str]):  # type: ignore[no-untyped-def]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def model_rates(cfg, device: torch.device, batch: int, repeats: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Median img/s of ``encode`` per precision, the precisions interleaved per repeat."""
    backbones = {}
    for p in PRECISIONS:
        node = dict(cfg.backbone, precision=p)
        backbones[p] = get_registry().build("backbone", node, seed=0).to(device)
    size = backbones["fp32"].data_config["input_size"]
    x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(0)).to(device)
    for b in backbones.values():
        b.encode(x)  # warm-up (oneDNN primitive creation)
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for _ in range(repeats):
        for p, b in backbones.items():
            t0 = time.perf_counter()
            b.encode(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[p].append(time.perf_counter() - t0)
    return {p: batch / statistics.median(t) for p, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", help="synthetic benchmark size (tiny, small...)")
    ap.add_argument("--repeats", type=int, default=5, help="model-only timing repeats")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--override", action="append", default=[], help="extra Hydra override")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        base = [
            "dataset=synthetic",
            f"dataset.size={args.size}",
            f"device={args.device}",
            f"batch_size={args.batch_size}",
            "tracking=none",
            "cache.enabled=false",
            f"output_dir={tmp}/run",
            *args.override,
        ]
        cfg = compose_config(base)
        device = torch.device(args.device)
        rates = model_rates(cfg, device, args.batch_size, args.repeats)
        n_images = images_in(cfg)
        results, e2e = {}, {}
        for p in PRECISIONS:
            result = run(compose_config([*base, f"backbone.precision={p}"]))
            results[p] = result.results
            seconds = result.timings["encode_gallery_seconds"]
            seconds += result.timings["encode_query_seconds"]
            e2e[p] = n_images / seconds
            weights = result.weights_status

    amx = sorted(f for f in cpu_flags() if f.startswith("amx"))
    print(
        f"backbone {cfg.backbone.get('model', cfg.backbone.name)} [{weights.split(' (')[0]}], "
        f"synthetic '{args.size}' ({n_images} images), device {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU matrix units: {', '.join(amx) or 'none'}; "
        f"precision=auto -> {resolve_precision('auto', device)}"
        + (f" ({v.describe()})" if device.type == "cpu" and (v := bf16_pays(cpu_flags())) else "")
        + "\n"
    )
    print("| | fp32 | bf16 | bf16 / fp32 |")
    print("|---|---|---|---|")
    print(
        f"| model img/s (batch {args.batch_size}) | {rates['fp32']:.1f} | {rates['bf16']:.1f} "
        f"| {rates['bf16'] / rates['fp32']:.2f}x |"
    )
    print(
        f"| extraction img/s (end to end) | {e2e['fp32']:.1f} | {e2e['bf16']:.1f} "
        f"| {e2e['bf16'] / e2e['fp32']:.2f}x |"
    )
    print("\n| mode | mAP fp32 | mAP bf16 | difference |")
    print("|---|---|---|---|")
    for mode in results["fp32"]:
        a, b = results["fp32"][mode]["mAP"], results["bf16"][mode]["mAP"]
        print(f"| {mode} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")


def images_in(cfg) -> int:  # type: ignore[no-untyped-def]
    """Gallery + query images of the composed dataset."""
    dataset = get_registry().build("dataset", cfg.dataset)
    return len(dataset.records("gallery")) + len(dataset.records("query"))


if __name__ == "__main__":
    main()
