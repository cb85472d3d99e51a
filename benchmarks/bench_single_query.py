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

``--store DIR`` writes the gallery to DIR in chunks (int8 codes, scales and single vectors as
``.npy``; skipped when present) and memory-maps it, so a million items (12.3 GB of codes) need
no RAM for the store: the rerank reads candidates' rows from the mapped file. The exact
pipeline (for the recall column) then runs stage 1 as a chunked matmul on the vectors, and the
Flat rows are measured batched only (``--flat-single`` times them one query at a time too).

    python benchmarks/bench_single_query.py --gallery 1000000 --store /tmp/sq1m --queries 200

Every single-query call is timed on both clocks: wall (what a user waits) and the calling
thread's CPU time (what other processes on a shared machine barely change).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import faiss
import numpy as np
import torch
from bench_retrieval import _unit, families

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
    ap.add_argument("--store", help="write/map the gallery here (chunked .npy memory maps)")
    ap.add_argument("--write-only", action="store_true", help="write the --store and stop")
    ap.add_argument("--flat-single", action="store_true", help="time Flat one query at a time")
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
    if args.store:
        t0 = time.perf_counter()
        codes, scales, vec, qtok = mapped_families(Path(args.store), ng, nq)
        print(f"store {args.store}: {time.perf_counter() - t0:.0f} s to write or open it")
        if args.write_only:
            return
    else:
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
    flat_single = args.flat_single or not args.store
    t0 = CLOCK()
    # the exact stage 1: FAISS Flat in RAM, or (mapped store) a chunked matmul on the vectors
    exact_index = (
        V.SingleVectorIndex("torch", chunk=8) if args.store else V.SingleVectorIndex("Flat")
    )
    indexes = {"Flat": exact_index.build(vec)}
    build = {"Flat": CLOCK() - t0}
    t0 = CLOCK()
    indexes["auto"] = V.SingleVectorIndex("auto").build(vec)
    build["auto"] = CLOCK() - t0
    if indexes["auto"].spec == "Flat":  # below 50,000: show what HNSW32 would give
        t0 = CLOCK()
        indexes["HNSW32"] = V.SingleVectorIndex("HNSW32").build(vec)
        build["HNSW32"] = CLOCK() - t0
    all_threads = faiss.omp_get_max_threads()
    flat_name = "Flat" if not args.store else "exact (torch matmul)"

    def flat_all(x: torch.Tensor) -> torch.Tensor:
        real = V.search_threads
        V.search_threads = lambda n: all_threads  # type: ignore[assignment]
        try:
            return indexes["Flat"].search(x, s)[1]
        finally:
            V.search_threads = real  # type: ignore[assignment]

    stage1 = {
        f"stage 1 {flat_name}, {all_threads} threads": flat_all,
        **(
            {
                "stage 1 Flat, threads by batch (1 for one query)": lambda x: indexes[
                    "Flat"
                ].search(x, s)[1]
            }
            if not args.store
            else {}
        ),
        **{
            f"stage 1 {name} ({indexes[name].spec})": (lambda x, n=name: indexes[n].search(x, s)[1])
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

    whole = {
        f"two-stage, stage 1 {flat_name}": two_stage("Flat"),
        f"two-stage, stage 1 auto ({indexes['auto'].spec})": two_stage("auto"),
    }
    exact = two_stage("Flat")(0, nq)
    batched: dict[str, list[float]] = {}
    single: dict[str, list[float]] = {}
    single_cpu: dict[str, list[float]] = {}
    recall: dict[str, float] = {}

    def time_single(name: str, fn, i: int) -> None:  # type: ignore[no-untyped-def]
        w0, c0 = time.perf_counter(), time.thread_time()
        fn(i)
        c1, w1 = time.thread_time(), time.perf_counter()
        single.setdefault(name, []).append((w1 - w0) * 1e3)
        single_cpu.setdefault(name, []).append((c1 - c0) * 1e3)

    per_round = nq // args.rounds
    for r in range(args.rounds):
        picks = range(r * per_round, (r + 1) * per_round)  # distinct queries in each round
        for name, fn in stage1.items():
            t0 = CLOCK()
            fn(qvec)
            batched.setdefault(name, []).append((CLOCK() - t0) / nq * 1e3)
            if "exact" in name or ("Flat" in name and not flat_single):
                continue
            for i in picks:
                time_single(name, lambda i, fn=fn: fn(qvec[i : i + 1]), i)
        for name, fn in whole.items():
            t0 = CLOCK()
            top = fn(0, nq)
            batched.setdefault(name, []).append((CLOCK() - t0) / nq * 1e3)
            hits = [
                len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(top, exact, strict=True)
            ]
            recall[name] = sum(hits) / len(hits)
            if ("exact" in name or "Flat" in name) and not flat_single:
                continue
            for i in picks:
                time_single(name, lambda i, fn=fn: fn(i, i + 1), i)
    print(
        f"gallery {ng:,} (single vectors 384-d; token sets 32 x 384 int8_image"
        f"{', memory-mapped from ' + args.store if args.store else ''}), {nq} queries, "
        f"S={s}, torch {torch.get_num_threads()} threads, FAISS {all_threads} threads "
        f"(a search of <= {V.FEW_QUERIES} queries: 1), fused rerank "
        f"{'on' if fused.available('int8_image') else 'off'}; batched on "
        f"{'CPU time of one thread' if args.cpu else 'wall clock'}; build s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in build.items())
        + "\n\n| variant | batched ms/query | single p50 ms (wall) | single p95 ms (wall) | "
        "single p50 / p95 ms (thread CPU) | recall of exact top-10 | spread max/min (batched) |"
        "\n|---|---|---|---|---|---|---|"
    )
    for name in batched:
        b, w, c = batched[name], single.get(name), single_cpu.get(name)
        sw = f"{statistics.median(w):.3f} | {pct(w, 0.95):.3f}" if w else "- | -"
        sc = f"{statistics.median(c):.3f} / {pct(c, 0.95):.3f}" if c else "-"
        print(
            f"| {name} | {statistics.median(b):.3f} | {sw} | {sc} "
            f"| {recall.get(name, float('nan')):.3f} | {max(b) / min(b):.2f} |"
        )
    print(f"\nload average before {load0}, after {os.getloadavg()}")


def mapped_families(
    root: Path, ng: int, nq: int, k: int = 32, d: int = 384, family: int = 50, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The families gallery of ``ng`` items written to ``root`` in chunks (once) and mapped:
    int8 codes (ng, k, d) with per-image scales (ng, 1), single vectors (ng, d) in RAM, and
    the queries' tokens (nq, k, d). Prototypes are drawn per chunk of families from a seed, so
    neither the float gallery nor all prototypes are ever in memory at once."""
    done = root / "done.json"
    meta = {"n": ng, "queries": nq, "k": k, "d": d, "family": family, "seed": seed}
    if not done.exists() or json.loads(done.read_text()) != meta:
        root.mkdir(parents=True, exist_ok=True)
        codes = np.lib.format.open_memmap(root / "codes.npy", "w+", np.int8, (ng, k, d))
        scales = np.lib.format.open_memmap(root / "scales.npy", "w+", np.float32, (ng, 1))
        vecs = np.lib.format.open_memmap(root / "vectors.npy", "w+", np.float32, (ng, d))
        g = torch.Generator().manual_seed(seed)
        chunk = 100 * family  # whole families per chunk: a chunk's prototypes are its own
        kept: list[torch.Tensor] = []  # prototypes of the first families: the queries' sources
        want = max(4 * nq, 2000)
        t0 = time.perf_counter()
        for c in range(0, ng, chunk):
            n = min(chunk, ng - c)
            proto = _unit(torch.randn(-(-n // family), k, d, generator=g))
            fam = torch.arange(n) // family
            sigma = 0.02 + 0.28 * torch.rand(n, 1, 1, generator=g)
            x = torch.randn(n, k, d, generator=g).mul_(sigma).add_(proto[fam])
            x.div_(x.norm(dim=-1, keepdim=True))
            vecs[c : c + n] = _unit(x.mean(1)).numpy()
            # quantize_int8_per_image's arithmetic, in place (a third of the time here)
            sc = x.abs().amax(dim=(1, 2)) / 127.0
            safe = torch.where(sc > 0, sc, torch.ones_like(sc))
            cc = x.div_(safe[:, None, None]).round_().clamp_(-127, 127).to(torch.int8)
            codes[c : c + n], scales[c : c + n, 0] = cc.numpy(), sc.numpy()
            if (have := sum(len(p) for p in kept)) < want:
                kept.append(proto[: want - have].clone())
            if (c // chunk) % 50 == 0:
                print(f"  wrote {c + n:,}/{ng:,} ({time.perf_counter() - t0:.0f} s)", flush=True)
        protos = torch.cat(kept)
        src = torch.randint(0, len(protos), (nq,), generator=g)
        q = _unit(protos[src] + 0.05 * torch.randn(nq, k, d, generator=g))
        for a in (codes, scales, vecs):
            a.flush()
        del codes, scales, vecs
        torch.save(q, root / "queries.pt")
        done.write_text(json.dumps(meta))
    with warnings.catch_warnings():  # read-only maps: torch warns they are not writable
        warnings.simplefilter("ignore")
        codes_t = torch.from_numpy(np.load(root / "codes.npy", mmap_mode="r"))
        scales_t = torch.from_numpy(np.load(root / "scales.npy"))
        vecs_t = torch.from_numpy(np.load(root / "vectors.npy"))
    return codes_t, scales_t, vecs_t, torch.load(root / "queries.pt")


if __name__ == "__main__":
    main()
