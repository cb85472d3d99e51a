"""Retrieval latency at the study's scale on synthetic tensors (craterlab issue 6).

    python benchmarks/bench_retrieval.py [--gallery 50000 --queries 5000 --dim 384 --k 32]

Prints ms per query for stage 1 (torch exact and FAISS Flat), the late-interaction rerank at
S=100 and S=500 (naive loop, plain fp32 gather + bmm, the CPU fast path on fp32 tokens, INT8
codes scored with integer matmuls) and exhaustive late interaction (fp32 and INT8, tiled), each
with the fraction of the matmul peak measured in the same run (fp32 peak for fp32 variants,
int8 ``_int_mm`` peak for INT8). Variants of one table section are timed interleaved
(``--repeats`` rounds, medians). Slow variants run on a subset of the queries (printed).

Data: the gallery is made of families (``--family`` images each): noisy copies of a prototype
token set at noise levels spread from near-duplicate to near-random, and each query is a noisy
copy of one family's prototype, so the late-interaction scores of a shortlist have a realistic
spread. Top-10 agreement of INT8 scoring with an fp64 reference is reported on that data and on
pure random data (random unit tokens, queries noisy copies of one gallery image), where all
candidates but one are nearly tied and any rounding reorders them.

On CUDA (when present) it also times exhaustive LI of all queries x all gallery images and
two-stage S=100 in fp16.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from craterlab.matching import (
    LateInteraction,
    _tokens_gather,
    late_interaction_rerank,
    late_interaction_score,
)
from craterlab.quantization import Int8Quantizer, Int8Store, quantize_int8
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


def interleaved(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each variant, timed round-robin (one warm-up call each first)."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def peaks() -> tuple[float, float]:
    """(fp32 GFLOP/s, int8 GOP/s) of large matmuls on this machine, now."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    fp = 2 * 2048**3 / timed(lambda: a @ b, 5) / 1e9
    ai = torch.randint(-127, 127, (4096, 1024), dtype=torch.int8)
    bi = torch.randint(-127, 127, (1024, 2048), dtype=torch.int8)
    i8 = 2 * 4096 * 1024 * 2048 / timed(lambda: torch._int_mm(ai, bi), 5) / 1e9
    return fp, i8


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def families(
    ng: int, nq: int, k: int, d: int, family: int = 50, seed: int = 0
) -> tuple[Tokens, Tokens]:
    """Gallery of families: image i = unit(proto[i // family] + sigma_i * noise) with sigma_i
    uniform in [0.02, 0.3] per component (cosine to the prototype from ~0.93 to ~0.17);
    queries = unit(proto[f] + 0.05 * noise) for random families f."""
    g = torch.Generator().manual_seed(seed)
    nf = (ng + family - 1) // family
    proto = _unit(torch.randn(nf, k, d, generator=g))
    gal = torch.empty(ng, k, d)
    for i in range(0, ng, 5000):
        n = min(5000, ng - i)
        fam = torch.arange(i, i + n) // family
        sigma = 0.02 + 0.28 * torch.rand(n, 1, 1, generator=g)
        gal[i : i + n] = _unit(proto[fam] + sigma * torch.randn(n, k, d, generator=g))
    src = torch.randint(0, nf, (nq,), generator=g)
    q = _unit(proto[src] + 0.05 * torch.randn(nq, k, d, generator=g))
    return Tokens(gal), Tokens(q)


def random_data(ng: int, nq: int, k: int, d: int, seed: int = 1) -> tuple[Tokens, Tokens]:
    """Random unit tokens; queries are noisy copies of one gallery image each."""
    g = torch.Generator().manual_seed(seed)
    gal = _unit(torch.randn(ng, k, d, generator=g))
    src = torch.randint(0, ng, (nq,), generator=g)
    q = _unit(gal[src] + 0.08 * torch.randn(nq, k, d, generator=g))
    return Tokens(gal), Tokens(q)


def pooled(t: Tokens) -> torch.Tensor:
    return _unit(t.vectors.mean(1))


def naive_rerank(q: Tokens, g: Tokens, cand: torch.Tensor) -> torch.Tensor:
    """One matmul per (query, candidate): the loop the study timed."""
    out = torch.empty(cand.shape)
    for i in range(cand.shape[0]):
        for j, c in enumerate(cand[i].tolist()):
            out[i, j] = (q.vectors[i] @ g.vectors[c].T).amax(1).mean()
    return out


