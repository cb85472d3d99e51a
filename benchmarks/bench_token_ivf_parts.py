"""Where a token IVF query's stage-1 time goes, per gallery size, for docs/multivector.md.

    python benchmarks/bench_token_ivf_parts.py --sizes 50000 200000 1000000 --lists 2048 \
        --coarse 1024 --sample-per-list 50

Reads the data and the two-level token IVFs that ``bench_multivector.py --grow-lists --coarse
C --sample-per-list S`` generated and cached (``outputs/bench_multivector/n<N>-int8``), and
times, one query at a time on one thread (best of ``--repeats`` passes over the queries,
since the machine is shared): scoring the coarse cells, probing the children of each token's
best ``--cell-probe`` cells (the C kernel on int8 rows), and the list score with its top-S
selection; with the postings the probed lists hold per query. The exact rerank is not
included (``bench_multivector.py`` times the whole search).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from craterlab.retrieval.generator_io import load_generator
from craterlab.retrieval.list_score import score_top_s
from craterlab.retrieval.stores import Int8Store
from craterlab.retrieval.token_ivf import TokenIvf, TokenIvfSettings

K, D = 32, 384


def parts(n: int, lists: int, args: argparse.Namespace) -> dict[str, float]:
    folder = Path(args.data) / f"n{n}-int8"
    codes = torch.from_numpy(np.load(folder / "codes.npy", mmap_mode="r+"))
    scales = torch.from_numpy(np.load(folder / "scales.npy", mmap_mode="r+"))
    store = Int8Store({"codes": codes, "scales": scales}, K, D)
    saved = folder / f"token_ivf-{lists}-c{args.coarse}-s{args.sample_per_list}"
    if not saved.is_dir():
        raise SystemExit(f"{saved} is missing: run bench_multivector.py with these settings")
    _, base = load_generator(saved, store)
    settings = TokenIvfSettings(
        lists=lists, fill="zero", coarse=args.coarse, cell_probe=args.cell_probe
    )
    ivf = TokenIvf.from_lists(
        base.centroids, base.list_ids.numpy(), base.offsets, base.ntotal, settings,
        cells=base.cells,
    )  # fmt: skip
    assert ivf.cells is not None
    queries = torch.load(folder / "queries.pt")["tokens"].float()
    ids = ivf.list_ids.numpy()
    best = {"cells": np.inf, "children": np.inf, "list score + top S": np.inf}
    postings = 0
    for _ in range(args.repeats):
        spent = dict.fromkeys(best, 0.0)
        postings = 0
        for q in queries:
            t0 = time.perf_counter()
            cells = (q @ ivf.cells.T).topk(args.cell_probe, dim=-1).indices
            t1 = time.perf_counter()
            vals, probes = ivf.probe_children(q, cells, args.nprobe)
            t2 = time.perf_counter()
            score_top_s(ivf.offsets, ids, n, probes.numpy(), vals.numpy(), args.shortlist)
            t3 = time.perf_counter()
            spent["cells"] += t1 - t0
            spent["children"] += t2 - t1
            spent["list score + top S"] += t3 - t2
            p = probes.numpy()
            postings += int((ivf.offsets[p + 1] - ivf.offsets[p]).sum())
        for key in best:
            best[key] = min(best[key], spent[key] / len(queries) * 1e3)
    return {**best, "postings": postings / len(queries)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    ap.add_argument("--lists", type=int, default=2048, help="lists at the first size")
    ap.add_argument("--coarse", type=int, default=1024)
    ap.add_argument("--sample-per-list", type=int, default=50)
    ap.add_argument("--cell-probe", type=int, default=4)
    ap.add_argument("--nprobe", type=int, default=4)
    ap.add_argument("--shortlist", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--data", default="outputs/bench_multivector")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()}")
    print("| N | lists | cells ms | children ms | list score + top S ms | total ms | postings |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        lists = args.lists * n // args.sizes[0]
        r = parts(n, lists, args)
        total = r["cells"] + r["children"] + r["list score + top S"]
        print(
            f"| {n:,} | {lists:,} | {r['cells']:.3f} | {r['children']:.3f} "
            f"| {r['list score + top S']:.3f} | {total:.3f} | {r['postings']:,.0f} |",
            flush=True,
        )
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
