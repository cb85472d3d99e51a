"""Synthetic benchmark generation speed: images/s per view kind and size, projected full scale.

    python benchmarks/bench_synthetic.py [--n 40] [--image-size 224]

Renders interleaved gallery (2x, 3x) and query views of the full-scale catalogue (25,000
identities) in one process, then times the catalogue/records build per size, and projects the
time to render the full benchmark (50,000 gallery + 5,000 query images) on 1 and N processes.
Target: the full set renders in well under an hour on a 2-core machine with 2 workers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from craterlab.data.synthetic import SIZES, SyntheticCraters  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40, help="images per view kind")
    ap.add_argument("--image-size", type=int, default=224)
    args = ap.parse_args()

    print("| size | identities | gallery | query | build catalogue + records (s) |")
    print("|---|---|---|---|---|")
    full = None
    for size in SIZES:
        t = time.perf_counter()
        ds = SyntheticCraters(size=size, image_size=args.image_size)
        g, q = ds.records("gallery"), ds.records("query")
        dt = time.perf_counter() - t
        print(f"| {size} | {ds.n_identities} | {len(g)} | {len(q)} | {dt:.2f} |")
        full = ds
    assert full is not None

    kinds = {
        "gallery 2x": [r for r in full.records("gallery") if r.view_type == "2x"][: args.n],
        "gallery 3x": [r for r in full.records("gallery") if r.view_type == "3x"][: args.n],
        "query": list(full.records("query"))[: args.n],
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(args.n):  # interleaved so machine drift hits every kind alike
        for kind, recs in kinds.items():
            t = time.perf_counter()
            full.load_image(recs[i])
            times[kind].append(time.perf_counter() - t)
    print(f"\n{args.image_size}x{args.image_size} px, one process, median of {args.n}:\n")
    print("| view | ms / image | images / s |")
    print("|---|---|---|")
    med = {k: statistics.median(v) for k, v in times.items()}
    for kind, m in med.items():
        print(f"| {kind} | {m * 1e3:.1f} | {1 / m:.1f} |")
    n_g, n_q = len(full.records("gallery")), len(full.records("query"))
    total = n_g / 2 * (med["gallery 2x"] + med["gallery 3x"]) + n_q * med["query"]
    cores = os.cpu_count() or 1
    print(
        f"\nprojected full scale ({n_g} gallery + {n_q} query): {total / 60:.1f} min on 1 "
        f"process, ~{total / 60 / cores:.1f} min with --workers {cores} (export also encodes JPEG)"
    )
    print(f"gallery 3x / 2x time ratio: {med['gallery 3x'] / med['gallery 2x']:.2f}")


if __name__ == "__main__":
    main()
