"""The two-stage rerank: fused C kernel vs the blocked torch path vs PyLate, against the machine.

    python benchmarks/bench_rerank.py                      # 50,000 x 32 x 384, S=100 and 500
    python benchmarks/bench_rerank.py --gallery 20000 --queries 100 --rounds 5

Measured in one process, variants interleaved per round (medians; the spread max/min over
rounds says how noisy the machine was):

- machine limits: fp32 and bf16 matmul GFLOP/s, int8 ``torch._int_mm`` GOP/s (1024 x 384 x
  1024, best of at least 10 rounds) and memory bandwidth (a 256 MB copy, GB/s read + written);
- by default everything runs on ONE thread and is timed in that thread's CPU time
  (``time.thread_time``): on a shared machine other processes then barely move the figures,
  and limits and kernels are measured alike (per core). ``--wall`` times wall clock on all
  threads instead (the engine's worker pool), which is what a quiet machine delivers;
- per S (100, 500): ms/query batched (all queries in one call) and single-query p50/p95 (one
  query per call) of the int8_image, int8 and bf16 kernels, fused (:mod:`craterlab.retrieval.
  fused`) and blocked (``fused=False``), and PyLate's ``colbert_scores`` (fp32, the query
  against its gathered candidates: the peer's own scoring function, installed with
  ``pip install --no-deps pylate``; its ``pylate.utils`` package, which imports transformers,
  is bypassed, only ``utils.tensor`` is used);
- each batched figure as a share of its compute lower bound (2 S K Kq D operations per query
  at the matching peak: int8 for int8 kernels, bf16, fp32 for PyLate) and the top-10 agreement
  with an fp64 reference on the same candidates.

maxsim-cpu is left out: it segfaults at 32 x 32 x 384 and gives wrong scores when torch is
imported first (reported in issue 25), and this benchmark imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import statistics
import sys
import time
import types
from collections.abc import Callable

import torch

from craterlab.retrieval import cpu_engine as E
from craterlab.retrieval import fused
from craterlab.retrieval.quantizers import quantize_int8, quantize_int8_per_image
from craterlab.types import Tokens


def pylate_scores() -> Callable | None:  # type: ignore[type-arg]
    """PyLate's colbert_scores, or None when pylate is not installed."""
    try:
        pylate = importlib.import_module("pylate")
    except ImportError:
        return None
    utils = types.ModuleType("pylate.utils")  # skip pylate/utils/__init__ (transformers)
    utils.__path__ = [str(pathlib.Path(pylate.__file__).parent / "utils")]
    sys.modules.setdefault("pylate.utils", utils)
    return importlib.import_module("pylate.scores").colbert_scores


CLOCK = time.perf_counter


def best_of(fn: Callable[[], object], rounds: int) -> float:
    fn()
    out = []
    for _ in range(rounds):
        t0 = CLOCK()
        fn()
        out.append(CLOCK() - t0)
    return min(out)


def limits(rounds: int) -> dict[str, float]:
    """fp32/bf16 GFLOP/s, int8 GOP/s, memory GB/s on all threads (best of ``rounds``)."""
    n = 1024
    a, b = torch.randn(n, 384), torch.randn(384, n)
    ab, bb = a.bfloat16(), b.bfloat16()
    ai = torch.randint(-127, 127, (n, 384), dtype=torch.int8)
    bi = torch.randint(-127, 127, (n, 384), dtype=torch.int8).T
    ops = 2 * n * n * 384
    big = torch.empty(64 * 2**20)
    dst = torch.empty_like(big)
    return {
        "fp32": ops / best_of(lambda: a @ b, rounds) / 1e9,
        "bf16": ops / best_of(lambda: ab @ bb, rounds) / 1e9,
        "int8": ops / best_of(lambda: torch._int_mm(ai, bi), rounds) / 1e9,
        "mem": 2 * big.numel() * 4 / best_of(lambda: dst.copy_(big), rounds) / 1e9,
    }


