"""Milliseconds per image of instance-token aggregation (K=32 over 196 x 384 tokens).

Compares attention seeds and farthest-point-sampling seeds at batch 32 and batch 250,
interleaved in one run (medians over rounds). Measured earlier on a 2-core CPU:
attention seeds 0.19-0.22 ms/image, FPS 0.33-0.44 ms/image, batches of ~32 beating 250.

    python benchmarks/bench_tokens.py [--device cpu|cuda] [--images 500] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from craterlab.tokens.aggregation import InstanceAggregator
from craterlab.tokens.baselines import KMeansAggregator
from craterlab.types import Features

TARGETS = {"attention": "0.19-0.22", "fps": "0.33-0.44", "kmeans (20 it)": "-"}


def make_features(n: int, device: str, seed: int = 0) -> Features:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, 196, 384, generator=g)
    attn = torch.rand(n, 196, generator=g).softmax(-1)
    return Features(torch.randn(n, 384, generator=g), tokens, attn, (14, 14)).to(device)


def ms_per_image(method, features: Features, batch: int, device: str) -> tuple[float, float]:
    """(wall, process CPU) milliseconds per image over all images, in batches."""
    n = len(features)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    for s in range(0, n, batch):
        method(features[s : s + batch])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / n, (time.process_time() - cpu) * 1e3 / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--kmeans", action="store_true", help="also time per-image K-means")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    features = make_features(args.images, args.device)
    methods = {
        "attention": InstanceAggregator(k=32, seeds="attention"),
        "fps": InstanceAggregator(k=32, seeds="fps"),
    }
    if args.kmeans:
        methods["kmeans (20 it)"] = KMeansAggregator(k=32, iters=20)
    batches = (32, 250)
    for m in methods.values():  # warm-up
        ms_per_image(m, features[:64], 32, args.device)
    times: dict[tuple[str, int], list[tuple[float, float]]] = {
        (m, b): [] for m in methods for b in batches
    }
    for _ in range(args.rounds):  # interleaved, so drift hits every variant alike
        for name, m in methods.items():
            for b in batches:
                times[(name, b)].append(ms_per_image(m, features, b, args.device))

    def med(name: str, b: int, which: int) -> float:
        return statistics.median(t[which] for t in times[(name, b)])

    print(
        f"device={args.device} threads={torch.get_num_threads()} images={args.images} "
        f"rounds={args.rounds} K=32 T=196 D=384; medians in ms per image: wall clock, and "
        "process CPU time (less inflated by other processes sharing the cores)"
    )
    print(
        f"{'seeds':<16}{'wall b32':>10}{'wall b250':>10}{'cpu b32':>9}{'cpu b250':>10}"
        f"{'b250/b32':>10}{'vs attn':>9}{'target wall (2-core CPU)':>26}"
    )
    base = med("attention", 32, 0)
    for name in methods:
        w32, w250 = med(name, 32, 0), med(name, 250, 0)
        c32, c250 = med(name, 32, 1), med(name, 250, 1)
        print(
            f"{name:<16}{w32:>10.3f}{w250:>10.3f}{c32:>9.3f}{c250:>10.3f}"
            f"{w250 / w32:>10.2f}{w32 / base:>9.2f}{TARGETS[name]:>26}"
        )


if __name__ == "__main__":
    main()
