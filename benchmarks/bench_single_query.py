"""One query at a time: stage 1 by index and threads, and the whole two-stage search.

    python benchmarks/bench_single_query.py                   # 50,000 items, S=100
    python benchmarks/bench_single_query.py --gallery 20000 --queries 200

Interactive use (``search``, the Python API) sends one query per call, where a batched
benchmark hides per-call costs. Measured in one process, wall clock, variants interleaved per
round (``--cpu``: one thread, its CPU time); single-query p50/p95 over ``--queries`` calls
beside the batched ms/query of one call with all queries:

- stage 1 (top-S of single vectors): FAISS Flat on all threads, Flat on one thread (what
  :func:`~craterlab.retrieval.vector_index.search_threads` picks for a few queries), HNSW32, and
  ``index=auto`` (which picks by gallery size);
- the whole two-stage search of one query: stage 1 (Flat exact / auto) + the int8_image rerank
  of S=100 (fused kernel where available), with the recall of the exact pipeline's top-10
  (Flat stage 1, same rerank).

Data: the "families" gallery of ``bench_retrieval.py`` (noisy copies of prototype token sets,
K=32, D=384, int8 with per-image scales), single vectors the normalized token means; queries
are noisy copies of prototypes. (On pure random 384-d vectors every shortlist is a set of near
ties, and no approximate index reproduces an exact top-100: HNSW32 kept 23% of it.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import faiss
import torch
from bench_retrieval import families

from craterlab.retrieval import cpu_engine as E
from craterlab.retrieval import fused
from craterlab.retrieval import vector_index as V
from craterlab.retrieval.quantizers import quantize_int8_per_image
from craterlab.types import Tokens

CLOCK = time.perf_counter


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gallery", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--shortlist", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--cpu",
        action="store_true",
        help="one thread everywhere, timed in its own CPU time (other processes on a shared "
        "machine then barely move the figures; per-core cost, not latency)",
    )
    args = ap.parse_args()
    global CLOCK
    if args.cpu:
        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)
        CLOCK = time.thread_time
    ng, nq, s = args.gallery, args.queries, args.shortlist
    load0 = os.getloadavg()
    gal, qry = families(ng, nq, 32, 384)
    codes, scales = torch.empty(ng, 32, 384, dtype=torch.int8), torch.empty(ng, 1)
    for c in range(0, ng, 4096):
        codes[c : c + 4096], scales[c : c + 4096] = quantize_int8_per_image(
            gal.vectors[c : c + 4096]
        )
    vec = torch.nn.functional.normalize(gal.vectors.mean(1), dim=-1)
    del gal
    qtok = qry.vectors
    qvec = torch.nn.functional.normalize(qtok.mean(1), dim=-1)
    store = E.GalleryCodes(codes, scales)
    kern = E.KERNELS["int8_image"]
    t0 = CLOCK()
    indexes = {"Flat": V.SingleVectorIndex("Flat").build(vec)}
    build = {"Flat": CLOCK() - t0}
    t0 = CLOCK()
    indexes["auto"] = V.SingleVectorIndex("auto").build(vec)
    build["auto"] = CLOCK() - t0
    if indexes["auto"].spec != "HNSW32":
        t0 = CLOCK()
        indexes["HNSW32"] = V.SingleVectorIndex("HNSW32").build(vec)
        build["HNSW32"] = CLOCK() - t0
    all_threads = faiss.omp_get_max_threads()

    def flat_all(x: torch.Tensor) -> torch.Tensor:
        real = V.search_threads
        V.search_threads = lambda n: all_threads  # type: ignore[assignment]
        try:
            return indexes["Flat"].search(x, s)[1]
        finally:
            V.search_threads = real  # type: ignore[assignment]

    stage1 = {
        f"Flat, {all_threads} threads": flat_all,
        "Flat, threads by batch (1 for one query)": lambda x: indexes["Flat"].search(x, s)[1],
        **{
            f"{name} ({indexes[name].spec})": (lambda x, n=name: indexes[n].search(x, s)[1])
            for name in indexes
            if name != "Flat"
        },
    }

    def two_stage(index: str):  # type: ignore[no-untyped-def]
        def run(i0: int, i1: int) -> torch.Tensor:
            cand = indexes[index].search(qvec[i0:i1], s)[1]
            scores = E.rerank(kern, Tokens(qtok[i0:i1]), store, cand, workers=0)
            return cand.gather(1, scores.topk(10, dim=1).indices)

        return run

    whole = {f"two-stage, stage 1 {name}": two_stage(name) for name in ("Flat", "auto")}
    exact = two_stage("Flat")(0, nq)
    batched: dict[str, list[float]] = {}
    single: dict[str, list[float]] = {}
    recall: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, fn in stage1.items():
            t0 = CLOCK()
            fn(qvec)
            batched.setdefault(name, []).append((CLOCK() - t0) / nq * 1e3)
            for i in range(nq // args.rounds):
                t0 = CLOCK()
                fn(qvec[i : i + 1])
                single.setdefault(name, []).append((CLOCK() - t0) * 1e3)
        for name, fn in whole.items():
            t0 = CLOCK()
            top = fn(0, nq)
            batched.setdefault(name, []).append((CLOCK() - t0) / nq * 1e3)
            hits = [
                len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top, exact, strict=True)
            ]
            recall[name] = sum(hits) / len(hits)
            for i in range(nq // args.rounds):
                t0 = CLOCK()
                fn(i, i + 1)
                single.setdefault(name, []).append((CLOCK() - t0) * 1e3)
    print(
        f"gallery {ng} (single vectors 384-d; token sets 32 x 384 int8_image), {nq} queries, "
        f"S={s}, torch {torch.get_num_threads()} threads, FAISS {all_threads} threads, fused "
        f"rerank {'on' if fused.available('int8_image') else 'off'}; build s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in build.items())
        + "\n\n| variant | batched ms/query | single p50 ms | single p95 ms | recall of exact "
        "top-10 | spread max/min (batched) |\n|---|---|---|---|---|---|"
    )
    for name in batched:
        b = batched[name]
        print(
            f"| {name} | {statistics.median(b):.3f} | {statistics.median(single[name]):.3f} "
            f"| {pct(single[name], 0.95):.3f} | {recall.get(name, float('nan')):.3f} "
            f"| {max(b) / min(b):.2f} |"
        )
    print(f"\nload average before {load0}, after {os.getloadavg()}")


if __name__ == "__main__":
    main()
