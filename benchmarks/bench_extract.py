"""Feature-extraction throughput for ViT-S/16 (random weights; speed does not depend on them).

Measures, side by side in one run and for each forward precision (``--precision``, default
fp32 and bf16 autocast; ``auto`` is what the pipeline picks on the device), images per second of:
- model only: ``backbone.encode`` on a batch already on the device;
- decode + transform only: JPEG decode and the model's preprocessing (what DataLoader workers do);
- end to end: ``extract_features`` with a fresh cache directory (decode + transform + forward +
  fp16 cache write + manifest), with 0 workers and, where given, with DataLoader workers.

    python benchmarks/bench_extract.py                      # CPU (and CUDA if present)
    python benchmarks/bench_extract.py --images 4096 --batch-size 256 --workers 8 --device cuda
    python benchmarks/bench_extract.py --device cpu --precision fp32,bf16,fp16
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from craterlab.backbones import timm_vit  # noqa: E402
from craterlab.backbones.extract import extract_features  # noqa: E402
from craterlab.devices import resolve_precision  # noqa: E402
from craterlab.types import ImageRecord  # noqa: E402


def write_images(folder: Path, n: int, size: int = 256) -> None:
    """n synthetic crater-like JPEGs (a dark disc with a bright rim on noisy terrain)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cx, cy = rng.uniform(0.3, 0.7, 2) * size
        r = rng.uniform(0.15, 0.35) * size
        d = np.hypot(xx - cx, yy - cy)
        img = 120 + 20 * rng.standard_normal((size, size))
        img -= 60 * (d < r)
        img += 70 * np.exp(-(((d - r) / (0.08 * r)) ** 2))
        rgb = np.clip(np.repeat(img[..., None], 3, axis=2), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"{i:05d}.jpg", quality=90)


class JpegFolder:
    name = "bench"

    def __init__(self, folder: Path) -> None:
        self.paths = sorted(folder.glob("*.jpg"))

    def records(self, split: str) -> list[ImageRecord]:
        return [ImageRecord(p.stem, i, path=str(p)) for i, p in enumerate(self.paths)]

    def load_image(self, record: ImageRecord) -> Image.Image:
        with Image.open(record.path) as im:
            return im.convert("RGB")

    def identity(self) -> str:
        return f"bench-{len(self.paths)}-{time.time_ns()}"  # never a cache hit


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_only(backbone, device: torch.device, batch: int, repeats: int) -> float:
    x = torch.randn(batch, 3, 224, 224, device=device)
    backbone.encode(x)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        backbone.encode(x)
    sync(device)
    return batch * repeats / (time.perf_counter() - t0)


def decode_only(data: JpegFolder, backbone, n: int) -> float:
    records = data.records("gallery")[:n]
    t0 = time.perf_counter()
    for r in records:
        backbone.transform(data.load_image(r))
    return len(records) / (time.perf_counter() - t0)


def end_to_end(backbone, data, device, batch: int, workers: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        feats, info = extract_features(
            backbone,
            data,
            "gallery",
            device=device,
            batch_size=batch,
            num_workers=workers,
            cache_dir=cache,
            progress=False,
        )
        secs = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(info.path).iterdir())
    return len(feats) / secs, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="all", help="cpu, cuda or all (default)")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (GPU run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--precision", default="fp32,bf16", help="comma-separated: auto, fp32, bf16, fp16"
    )
    args = parser.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    backbones = {
        p: timm_vit("vit_small_patch16_224", "dino", weights="random", precision=p)
        for p in precisions
    }
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for dev in devices:
            device = torch.device(dev)
            gpu = device.type == "cuda"
            n = args.images or (4096 if gpu else 64)
            batch = args.batch_size or (256 if gpu else 32)
            workers = (
                args.workers
                if args.workers is not None
                else (min(8, os.cpu_count() or 1) if gpu else 0)
            )
            if len(list(Path(folder).glob("*.jpg"))) < n:
                write_images(Path(folder), n)
            data = JpegFolder(Path(folder))
            data.paths = data.paths[:n]
            dec_rate = decode_only(data, backbones[precisions[0]], min(n, 256))
            for name, backbone in backbones.items():
                backbone.to(device)
                used = resolve_precision(name, device)
                label = f"{name}->{used}" if name == "auto" else name
                model_rate = model_only(backbone, device, batch, args.repeats)
                e2e0, size = end_to_end(backbone, data, device, batch, 0)
                rows.append((dev, label, n, batch, 0, model_rate, dec_rate, e2e0, size))
                if workers > 0:
                    e2ew, size = end_to_end(backbone, data, device, batch, workers)
                    rows.append((dev, label, n, batch, workers, model_rate, dec_rate, e2ew, size))
    print(
        f"ViT-S/16 feature extraction, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} intra-op threads"
    )
    head = (
        f"{'device':6s} {'precision':>10s} {'images':>6s} {'batch':>5s} {'workers':>7s} "
        f"{'model img/s':>11s} "
        f"{'decode+tf img/s (1 proc)':>24s} {'end-to-end img/s':>16s} {'e2e/model':>9s} "
        f"{'cache MB':>8s}"
    )
    print(head)
    print("-" * len(head))
    for dev, prec, n, batch, w, m, d, e, size in rows:
        print(
            f"{dev:6s} {prec:>10s} {n:6d} {batch:5d} {w:7d} {m:11.1f} {d:24.1f} {e:16.1f} "
            f"{e / m:9.2f} {size / 2**20:8.1f}"
        )


if __name__ == "__main__":
    main()
