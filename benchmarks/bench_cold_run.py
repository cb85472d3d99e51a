"""The default run's cold feature extraction, before and after each speed-up, side by side.

    python benchmarks/bench_cold_run.py                 # 96 gallery images of synthetic 'small'
    python benchmarks/bench_cold_run.py --images 300 --repeats 3
    python benchmarks/bench_cold_run.py --whole-run     # also time `python -m craterlab` cold

A cold run has no cached features, so it renders every synthetic image, transforms it and runs
ViT-S/16 over it. Measured in one process, configurations interleaved per repeat (so drift on
a shared machine hits all alike), each from an empty feature cache:

- ``before``: fp32, images rendered and transformed between forward passes (the old default);
- ``bf16``: the forward under bf16 autocast (what ``precision=auto`` picks where the probe
  measured it faster; the probe's verdict is printed);
- ``bf16+overlap``: plus decoding in a background thread while the forward runs;
- ``bf16+overlap+renders``: plus images read from the render cache (what every run after the
  first one on a machine does).

Reports the median seconds per configuration, its speed-up over ``before``, CPU seconds, and
the spread (max/min over repeats) as a noise figure. ``--whole-run`` also runs the default
experiment in a subprocess twice, with an empty feature cache: first with no render cache
(the first run on a machine), then with the renders cached.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from craterlab.backbones import extract, timm_vit  # noqa: E402
from craterlab.data.synthetic import SyntheticCraters  # noqa: E402
from craterlab.devices import cpu_flags, resolve_precision  # noqa: E402
from craterlab.precision_probe import bf16_pays  # noqa: E402

CONFIGS = ("before", "bf16", "bf16+overlap", "bf16+overlap+renders")
REAL_PREFETCH = extract.prefetch


def no_prefetch(items: Iterator, depth: int = 2) -> Iterator:  # type: ignore[type-arg]
    return iter(items)


class Subset:
    """The first ``n`` gallery images of a dataset (the same images for every configuration)."""

    def __init__(self, dataset: SyntheticCraters, n: int) -> None:
        self.dataset, self.n, self.name = dataset, n, f"{dataset.name}-first{n}"

    def records(self, split: str):  # type: ignore[no-untyped-def]
        return list(self.dataset.records("gallery"))[: self.n] if split == "gallery" else []

    def load_image(self, record):  # type: ignore[no-untyped-def]
        return self.dataset.load_image(record)

    def identity(self) -> str:
        return f"{self.dataset.identity()}-first{self.n}"


def one(config: str, n: int, renders: Path, batch: int) -> tuple[float, float]:
    """(wall s, CPU s) of extracting ``n`` images cold in ``config``."""
    precision = "fp32" if config == "before" else "bf16"
    backbone = timm_vit("vit_small_patch16_224", weights="random", precision=precision)
    dataset = SyntheticCraters("small")
    if config.endswith("renders"):
        dataset.cache_renders(renders)
    extract.prefetch = REAL_PREFETCH if "overlap" in config else no_prefetch
    try:
        w0, c0 = time.perf_counter(), time.process_time()
        extract.extract_features(
            backbone, Subset(dataset, n), "gallery", device="cpu", batch_size=batch, progress=False
        )
        return time.perf_counter() - w0, time.process_time() - c0
    finally:
        extract.prefetch = REAL_PREFETCH


def whole_run(cache: Path, out: Path) -> tuple[float, float]:
    """(wall s, CPU s) of `python -m craterlab` (default experiment) with an empty feature
    cache (the render cache under ``cache`` is kept); its log goes to ``out``/bench.log."""
    for entry in cache.glob("vit_*"):  # feature caches and their lock files
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    env = dict(os.environ, CRATERLAB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    out.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(out / "bench.log", "w") as log:
        subprocess.run(
            [sys.executable, "-m", "craterlab", f"hydra.run.dir={out}", "tracking=none"],
            env=env,
            check=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--whole-run", action="store_true")
    ap.add_argument(
        "--whole-run-only", action="store_true", help="time only the whole default run, cold"
    )
    ap.add_argument("--keep", help="keep the runs' directories (and bench.log) here")
    args = ap.parse_args()

    verdict = bf16_pays(cpu_flags())
    print(
        f"CPU bf16 flags: {sorted(cpu_flags() & {'avx512_bf16', 'amx_bf16', 'bf16'}) or 'none'}; "
        f"precision=auto -> {resolve_precision('auto', torch.device('cpu'))}"
        + (f" ({verdict.describe()})" if verdict else "")
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.whole_run_only:
            report_whole_run(Path(args.keep or tmp))
            return
        renders = Path(tmp) / "renders"
        warm = SyntheticCraters("small")
        warm.cache_renders(renders)
        for r in list(warm.records("gallery"))[: args.images]:
            warm.load_image(r)  # fill the render cache once, as a first run would
        times: dict[str, list[tuple[float, float]]] = {c: [] for c in CONFIGS}
        one("bf16", 8, renders, 8)  # warm-up: model creation paths, oneDNN primitives
        for _ in range(args.repeats):
            for config in CONFIGS:
                times[config].append(one(config, args.images, renders, args.batch_size))
        base = statistics.median(w for w, _ in times["before"])
        print(f"\n{args.images} images, batch {args.batch_size}, {args.repeats} repeats\n")
        print("| configuration | s (median) | img/s | speed-up | CPU s | spread max/min |")
        print("|---|---|---|---|---|---|")
        for config, ts in times.items():
            wall = statistics.median(w for w, _ in ts)
            cpu = statistics.median(c for _, c in ts)
            spread = max(w for w, _ in ts) / min(w for w, _ in ts)
            print(
                f"| {config} | {wall:.2f} | {args.images / wall:.1f} | {base / wall:.2f}x "
                f"| {cpu:.1f} | {spread:.2f} |"
            )
        if args.whole_run:
            report_whole_run(Path(args.keep or tmp))


def report_whole_run(root: Path) -> None:
    """The default run twice from an empty feature cache: with no rendered images (the first
    run on a machine), then with the renders cached. Wall and CPU seconds, and the load."""
    cache = root / "cache"
    load0 = os.getloadavg()
    first = whole_run(cache, root / "run1")
    second = whole_run(cache, root / "run2")
    print(
        f"\nwhole default run (`python -m craterlab tracking=none`), empty feature cache:\n"
        f"  no rendered images: {first[0]:.1f} s wall, {first[1]:.1f} s CPU\n"
        f"  renders cached:     {second[0]:.1f} s wall, {second[1]:.1f} s CPU\n"
        f"  load average before {load0}, after {os.getloadavg()}; logs in {root}/run*/bench.log"
    )


if __name__ == "__main__":
    main()