def make_gallery(ng: int, k: int, d: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """int8 (per image, per token) and bf16 stores of random unit tokens, built in chunks."""
    g = torch.Generator().manual_seed(seed)
    img = (torch.empty(ng, k, d, dtype=torch.int8), torch.empty(ng, 1))
    tok = (torch.empty(ng, k, d, dtype=torch.int8), torch.empty(ng, k))
    bf = torch.empty(ng, k, d, dtype=torch.bfloat16)
    for c in range(0, ng, 4096):
        x = torch.nn.functional.normalize(torch.randn(min(4096, ng - c), k, d, generator=g), dim=-1)
        img[0][c : c + len(x)], img[1][c : c + len(x)] = quantize_int8_per_image(x)
        tok[0][c : c + len(x)], tok[1][c : c + len(x)] = quantize_int8(x)
        bf[c : c + len(x)] = x.bfloat16()
    return img, tok, bf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gallery", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--single", type=int, default=40, help="single-query calls per variant")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--wall",
        action="store_true",
        help="wall clock on all threads (default: one thread, timed in its own CPU time, which "
        "other processes on a shared machine barely change)",
    )
    args = ap.parse_args()
    ng, nq, k, d = args.gallery, args.queries, args.k, args.dim
    global CLOCK
    if not args.wall:
        torch.set_num_threads(1)
        CLOCK = time.thread_time
    workers = torch.get_num_threads()
    load0 = os.getloadavg()
    peak = limits(max(10, 3 * args.rounds))  # limits: best of many (one slow round misleads)
    (ic, isc), (tc, tsc), bf = make_gallery(ng, k, d)
    g = torch.Generator().manual_seed(1)
    # queries: noisy copies of gallery items (so the top of each shortlist is meaningful)
    base = torch.randint(0, ng, (nq,), generator=g)
    q = torch.nn.functional.normalize(
        bf[base].float() + 0.5 * torch.randn(nq, k, d, generator=g) / d**0.5, dim=-1
    )
    queries = Tokens(q)
    colbert = pylate_scores()
    stores = {
        "int8_image": E.GalleryCodes(ic, isc),
        "int8": E.GalleryCodes(tc, tsc),
        "bf16": E.GalleryCodes(bf),
    }
    clock = "wall clock" if args.wall else "one thread, its CPU time"
    print(
        f"gallery {ng} x {k} x {d}, {nq} queries, {workers} threads ({clock}), fused kernel: "
        + ", ".join(f"{n} {'on' if fused.available(n) else 'off'}" for n in stores)
        + f"; PyLate {'colbert_scores' if colbert else 'not installed'}; maxsim-cpu left out"
    )
    print(
        f"machine limits: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s, "
        f"int8 _int_mm {peak['int8']:.0f} GOP/s, memory {peak['mem']:.1f} GB/s"
    )
    for s in (100, 500):
        cand = torch.stack([torch.randperm(ng, generator=g)[:s] for _ in range(nq)])
        cand[:, 0] = base  # the true item is in every shortlist
        variants: dict[str, Callable[[Tokens, torch.Tensor], torch.Tensor]] = {}
        for name, codes in stores.items():
            kern = E.KERNELS[name]
            if fused.available(name):
                variants[f"{name} fused"] = lambda qq, cc, kern=kern, codes=codes: E.rerank(
                    kern, qq, codes, cc, workers
                )
            variants[f"{name} blocked"] = lambda qq, cc, kern=kern, codes=codes: E.rerank(
                kern, qq, codes, cc, workers, fused=False
            )
        if colbert is not None:
            variants["PyLate colbert_scores"] = lambda qq, cc: torch.stack(
                [colbert(qq.vectors[i : i + 1], bf[cc[i]].float())[0] for i in range(len(cc))]
            )
        ref = torch.stack(
            [
                (torch.einsum("id,sjd->sij", q[i].double(), bf[cand[i]].double())).amax(-1).mean(-1)
                for i in range(nq)
            ]
        )
        top_ref = ref.topk(10, dim=1).indices.sort(dim=1).values
        batched: dict[str, list[float]] = {v: [] for v in variants}
        single: dict[str, list[float]] = {v: [] for v in variants}
        agree: dict[str, float] = {}
        for fn in variants.values():
            fn(Tokens(q[:2]), cand[:2])  # warm-up (first build, thread pools)
        for _ in range(args.rounds):
            for name, fn in variants.items():
                t0 = CLOCK()
                out = fn(queries, cand)
                batched[name].append((CLOCK() - t0) / nq * 1e3)
                top = out.topk(10, dim=1).indices.sort(dim=1).values
                agree[name] = (top == top_ref).all(dim=1).float().mean().item()
                for i in range(args.single // args.rounds):
                    one = Tokens(q[i : i + 1])
                    t0 = CLOCK()
                    fn(one, cand[i : i + 1])
                    single[name].append((CLOCK() - t0) * 1e3)
        print(f"\nS={s}: ms/query (lower bound per query: int8 "
              f"{2 * s * k * k * d / peak['int8'] / 1e6:.3f}, bf16 "
              f"{2 * s * k * k * d / peak['bf16'] / 1e6:.3f}, fp32 "
              f"{2 * s * k * k * d / peak['fp32'] / 1e6:.3f})\n")  # fmt: skip
        print(
            "| variant | batched ms/query | % of bound | vs blocked int8_image | single p50 | "
            "single p95 | top-10 = fp64 | spread max/min |"
        )
        print("|---|---|---|---|---|---|---|---|")
        base_ms = statistics.median(batched["int8_image blocked"])
        for name, ts in batched.items():
            ms = statistics.median(ts)
            unit = "int8" if "int8" in name else "bf16" if "bf16" in name else "fp32"
            bound = 2 * s * k * k * d / peak[unit] / 1e6
            sq = sorted(single[name])
            p95 = sq[min(len(sq) - 1, int(round(0.95 * (len(sq) - 1))))]
            print(
                f"| {name} | {ms:.3f} | {100 * bound / ms:.0f}% | {base_ms / ms:.2f}x "
                f"| {statistics.median(sq):.3f} | {p95:.3f} | {agree[name]:.3f} "
                f"| {max(ts) / min(ts):.2f} |"
            )
    print(f"\nload average before {load0}, after {os.getloadavg()}")


if __name__ == "__main__":
    main()
