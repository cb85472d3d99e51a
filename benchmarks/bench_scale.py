"""Search at scale on one CPU machine: memory-mapped token stores and approximate stage 1.

A synthetic gallery of N token sets (K=32 tokens of D=384) is written to disk once, as the
arrays a saved index holds: INT8 codes + per-token scales, PQ-48 codes + codebook, and the
single vectors. Each case then runs in a fresh process that memory-maps the store (nothing
is read into RAM up front), builds the stage-1 index from a FAISS factory string (IVF-PQ or
HNSW) through :class:`craterlab.retrieval.index.EncodedGallery`, and answers queries by
two-stage search (stage 1 top-S, late-interaction rerank of the S from the mapped store).

Reported per case: stage-1 build time, ms/query (batched, amortized; and one query at a time,
p50), R@1 / R@10 of the two-stage ranking (each query is a noisy copy of one gallery item, its
only relevant item), and resident memory of the process: anonymous (heap: stage-1 index,
buffers) and file-backed (pages of the mapped store and vectors touched so far).

Token sets are drawn from a bank of 65,536 random unit tokens (K draws per item), so writing a
million of them costs a gather, not a million quantizations; an item's single vector is the
normalized mean of its tokens.

    python benchmarks/bench_scale.py --n 100000     # int8 + pq48, IVF-PQ + HNSW
    python benchmarks/bench_scale.py --n 1000000 --stage1 IVF1024,PQ48np

Use FAISS's ``np`` suffix (``IVF1024,PQ48np``): without it the factory turns on polysemous
training of the PQ, which took 150 s of a 155 s IVF256,PQ48 training on 20K vectors here.
Faiss and torch run with ``--threads`` threads (default 1: on a shared machine OpenMP's
spinning threads are far slower than one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

K, D, BANK = 32, 384, 65536
PQ_M = 48


def rss() -> dict[str, float]:
    """Resident memory of this process in MiB: anonymous and file-backed pages."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def generate(
    root: Path, n: int, n_queries: int, formats: tuple[str, ...] = ("int8", "pq48"), seed: int = 0
) -> None:
    """Write the synthetic gallery of ``n`` items under ``root`` (the stores of ``formats``;
    skipped when present)."""
    import faiss

    faiss.omp_set_num_threads(1)
    done = root / "done.json"
    if done.exists() and set(formats) <= set(json.loads(done.read_text()).get("formats", [])):
        return
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bank = rng.standard_normal((BANK, D), dtype=np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    amax = np.abs(bank).max(axis=1)
    bank_scale = (amax / 127.0).astype(np.float32)
    bank_i8 = np.clip(np.round(bank / bank_scale[:, None]), -127, 127).astype(np.int8)
    pq = faiss.ProductQuantizer(D, PQ_M, 8)
    pq.cp.seed = seed
    pq.train(bank)
    bank_pq = pq.compute_codes(bank)
    book = faiss.vector_to_array(pq.centroids).reshape(PQ_M, 256, D // PQ_M)
    np.save(root / "codebook.npy", book)

    want_int8 = "int8" in formats
    codes = scales = None
    if want_int8:
        codes = np.lib.format.open_memmap(root / "int8_codes.npy", "w+", np.int8, (n, K, D))
        scales = np.lib.format.open_memmap(root / "int8_scales.npy", "w+", np.float32, (n, K))
    pqc = np.lib.format.open_memmap(root / "pq_codes.npy", "w+", np.uint8, (n, K, PQ_M))
    vecs = np.lib.format.open_memmap(root / "vectors.npy", "w+", np.float32, (n, D))
    draws = np.lib.format.open_memmap(root / "draws.npy", "w+", np.int32, (n, K))
    chunk = 8192
    t0 = time.perf_counter()
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        idx = rng.integers(0, BANK, size=(e - s, K), dtype=np.int32)
        draws[s:e] = idx
        if want_int8:
            codes[s:e] = bank_i8[idx]
            scales[s:e] = bank_scale[idx]
        pqc[s:e] = bank_pq[idx]
        v = bank[idx].mean(axis=1)
        vecs[s:e] = v / np.linalg.norm(v, axis=1, keepdims=True)
        if s // chunk % 16 == 0:
            print(f"  generated {e:,}/{n:,} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for a in (codes, scales, pqc, vecs, draws):
        if a is not None:
            a.flush()
    # Queries: a noisy copy of the tokens of one gallery item each (its only relevant item).
    targets = rng.choice(n, size=n_queries, replace=False)
    q = bank[np.asarray(draws[targets])] + 0.35 * rng.standard_normal(
        (n_queries, K, D), dtype=np.float32
    ) / np.sqrt(D)
    q /= np.linalg.norm(q, axis=2, keepdims=True)
    qv = q.mean(axis=1)
    qv /= np.linalg.norm(qv, axis=1, keepdims=True)
    np.savez(root / "queries.npz", tokens=q, vectors=qv, targets=targets)
    done.write_text(json.dumps({"n": n, "queries": n_queries, "formats": list(formats)}))


def run_case(root: Path, fmt: str, stage1: str, shortlist: int, nprobe: int, ef: int) -> dict:
    """One case in this process: map the store, build stage 1, search, measure."""
    import faiss
    import torch

    from craterlab.plugins import get_registry
    from craterlab.retrieval.index import EncodedGallery
    from craterlab.retrieval.stores import Int8Store, PQStore
    from craterlab.types import Tokens

    threads = int(os.environ.get("CRATERLAB_BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    base = rss()

    def mapped(name: str) -> torch.Tensor:
        import warnings

        with warnings.catch_warnings():  # read-only maps: torch warns they are not writable
            warnings.simplefilter("ignore")
            return torch.from_numpy(np.load(root / name, mmap_mode="r"))

    vectors = mapped("vectors.npy")
    n = len(vectors)
    if fmt == "int8":
        store = Int8Store(
            {"codes": mapped("int8_codes.npy"), "scales": mapped("int8_scales.npy")}, K, D
        )
    else:
        book = torch.from_numpy(np.load(root / "codebook.npy"))
        store = PQStore({"codes": mapped("pq_codes.npy")}, K, D, None, {"codebook": book})
    qz = np.load(root / "queries.npz")
    q_tokens = Tokens(torch.from_numpy(qz["tokens"]))
    q_vectors = torch.from_numpy(qz["vectors"])
    targets = qz["targets"]
    ids = [str(i) for i in range(n)]
    is_ivf = stage1.upper().startswith("IVF")
    index = EncodedGallery(
        ids,
        vectors,
        store,
        index=stage1,
        nprobe=nprobe if is_ivf else None,
        ef_search=ef if stage1.upper().startswith("HNSW") else None,
        device="cpu",
    )
    t0 = time.perf_counter()
    warm = index.search(q_vectors[:1], None, mode="single", depth=1)  # builds stage 1
    build_s = time.perf_counter() - t0
    del warm
    after_build = rss()
    matcher = get_registry().build("matcher", {"name": "late_interaction", "device": "cpu"})

    t0 = time.perf_counter()
    result = index.search(
        q_vectors, q_tokens, mode="two_stage", shortlist=shortlist, depth=10, matcher=matcher
    )
    batched_ms = (time.perf_counter() - t0) * 1e3 / len(q_vectors)
    got = result.ranking.indices.numpy()
    r1 = float(np.mean(got[:, 0] == targets))
    r10 = float(np.mean([t in row for t, row in zip(targets, got, strict=True)]))
    s1 = result.ranking.shortlist.numpy()
    r_s = float(np.mean([t in row for t, row in zip(targets, s1, strict=True)]))
    single = []
    for i in range(min(50, len(q_vectors))):
        t0 = time.perf_counter()
        index.search(
            q_vectors[i : i + 1],
            q_tokens[i : i + 1],
            mode="two_stage",
            shortlist=shortlist,
            depth=10,
            matcher=matcher,
        )
        single.append((time.perf_counter() - t0) * 1e3)
    end = rss()
    return {
        "n": n,
        "format": fmt,
        "stage1": stage1,
        "shortlist": shortlist,
        "nprobe": nprobe if is_ivf else None,
        "ef_search": ef if not is_ivf else None,
        "store_bytes_on_disk": int(store.nbytes),
        "build_s": round(build_s, 2),
        "ms_per_query_batched": round(batched_ms, 3),
        "ms_per_query_single_p50": round(float(np.median(single)), 3),
        "R@1": r1,
        "R@10": r10,
        "R@S": r_s,
        "rss_mib": round(end["VmRSS"], 1),
        "rss_anon_mib": round(end["RssAnon"], 1),
        "rss_file_mib": round(end["RssFile"], 1),
        "peak_rss_mib": round(end["VmHWM"], 1),
        "rss_after_build_mib": round(after_build["VmRSS"], 1),
        "rss_at_start_mib": round(base["VmRSS"], 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[100_000])
    p.add_argument("--formats", nargs="+", default=["int8", "pq48"], choices=["int8", "pq48"])
    p.add_argument(
        "--stage1",
        nargs="+",
        default=None,
        help="FAISS factory strings (default: IVF-PQ sized to N, and HNSW32)",
    )
    p.add_argument("--shortlist", type=int, default=100)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="faiss / torch threads per case")
    p.add_argument("--dir", default=os.environ.get("CRATERLAB_BENCH_DIR", "outputs/bench_scale"))
    p.add_argument("--out", default=None, help="JSON lines file for the results")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = p.parse_args()
    if args.case:
        root, fmt, stage1 = args.case.split("|")
        res = run_case(Path(root), fmt, stage1, args.shortlist, args.nprobe, args.ef_search)
        print("RESULT " + json.dumps(res), flush=True)
        return
    results = []
    for n in args.n:
        root = Path(args.dir) / f"n{n}"
        print(f"gallery of {n:,} token sets (K={K}, D={D}) in {root}", flush=True)
        generate(root, n, args.queries, tuple(args.formats))
        nlist = 1024
        specs = args.stage1 or [f"IVF{nlist},PQ{PQ_M}np", "HNSW32"]
        for spec in specs:
            for fmt in args.formats:
                cmd = [
                    sys.executable,
                    __file__,
                    "--case",
                    f"{root}|{fmt}|{spec}",
                    "--shortlist",
                    str(args.shortlist),
                    "--nprobe",
                    str(args.nprobe),
                    "--ef-search",
                    str(args.ef_search),
                ]
                env = {
                    **os.environ,
                    "CRATERLAB_BENCH_THREADS": str(args.threads),
                    "OMP_NUM_THREADS": str(args.threads),
                }
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next(
                    (ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None
                )
                if line is None:
                    print(f"  {fmt} {spec}: failed\n{proc.stderr[-2000:]}", flush=True)
                    continue
                res = json.loads(line[7:])
                results.append(res)
                print(
                    f"  {fmt:>5} {spec:<14} build {res['build_s']:>7.1f} s  "
                    f"{res['ms_per_query_batched']:>7.2f} ms/q batched  "
                    f"{res['ms_per_query_single_p50']:>7.2f} ms/q single  "
                    f"R@1 {res['R@1']:.3f} R@10 {res['R@10']:.3f} R@S {res['R@S']:.3f}  "
                    f"RSS {res['rss_mib']:>7.0f} MiB (anon {res['rss_anon_mib']:.0f}, "
                    f"file {res['rss_file_mib']:.0f}); "
                    f"store {res['store_bytes_on_disk'] / 2**30:.2f} GiB",
                    flush=True,
                )
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