def fp64_rerank(q: torch.Tensor, g: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """(Nq, S) late interaction in float64 of query tokens q against g[cand]."""
    out = torch.empty(cand.shape, dtype=torch.float64)
    step = max(1, 2000 // cand.shape[1])
    for i in range(0, cand.shape[0], step):
        gg = g[cand[i : i + step]].double()  # (c, S, K, D)
        sim = torch.einsum("cqd,cskd->csqk", q[i : i + step].double(), gg)
        out[i : i + step] = sim.amax(-1).mean(-1)
    return out


def top10_agreement(a: torch.Tensor, b: torch.Tensor, cand: torch.Tensor) -> float:
    """Share of queries whose top-10 candidate sets are identical under scores a and b."""
    ta = cand.gather(1, a.topk(10, dim=1).indices).sort(1).values
    tb = cand.gather(1, b.topk(10, dim=1).indices).sort(1).values
    return (ta == tb).all(1).float().mean().item()


def agreement(
    name: str, gal: Tokens, qry: Tokens, store: Int8Store, short: torch.Tensor
) -> list[str]:
    """Top-10 agreement with fp64 of: int8 direct, fp32, and int8 gallery with fp32 queries."""
    lines = []
    qc, qs = quantize_int8(qry.vectors)
    deq_q = qc.double() * qs.double().unsqueeze(-1)
    deq_g = store.decode().vectors
    for s in (100, 500):
        cand = short[:, :s].contiguous()
        ref = fp64_rerank(qry.vectors, gal.vectors, cand)
        i8 = top10_agreement(store.li_rerank(qry, cand), ref, cand)
        fp = top10_agreement(late_interaction_rerank(qry, cand, gal), ref, cand)
        gq = top10_agreement(fp64_rerank(qry.vectors, deq_g, cand), ref, cand)
        qq = top10_agreement(fp64_rerank(deq_q, gal.vectors, cand), ref, cand)
        top = ref.sort(1, descending=True).values
        gap = (top[:, 9] - top[:, 10]).median().item()
        lines.append(
            f"  {name:9s} S={s}: int8 direct {i8:6.1%}  fp32 {fp:6.1%}  | int8 gallery + fp "
            f"queries {gq:6.1%}, int8 queries + fp gallery {qq:6.1%}  | median gap rank 10-11 "
            f"{gap:.1e}"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gallery", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=5_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--family", type=int, default=50, help="gallery images per family")
    p.add_argument("--rerank-queries", type=int, default=1000, help="queries for S=100/500")
    p.add_argument("--naive-queries", type=int, default=20)
    p.add_argument("--faiss-queries", type=int, default=1000)
    p.add_argument("--exhaustive-queries", type=int, default=16)
    p.add_argument("--quality-queries", type=int, default=500)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds per section")
    a = p.parse_args()
    ng, nq, k, d = a.gallery, a.queries, a.k, a.dim
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; gallery {ng}, "
        f"queries {nq}, dim {d}, K={k}; medians of {a.repeats} interleaved rounds"
    )
    fp_peak, i8_peak = peaks()
    print(f"peak: fp32 matmul {fp_peak:.0f} GFLOP/s, int8 _int_mm {i8_peak:.0f} GOP/s")
    gal, qry = families(ng, nq, k, d, a.family)
    gv, qv = pooled(gal), pooled(qry)
    store2 = Int8Quantizer(threads=2).encode(gal)
    store1 = Int8Store(store2.payload, k, d, threads=1)  # same codes, one worker
    rows: list[tuple[str, int, float, float]] = []  # name, queries, ms/query, peak fraction

    def add(name: str, n: int, seconds: float, flops: float, peak: float) -> float:
        ms = seconds * 1e3 / n
        rows.append((name, n, ms, flops * n / seconds / 1e9 / peak))
        return ms

    # Stage 1
    tidx = VectorIndex("torch", chunk=1000).build(gv)
    fidx = VectorIndex("Flat").build(gv)
    nf = min(a.faiss_queries, nq)
    t = interleaved(
        {"torch": lambda: tidx.search(qv, 500), "faiss": lambda: fidx.search(qv[:nf], 500)},
        max(1, a.repeats // 2),
    )
    add("stage1 torch exact (1000-query chunks)", nq, t["torch"], 2 * ng * d, fp_peak)
    add("stage1 faiss Flat", nf, t["faiss"], 2 * ng * d, fp_peak)
    _, short, _ = tidx.search(qv, 500)

    # Rerank
    nr = min(a.rerank_queries, nq)
    qr = qry[:nr]
    li2, li1 = LateInteraction("cpu", threads=2), LateInteraction("cpu", threads=1)
    plain = _tokens_gather(gal)  # a gather function: takes the generic (GPU-style) path
    ratios = []
    for s in (100, 500):
        cand = short[:nr, :s].contiguous()
        fl = 2 * s * k * k * d
        nn = min(a.naive_queries, nr)
        t_naive = timed(lambda c=cand, m=nn: naive_rerank(qr[:m], gal, c[:m]), 1)
        naive = add(f"rerank S={s} naive loop", nn, t_naive, fl, fp_peak)
        t = interleaved(
            {
                "bmm": lambda c=cand: late_interaction_rerank(qr, c, gather=plain),
                "fp2": lambda c=cand: li2.rerank(qr, gal, c),
                "fp1": lambda c=cand: li1.rerank(qr, gal, c),
                "i82": lambda c=cand: store2.li_rerank(qr, c),
                "i81": lambda c=cand: store1.li_rerank(qr, c),
            },
            a.repeats,
        )
        bmm = add(f"rerank S={s} fp32 plain gather+bmm", nr, t["bmm"], fl, fp_peak)
        fp2 = add(f"rerank S={s} fp32 fast, 2 workers", nr, t["fp2"], fl, fp_peak)
        add(f"rerank S={s} fp32 fast, main thread", nr, t["fp1"], fl, fp_peak)
        i8 = add(f"rerank S={s} int8 direct, 2 workers", nr, t["i82"], fl, i8_peak)
        add(f"rerank S={s} int8 direct, main thread", nr, t["i81"], fl, i8_peak)
        ratios.append(
            f"S={s}: int8 direct (2 workers) is {naive / i8:.1f}x faster than the naive loop, "
            f"{bmm / i8:.1f}x faster than plain fp32 bmm, {fp2 / i8:.1f}x faster than fp32 fast; "
            f"fp32 fast is {bmm / fp2:.2f}x plain bmm"
        )

    # Exhaustive
    ne = min(a.exhaustive_queries, nq)
    ne_plain = min(4, ne)
    fl = 2 * ng * k * k * d
    qe = qry[:ne]
    t = interleaved(
        {
            "fp2": lambda: li2.score(qe, gal),
            "i82": lambda: store2.li_score(qe, device="cpu"),
            "i81": lambda: store1.li_score(qe, device="cpu"),
        },
        max(1, a.repeats // 2),
    )
    t_plain = timed(
        lambda: late_interaction_score(
            qry[:ne_plain], num_gallery=ng, gather=lambda i: Tokens(gal.vectors[i])
        ),
        1,
    )
    add("exhaustive LI fp32 plain tiled (64 MB tiles)", ne_plain, t_plain, fl, fp_peak)
    add("exhaustive LI fp32 fast, 2 workers", ne, t["fp2"], fl, fp_peak)
    add("exhaustive LI int8 direct, 2 workers", ne, t["i82"], fl, i8_peak)
    add("exhaustive LI int8 direct, main thread", ne, t["i81"], fl, i8_peak)

    print(f"\n{'variant':46s} {'queries':>8s} {'ms/query':>10s} {'of peak':>8s}")
    for name, n, ms, frac in rows:
        print(f"{name:46s} {n:8d} {ms:10.3f} {frac:8.1%}")
    for line in ratios:
        print(line)
    print("targets (CPU): stage 1 <= 0.3 ms/query; rerank S=100 <= 0.3, S=500 <= 1.5 ms/query")

    # Quality: top-10 agreement with an fp64 reference
    nqq = min(a.quality_queries, nq)
    print(f"\ntop-10 candidate set identical to fp64 late interaction ({nqq} queries):")
    for line in agreement("families", gal, qry[:nqq], store2, short[:nqq]):
        print(line)
    rg, rq = random_data(min(ng, 10_000), nqq, k, d)
    ridx = VectorIndex("torch", chunk=1000).build(pooled(rg))
    _, rshort, _ = ridx.search(pooled(rq), 500)
    rstore = Int8Quantizer(threads=2).encode(rg)
    print(f"  (random: gallery {len(rg)} random unit token sets)")
    for line in agreement("random", rg, rq, rstore, rshort):
        print(line)

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
