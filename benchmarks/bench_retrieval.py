"""Retrieval latency and kernel agreement at the study's scale, on synthetic tensors.

    python benchmarks/bench_retrieval.py [--gallery 50000 --queries 5000 --dim 384 --k 32]

Prints ms per query for stage 1 (torch exact and FAISS Flat), the late-interaction rerank at
S=100 and S=500 and exhaustive late interaction, for every CPU kernel of
:mod:`craterlab.retrieval.cpu_engine` as a matcher runs it (``LateInteraction()`` over the
store it scores): fp32 over an FP32 store, bf16 over a BF16 store, int8 over an INT8 store
with per-token scales, int8_image over one with per-image scales (max taken in int32); plus the
naive per-pair loop and the any-device engine (plain gather + bmm) for scale. Each row shows
the fraction of its matmul peak measured in the same run (fp32, bf16 or int8 ``_int_mm`` with
a column-major right operand, the layout oneDNN's AMX path wants). Variants of one section are
timed interleaved (``--repeats`` rounds, medians). Slow variants run on a subset of the queries.

Quality: the share of queries whose top-10 candidate set equals an fp64 late-interaction
reference, for every kernel, at S=100 and S=500. Data: the gallery is made of families
(``--family`` images each): noisy copies of a prototype token set at noise levels spread from
near-duplicate to near-random, and each query is a noisy copy of one family's prototype, so the
scores of a shortlist have a realistic spread; and pure random data (random unit tokens,
queries noisy copies of one gallery image), where all candidates but one are nearly tied and any
rounding reorders them.

On CUDA (when present) it also times exhaustive LI of all queries x all gallery images and
two-stage S=100 in fp16.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from craterlab.devices import cpu_has_amx_bf16
from craterlab.retrieval import gather_engine
from craterlab.retrieval.matchers import LateInteraction
from craterlab.retrieval.quantizers import Bf16Quantizer, Fp32Quantizer, Int8Quantizer
from craterlab.retrieval.stores import CodeStore
from craterlab.retrieval.vector_index import SingleVectorIndex
from craterlab.types import Tokens

KERNELS = ("fp32", "bf16", "int8", "int8_image")


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


def peaks() -> dict[str, float]:
    """GFLOP/s (GOP/s for int8) of large matmuls on this machine, now, per operand type."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    ab, bb = a.bfloat16(), b.bfloat16()
    ai = torch.randint(-127, 127, (4096, 1024), dtype=torch.int8)
    bi = torch.randint(-127, 127, (2048, 1024), dtype=torch.int8).T  # column-major (K, N)
    return {
        "fp32": 2 * n**3 / timed(lambda: a @ b, 5) / 1e9,
        "bf16": 2 * n**3 / timed(lambda: ab @ bb, 5) / 1e9,
        "int8": 2 * 4096 * 1024 * 2048 / timed(lambda: torch._int_mm(ai, bi), 5) / 1e9,
    }


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


def kernel_setups(gal: Tokens, threads: int) -> dict[str, tuple[LateInteraction, CodeStore]]:
    """kernel -> (matcher, store) as a run would pair them."""
    return {
        "fp32": (LateInteraction("cpu", threads=threads), Fp32Quantizer().encode(gal)),
        "bf16": (LateInteraction("cpu", threads=threads), Bf16Quantizer().encode(gal)),
        "int8": (LateInteraction("cpu", threads=threads), Int8Quantizer().encode(gal)),
        "int8_image": (
            LateInteraction("cpu", threads=threads),
            Int8Quantizer(scale="image").encode(gal),
        ),
    }


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


