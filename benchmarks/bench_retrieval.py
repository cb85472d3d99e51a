"""Retrieval latency at the study's scale on synthetic tensors (craterlab issue 6).

    python benchmarks/bench_retrieval.py [--gallery 50000 --queries 5000 --dim 384 --k 32]

Prints ms per query for stage 1 (torch exact and FAISS Flat), the late-interaction rerank at
S=100 and S=500 (naive loop, plain fp32 bmm, INT8 codes scored with integer matmuls) and
exhaustive late interaction (fp32 tiled, INT8 tiled), each with the fraction of the matmul peak
measured in the same run (fp32 peak for fp32 variants, int8 ``_int_mm`` peak for INT8), ratios
against the naive loop and the fp32 bmm, and the top-10 agreement of INT8 direct scoring with
an fp64 reference. Slow variants run on a subset of the queries (printed). On CUDA (when
present) it also times exhaustive LI of all queries x all gallery images and two-stage S=100 in
fp16.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from craterlab.matching import LateInteraction, late_interaction_rerank, late_interaction_score
from craterlab.quantization import Int8Quantizer
from craterlab.retrieval import VectorIndex
from craterlab.types import Tokens


def timed(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of ``fn`` in seconds."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def peaks() -> tuple[float, float]:
    """(fp32 GFLOP/s, int8 GOP/s) of large matmuls on this machine, now."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    fp = 2 * 2048**3 / timed(lambda: a @ b, 5) / 1e9
    ai = torch.randint(-127, 127, (4096, 1024), dtype=torch.int8)
    bi = torch.randint(-127, 127, (1024, 2048), dtype=torch.int8)
    i8 = 2 * 4096 * 1024 * 2048 / timed(lambda: torch._int_mm(ai, bi), 5) / 1e9
    return fp, i8


def synthetic(ng: int, nq: int, k: int, d: int, seed: int = 0) -> tuple[Tokens, Tokens]:
    """Random unit tokens; queries are noisy copies of gallery images (so rankings mean
    something)."""
    g = torch.Generator().manual_seed(seed)
    gal = torch.empty(ng, k, d)
    for i in range(0, ng, 5000):
        x = torch.randn(min(5000, ng - i), k, d, generator=g)
        gal[i : i + len(x)] = torch.nn.functional.normalize(x, dim=-1)
    src = torch.randint(0, ng, (nq,), generator=g)
    q = gal[src] + 0.08 * torch.randn(nq, k, d, generator=g)
    return Tokens(gal), Tokens(torch.nn.functional.normalize(q, dim=-1))


def naive_rerank(q: Tokens, g: Tokens, cand: torch.Tensor) -> torch.Tensor:
    """One matmul per (query, candidate): the loop the study timed."""
    out = torch.empty(cand.shape)
    for i in range(cand.shape[0]):
        for j, c in enumerate(cand[i].tolist()):
            out[i, j] = (q.vectors[i] @ g.vectors[c].T).amax(1).mean()
    return out


def fp64_rerank(q: Tokens, g: Tokens, cand: torch.Tensor) -> torch.Tensor:
    out = torch.empty(cand.shape, dtype=torch.float64)
    for i in range(0, cand.shape[0], 20):
        gg = g.vectors[cand[i : i + 20]].double()  # (c, S, K, D)
        sim = torch.einsum("cqd,cskd->csqk", q.vectors[i : i + 20].double(), gg)
        out[i : i + 20] = sim.amax(-1).mean(-1)
    return out


def top10_agreement(a: torch.Tensor, b: torch.Tensor, cand: torch.Tensor) -> float:
    ta = cand.gather(1, a.topk(10, dim=1).indices).sort(1).values
    tb = cand.gather(1, b.topk(10, dim=1).indices).sort(1).values
    return (ta == tb).all(1).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gallery", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=5_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--rerank-queries", type=int, default=1000, help="queries for S=100/500")
    p.add_argument("--naive-queries", type=int, default=20)
    p.add_argument("--faiss-queries", type=int, default=1000)
    p.add_argument("--exhaustive-queries", type=int, default=4)
    a = p.parse_args()
    ng, nq, k, d = a.gallery, a.queries, a.k, a.dim
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; gallery {ng}, "
        f"queries {nq}, dim {d}, K={k}"
    )
    fp_peak, i8_peak = peaks()
    print(f"peak: fp32 matmul {fp_peak:.0f} GFLOP/s, int8 _int_mm {i8_peak:.0f} GOP/s")
    gal, qry = synthetic(ng, nq, k, d)
    gv = torch.nn.functional.normalize(gal.vectors.mean(1), dim=-1)
    qv = torch.nn.functional.normalize(qry.vectors.mean(1), dim=-1)
    store = Int8Quantizer(threads=2).encode(gal)
    store1 = Int8Quantizer(threads=1).encode(gal)
    rows: list[tuple[str, int, float, float]] = []  # name, queries, ms/query, peak fraction

    def add(name: str, n: int, seconds: float, flops: float, peak: float) -> float:
        ms = seconds * 1e3 / n
        rows.append((name, n, ms, flops * n / seconds / 1e9 / peak))
        return ms

    # Stage 1
    tidx = VectorIndex("torch", chunk=1000).build(gv)
    add(
        "stage1 torch exact (1000-query chunks)",
        nq,
        timed(lambda: tidx.search(qv, 500)),
        2 * ng * d,
        fp_peak,
    )
    fidx = VectorIndex("Flat").build(gv)
    nf = min(a.faiss_queries, nq)
    add("stage1 faiss Flat", nf, timed(lambda: fidx.search(qv[:nf], 500), 1), 2 * ng * d, fp_peak)
    _, short, _ = tidx.search(qv, 500)

    # Rerank
    li = LateInteraction("cpu")
    nr = min(a.rerank_queries, nq)
    qr = qry[:nr]
    agree = {}
    for s in (100, 500):
        cand = short[:nr, :s].contiguous()
        fl = 2 * s * k * k * d
        nn = min(a.naive_queries, nr)
        naive = add(
            f"rerank S={s} naive loop",
            nn,
            timed(lambda c=cand, m=nn: naive_rerank(qr[:m], gal, c[:m]), 1),
            fl,
            fp_peak,
        )  # noqa: B023,E501
        bmm = add(
            f"rerank S={s} fp32 gather+bmm",
            nr,
            timed(lambda c=cand: li.rerank(qr, gal, c), 1),
            fl,
            fp_peak,
        )  # noqa: B023,E501
        i8 = add(
            f"rerank S={s} int8 direct, 2 threads",
            nr,
            timed(lambda c=cand: store.li_rerank(qr, c), 1),
            fl,
            i8_peak,
        )  # noqa: B023,E501
        add(
            f"rerank S={s} int8 direct, 1 thread",
            nr,
            timed(lambda c=cand: store1.li_rerank(qr, c), 1),
            fl,
            i8_peak,
        )  # noqa: B023,E501
        print(
            f"S={s}: int8 direct is {naive / i8:.1f}x faster than the naive loop, "
            f"{bmm / i8:.1f}x faster than fp32 bmm; fp32 bmm is {naive / bmm:.1f}x the loop"
        )
        ref = fp64_rerank(qr, gal, cand)
        agree[s] = (
            top10_agreement(store.li_rerank(qr, cand), ref, cand),
            top10_agreement(late_interaction_rerank(qr, cand, gal), ref, cand),
        )

    # Exhaustive
    ne = min(a.exhaustive_queries, nq)
    fl = 2 * ng * k * k * d
    add(
        "exhaustive LI fp32 (tiled)",
        ne,
        timed(lambda: late_interaction_score(qry[:ne], gal), 1),
        fl,
        fp_peak,
    )  # noqa: E501
    add(
        "exhaustive LI int8 direct (tiled)",
        ne,
        timed(lambda: store.li_score(qry[:ne], device="cpu"), 1),
        fl,
        i8_peak,
    )  # noqa: E501

    print(f"\n{'variant':44s} {'queries':>8s} {'ms/query':>10s} {'of peak':>8s}")
    for name, n, ms, frac in rows:
        print(f"{name:44s} {n:8d} {ms:10.3f} {frac:8.1%}")
    for s, (i8a, fpa) in agree.items():
        print(f"top-10 identical to fp64, S={s}: int8 direct {i8a:.1%}, fp32 {fpa:.1%}")
    print("targets (CPU): stage 1 <= 0.3 ms/query; rerank S=100 <= 0.3, S=500 <= 1.5 ms/query")

    if torch.cuda.is_available():
        cuda(gal, qry, gv, qv)
    else:
        print("CUDA: not available here; GPU figures not measured.")


def cuda(gal: Tokens, qry: Tokens, gv: torch.Tensor, qv: torch.Tensor) -> None:
    """GPU: exhaustive LI of all queries x gallery and two-stage S=100, fp16 tiled matmuls."""
    dev = torch.device("cuda")
    g = Tokens(gal.vectors.to(dev, torch.float16))
    q = Tokens(qry.vectors.to(dev, torch.float16))
    li = LateInteraction("cuda", tile_mb=4096)

    def sync_run(fn: Callable[[], object]) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    idx = VectorIndex("torch", device=dev, chunk=5000).build(gv)
    t1 = sync_run(lambda: idx.search(qv, 100))
    _, short, _ = idx.search(qv, 100)
    t2 = sync_run(lambda: li.rerank(q, g, short))
    te = sync_run(lambda: li.score(q, g).topk(100, dim=1))
    print(
        f"CUDA {torch.cuda.get_device_name()}: stage 1 {t1 * 1e3:.1f} ms, rerank S=100 "
        f"{t2 * 1e3:.1f} ms, exhaustive LI {te:.2f} s for {len(q)} x {len(g)} "
        "(targets: two-stage S=100 < 20 ms, exhaustive < 0.5 s)"
    )


if __name__ == "__main__":
    main()