def agreement(name: str, gal: Tokens, qry: Tokens, short: torch.Tensor, threads: int) -> list[str]:
    """Top-10 agreement of every kernel with the fp64 reference, at S=100 and S=500."""
    setups = kernel_setups(gal, threads)
    lines = []
    for s in (100, 500):
        cand = short[:, :s].contiguous()
        ref = fp64_rerank(qry.vectors, gal.vectors, cand)
        cells = [
            f"{kernel} {top10_agreement(m.rerank_store(qry, store, cand), ref, cand):6.1%}"
            for kernel, (m, store) in setups.items()
        ]
        top = ref.sort(1, descending=True).values
        gap = (top[:, 9] - top[:, 10]).median().item()
        lines.append(f"  {name:9s} S={s}: {'  '.join(cells)}  | median gap rank 10-11 {gap:.1e}")
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
    p.add_argument("--threads", type=int, default=2, help="CPU engine worker threads")
    a = p.parse_args()
    ng, nq, k, d = a.gallery, a.queries, a.k, a.dim
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, AMX bf16: "
        f"{cpu_has_amx_bf16()}; gallery {ng}, queries {nq}, dim {d}, K={k}; medians of "
        f"{a.repeats} interleaved rounds"
    )
    peak = peaks()
    print(
        f"peak: fp32 matmul {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s, "
        f"int8 _int_mm {peak['int8']:.0f} GOP/s"
    )
    peak_of = {"fp32": peak["fp32"], "bf16": peak["bf16"], "int8": peak["int8"]}
    peak_of["int8_image"] = peak["int8"]
    gal, qry = families(ng, nq, k, d, a.family)
    gv, qv = pooled(gal), pooled(qry)
    setups = kernel_setups(gal, a.threads)
    one_thread = kernel_setups(gal, 1)
    rows: list[tuple[str, int, float, float]] = []  # name, queries, ms/query, peak fraction

    def add(name: str, n: int, seconds: float, flops: float, peak_rate: float) -> float:
        ms = seconds * 1e3 / n
        rows.append((name, n, ms, flops * n / seconds / 1e9 / peak_rate))
        return ms

    # Stage 1
    tidx = SingleVectorIndex("torch", chunk=1000).build(gv)
    fidx = SingleVectorIndex("Flat").build(gv)
    nf = min(a.faiss_queries, nq)
    t = interleaved(
        {"torch": lambda: tidx.search(qv[:nf], 500), "faiss": lambda: fidx.search(qv[:nf], 500)},
        max(1, a.repeats // 2),
    )
    add("stage1 torch exact (1000-query chunks)", nf, t["torch"], 2 * ng * d, peak["fp32"])
    add("stage1 faiss Flat", nf, t["faiss"], 2 * ng * d, peak["fp32"])
    _, short, _ = fidx.search(qv, 500)

    # Rerank
    nr = min(a.rerank_queries, nq)
    qr = qry[:nr]
    plain = gather_engine.tokens_gather(gal)
    cpu = torch.device("cpu")
    summary = []
    for s in (100, 500):
        cand = short[:nr, :s].contiguous()
        fl = 2 * s * k * k * d
        nn = min(a.naive_queries, nr)
        t_naive = timed(lambda c=cand, m=nn: naive_rerank(qr[:m], gal, c[:m]), 1)
        add(f"rerank S={s} naive loop", nn, t_naive, fl, peak["fp32"])
        variants: dict[str, Callable[[], object]] = {
            "plain": lambda c=cand: gather_engine.rerank(qr, c, plain, cpu),
        }
        for name, (m, store) in setups.items():
            variants[name] = lambda c=cand, m=m, st=store: m.rerank_store(qr, st, c)
        for name in ("fp32", "int8"):
            m1, st1 = one_thread[name]
            variants[f"{name}/1"] = lambda c=cand, m=m1, st=st1: m.rerank_store(qr, st, c)
        t = interleaved(variants, a.repeats)
        add(f"rerank S={s} fp32 plain gather+bmm", nr, t["plain"], fl, peak["fp32"])
        best = []
        for name in KERNELS:
            ms = add(f"rerank S={s} {name}, {a.threads} workers", nr, t[name], fl, peak_of[name])
            best.append((ms, name))
        for name in ("fp32", "int8"):
            add(f"rerank S={s} {name}, main thread", nr, t[f"{name}/1"], fl, peak_of[name])
        ms, name = min(best)
        summary.append(f"rerank S={s}: fastest kernel {name} ({ms:.3f} ms/query)")

    # Exhaustive
    ne = min(a.exhaustive_queries, nq)
    ne_plain = min(4, ne)
    fl = 2 * ng * k * k * d
    qe = qry[:ne]
    variants = {}
    for name, (m, store) in setups.items():
        variants[name] = lambda m=m, st=store: m.score_store(qe, st)
    t = interleaved(variants, max(1, a.repeats // 2))
    t_plain = timed(lambda: gather_engine.score(qry[:ne_plain], ng, plain, cpu), 1)
    add("exhaustive LI fp32 plain tiled (64 MB tiles)", ne_plain, t_plain, fl, peak["fp32"])
    best = []
    for name in KERNELS:
        ms = add(f"exhaustive LI {name}, {a.threads} workers", ne, t[name], fl, peak_of[name])
        best.append((ms, name))
    ms, name = min(best)
    summary.append(f"exhaustive: fastest kernel {name} ({ms:.3f} ms/query)")

    print(f"\n{'variant':46s} {'queries':>8s} {'ms/query':>10s} {'of peak':>8s}")
    for row_name, n, ms, frac in rows:
        print(f"{row_name:46s} {n:8d} {ms:10.3f} {frac:8.1%}")
    for line in summary:
        print(line)

    # Quality: top-10 agreement with an fp64 reference
    nqq = min(a.quality_queries, nq)
    print(f"\ntop-10 candidate set identical to fp64 late interaction ({nqq} queries):")
    for line in agreement("families", gal, qry[:nqq], short[:nqq], a.threads):
        print(line)
    rg, rq = random_data(min(ng, 10_000), nqq, k, d)
    ridx = SingleVectorIndex("Flat").build(pooled(rg))
    _, rshort, _ = ridx.search(pooled(rq), 500)
    print(f"  (random: gallery {len(rg)} random unit token sets)")
    for line in agreement("random", rg, rq, rshort, a.threads):
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

    idx = SingleVectorIndex("torch", device=dev, chunk=5000).build(gv)
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
