"""Direct multi-vector search side by side, for docs/multivector.md.

    python benchmarks/bench_multivector.py --sizes 50000 100000 --queries 200
    python benchmarks/bench_multivector.py --sizes 1000000 --queries 100 \
        --methods pooled muvera_ivfpq

Synthetic token sets (K=32, D=384), generated in chunks straight to an fp16 file on disk and
memory-mapped as the gallery's token store: N/2 crater identities with two gallery views each
(the study's 2x / 3x crops); an identity is K prototype tokens near shared "visual
words" (1,024 of them), a view perturbs its prototypes and swaps 40% of them for context
tokens; a query is a noisier view (60% context) of one identity, whose two gallery views
are relevant.

For each method, at each shortlist S in --shortlists, through craterlab's registry-built
stages (the pooled shortlist is ``two_stage`` over the normalized mean token; ``muvera`` and
``token_ivf`` are the multi-vector generators), every method reranked exactly from the same
fp16 store: recall of exhaustive late interaction's top 10, mAP (depth 100) and its share of
exhaustive LI's (mAP recovered), ms per query (batched, and one query at a time), bytes per
image (generator or stage-1 index + store), build time, and the process's peak RSS. At the
first size it also prints the quantization table: exhaustive LI mAP and bytes per image of
the fp16 store beside int8 and ColBERTv2 residual (2 and 1 bits) stores.

The machine is shared and loaded: absolute times move by tens of percent between runs; the
ratios within one run are the result.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from craterlab.plugins import get_registry
from craterlab.retrieval.generator_io import load_generator, save_generator
from craterlab.retrieval.generators import decode_rows
from craterlab.retrieval.stores import Fp16Store, Int8Store
from craterlab.retrieval.token_ivf import (
    TokenIvf,
    TokenIvfSettings,
    build_token_ivf,
    sketch_store,
    token_impacts,
)
from craterlab.retrieval.token_sketch import TokenSketch
from craterlab.types import RetrievalInputs, Tokens

K, D, WORDS, CHUNK, DEPTH = 32, 384, 1024, 4096, 100


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


SHIFTS = {"proto": 0, "a": 1, "b": 2, "q": 3, "ctx_a": 5, "ctx_b": 8, "ctx_q": 13}
"""Where each use reads its noise in one draw per chunk (see :func:`generate`)."""


def shifted(noise: torch.Tensor, use: str) -> torch.Tensor:
    """The chunk's noise (…, D + 16) read from offset ``SHIFTS[use]``: an iid Gaussian vector
    read at another offset is uncorrelated with it (zero-mean inner product), so one draw
    serves every use in the chunk (the generator's cost is mostly random numbers)."""
    o = SHIFTS[use]
    return noise[..., o : o + D]


def views(
    protos: torch.Tensor,
    words: torch.Tensor,
    g: torch.Generator,
    noise: torch.Tensor,
    sigma: float,
    ctx: float,
    name: str,
) -> torch.Tensor:
    """A view of each identity: its prototypes perturbed, a share ``ctx`` of the slots
    replaced by context tokens (other words)."""
    n = len(protos)
    v = unit(protos + sigma * shifted(noise, name))
    swap = torch.nonzero(torch.rand(n, K, generator=g) < ctx, as_tuple=True)
    picked = words[torch.randint(0, WORDS, (len(swap[0]),), generator=g)]
    v[swap] = unit(picked + 0.8 * shifted(noise, f"ctx_{name}")[swap])
    return v


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int8's codes and scales (round(x / s), s = max|x| / 127 per token), in one
    pass over the chunk."""
    scale = x.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8), scale


def generate(n: int, n_queries: int, folder: Path, store: str = "fp16", seed: int = 0) -> dict:
    """Write the gallery tokens ((N, K, D) fp16, or int8 codes with per-token scales) and
    pooled vectors; return the queries. Per chunk of identities one Gaussian draw of shape
    (m, K, D + 16), scaled by 1/sqrt(D), is read at a different offset for each use
    (prototypes, each view, each view's context tokens); context tokens are drawn only for the
    slots they replace, the query view only for the identities that are queries."""
    folder.mkdir(parents=True, exist_ok=True)
    words = unit(torch.randn(WORDS, D, generator=torch.Generator().manual_seed(seed)))
    ids = n // 2
    if store == "int8":
        tok = np.lib.format.open_memmap(folder / "codes.npy", "w+", np.int8, (n, K, D))
        scl = np.lib.format.open_memmap(folder / "scales.npy", "w+", np.float32, (n, K))
    else:
        tok = np.lib.format.open_memmap(folder / "tokens.npy", "w+", np.float16, (n, K, D))
    pooled = np.lib.format.open_memmap(folder / "pooled.npy", "w+", np.float32, (n, D))
    step = max(1, ids // n_queries)
    q_ids = list(range(0, ids, step))[:n_queries]
    queries = []
    for c0 in range(0, ids, CHUNK // 2):
        c1 = min(ids, c0 + CHUNK // 2)
        g = torch.Generator().manual_seed(seed * 1_000_003 + c0)
        m = c1 - c0
        nz = torch.randn(m, K, D + 16, generator=g).mul_(1 / D**0.5)
        protos = unit(words[torch.randint(0, WORDS, (m, K), generator=g)] + 0.8 * nz[..., :D])
        a = views(protos, words, g, nz, 0.5, 0.4, "a")
        b = views(protos, words, g, nz, 0.5, 0.4, "b")
        here = [i - c0 for i in q_ids if c0 <= i < c1]
        if here:
            queries += list(views(protos[here], words, g, nz[here], 0.6, 0.6, "q"))
        gal = torch.stack([a, b], 1).reshape(2 * m, K, D)  # image 2i and 2i+1: identity i
        if store == "int8":
            codes, scales = quantize(gal)
            tok[2 * c0 : 2 * c1] = codes.numpy()
            scl[2 * c0 : 2 * c1] = scales.numpy()
        else:
            tok[2 * c0 : 2 * c1] = gal.half().numpy()
        pooled[2 * c0 : 2 * c1] = unit(gal.mean(1)).numpy()
    tok.flush()
    pooled.flush()
    if store == "int8":
        scl.flush()
    qt = torch.stack(queries)
    torch.save({"tokens": qt, "identity": torch.tensor(q_ids)}, folder / "queries.pt")
    return {"n": n}


def average_precision(ranked: torch.Tensor, identity: torch.Tensor) -> float:
    """mAP over queries; the gallery images of identity i are rows 2i and 2i+1."""
    aps = []
    for row, ident in zip(ranked.tolist(), identity.tolist(), strict=True):
        hits, ap = 0, 0.0
        for rank, j in enumerate(row, 1):
            if j >= 0 and j // 2 == ident:
                hits += 1
                ap += hits / rank
        aps.append(ap / 2)
    return float(np.mean(aps))


def recall_top10(ranked: torch.Tensor, reference: torch.Tensor) -> float:
    got = [
        len(set(a[:10]) & set(b[:10])) / 10
        for a, b in zip(ranked.tolist(), reference.tolist(), strict=True)
    ]
    return float(np.mean(got))


def rss_gib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in GiB."""
    cur = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            cur = int(line.split()[1]) / 2**20
    return cur, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


METHODS = {
    "pooled": {"name": "two_stage", "index": "Flat"},
    "pooled_hnsw": {"name": "two_stage", "index": "HNSW32", "ef_search": 128},
    "muvera_flat": {
        "name": "muvera",
        "simhash_bits": 4,
        "repetitions": 8,
        "projection_dim": 16,
        "index": "Flat",
    },
    "muvera_ivfpq": {
        "name": "muvera",
        "simhash_bits": 4,
        "repetitions": 8,
        "projection_dim": 16,
        "index": "IVF1024,PQ128",
        "nprobe": 32,
    },
    "muvera_hnsw": {
        "name": "muvera",
        "simhash_bits": 4,
        "repetitions": 8,
        "projection_dim": 16,
        "index": "HNSW32",
        "ef_search": 256,
    },
    "muvera_big": {
        "name": "muvera",
        "simhash_bits": 5,
        "repetitions": 20,
        "projection_dim": 16,
        "index": "Flat",
    },
    "token_ivf": {"name": "token_ivf", "score": "lists"},
    "token_ivf_zero": {"name": "token_ivf", "score": "lists", "fill": "zero"},
    "token_ivf_centroids": {"name": "token_ivf", "score": "centroids"},
    "token_ivf_counts": {"name": "token_ivf", "score": "counts"},
}


def run_size(n: int, args: argparse.Namespace) -> list[dict]:
    folder = Path(args.data) / f"n{n}-{args.store}"
    reg = get_registry()
    t0 = time.perf_counter()
    if not (folder / "queries.pt").is_file():
        generate(n, args.queries, folder, args.store)
    gen_s = time.perf_counter() - t0
    pooled = torch.from_numpy(np.load(folder / "pooled.npy"))
    qd = torch.load(folder / "queries.pt")
    qd = {"tokens": qd["tokens"][: args.queries], "identity": qd["identity"][: args.queries]}
    q = Tokens(qd["tokens"].float())
    qv = unit(q.vectors.mean(1))
    if args.store == "int8":  # memory-mapped int8 rows with per-token scales
        tokens = torch.from_numpy(np.load(folder / "codes.npy", mmap_mode="r+"))
        scales = torch.from_numpy(np.load(folder / "scales.npy", mmap_mode="r+"))
        store: Any = Int8Store({"codes": tokens, "scales": scales}, K, D)
    else:  # memory-mapped fp16 rows
        tokens = torch.from_numpy(np.load(folder / "tokens.npy", mmap_mode="r+"))
        store = Fp16Store({"codes": tokens}, K, D)
    matcher = reg.build("matcher", {"name": "late_interaction", "device": "cpu"})
    if args.warm:
        warm_s = read_through(folder)
        print(f"store files read into the page cache in {warm_s:.0f} s", flush=True)
    print(
        f"\n## N={n:,} (generated in {gen_s:.0f} s, {len(q)} queries, {args.store} store, "
        f"load average {os.getloadavg()[0]:.1f})",
        flush=True,
    )

    def inputs(gallery_store: object = store) -> RetrievalInputs:
        return RetrievalInputs(qv, pooled, q, gallery_store, matcher, DEPTH)  # type: ignore[arg-type]

    ref_file = folder / f"exhaustive-{len(q)}.pt"
    if ref_file.is_file():
        ref = torch.load(ref_file)
    else:
        t = time.perf_counter()
        r = reg.build("stage", {"name": "exhaustive", "timing_queries": 0}).search(inputs())
        ref = {
            "ids": r.indices,
            "ms": r.report.metrics()["ms_per_query"],
            "s": time.perf_counter() - t,
        }
        torch.save(ref, ref_file)
    ref_map = average_precision(ref["ids"], qd["identity"])
    print(f"exhaustive LI: mAP {ref_map:.4f}, {ref['ms']:.1f} ms/query", flush=True)
    rows = [
        {
            "n": n,
            "method": "exhaustive",
            "S": "-",
            "recall10": 1.0,
            "mAP": ref_map,
            "recovered": 1.0,
            "ms": ref["ms"],
            "ms_single": float("nan"),
            "bytes": store.bytes_per_image(),
            "build_s": 0.0,
            "rss_peak_gib": rss_gib()[1],
        }
    ]
    prepared: dict = {}
    variants = []
    for method in args.methods:
        if method.startswith("token_ivf"):
            grow = n // args.sizes[0] if args.grow_lists else 1
            for lists in [x * grow for x in args.lists]:
                for nprobe, refine, dims, cap, cells in itertools.product(
                    args.nprobe, args.refine, args.refine_dims, args.max_postings, args.cell_probe
                ):
                    over = {"lists": lists, "nprobe": nprobe}
                    if cells:
                        over.update(cell_probe=cells)
                    if refine:
                        over.update(refine=refine, refine_dims=dims)
                    if cap:
                        over.update(max_postings=cap)
                    if args.coarse:
                        over.update(coarse=args.coarse)
                    if refine or dims == args.refine_dims[0]:
                        variants.append((method, over))
        else:
            variants.append((method, {}))
    ivf_cache: dict[int, tuple[TokenIvf, float]] = {}
    for method, over in variants:
        label = method + "".join(f" {k}={v}" for k, v in over.items())
        ivf_build = None
        if method.startswith("token_ivf"):  # train and assign once per list count
            coarse = f"-c{args.coarse}" if args.coarse else ""
            coarse += f"-s{args.sample_per_list}" if args.sample_per_list else ""
            saved = folder / f"token_ivf-{over['lists']}{coarse}"
            if over["lists"] not in ivf_cache and (saved / "build_s.txt").is_file():
                _, base = load_generator(saved, store)  # built by an earlier run
                ivf_cache[over["lists"]] = (base, float((saved / "build_s.txt").read_text()))
                ivf_build = ivf_cache[over["lists"]][1]
            if over["lists"] not in ivf_cache:
                t = time.perf_counter()
                sample = args.sample_per_list * over["lists"] or TokenIvfSettings.sample
                built = TokenIvfSettings(
                    lists=over["lists"], score="centroids", coarse=args.coarse, sample=sample
                )
                base = build_token_ivf(store, decode_rows(store), built, n, K)
                ivf_cache[over["lists"]] = (base, time.perf_counter() - t)
                ivf_build = ivf_cache[over["lists"]][1]
                save_generator(base, "token_ivf", saved)
                (saved / "build_s.txt").write_text(f"{ivf_build:.1f}")
            base = ivf_cache[over["lists"]][0]
            settings = reg.build("stage", {**METHODS[method], **over}, seed=0).ivf
            sketch = None
            if settings.refine:
                sketch, sketch_s = cached_sketch(folder, store, settings, n)
                ivf_build = (ivf_build or 0.0) + sketch_s
            impacts = None
            if settings.max_postings:
                impacts, impacts_s = cached_impacts(saved, store, base, n)
                ivf_build = (ivf_build or 0.0) + impacts_s
            prepared["generator:token_ivf"] = TokenIvf(
                base.centroids, base.codes, base.mask, settings, sketch=sketch, impacts=impacts,
                cells=base.cells,
            )  # fmt: skip
            label += f" ({len(base.centroids)} lists)" if not over["lists"] else ""
        for s in args.shortlists:
            cfg = {**METHODS[method], **over, "shortlist": s, "timing_queries": args.single}
            inp = inputs()
            inp.prepared = prepared
            t = time.perf_counter()
            stage = reg.build("stage", cfg, seed=0)
            if args.warm:  # one untimed pass: lists, workspaces, pages as a served index's
                stage.search(inp)
                t = time.perf_counter()
            r = stage.search(inp)
            wall = time.perf_counter() - t
            m = r.report.metrics()
            build = r.extra.get("build_s", 0.0) if s == args.shortlists[0] else 0.0
            if ivf_build is not None or method.startswith("token_ivf"):
                build = (ivf_build or 0.0) if s == args.shortlists[0] else 0.0
            if method.startswith("pooled"):
                build = wall if s == args.shortlists[0] else 0.0  # stage-1 build inside
            row = {
                "n": n,
                "method": label,
                "S": s,
                "recall10": recall_top10(r.indices, ref["ids"]),
                "mAP": average_precision(r.indices, qd["identity"]),
                "ms": m["ms_per_query"],
                "ms_single": float(np.mean(r.report.single_latency_ms["total"]))
                if args.single
                else float("nan"),
                "bytes": r.report.bytes_per_image,
                "build_s": build,
                "rss_peak_gib": rss_gib()[1],
            }
            row["recovered"] = row["mAP"] / ref_map
            rows.append(row)
            print(fmt(row), flush=True)
            if s != args.shortlists[0]:
                row["build_s"] = 0.0  # later shortlists reuse the generator built for the first
        if method.startswith(("muvera", "token_ivf")):
            prepared.pop(f"generator:{METHODS[method]['name']}", None)
    if args.quantization:
        rows += quantization_table(n, store.decode().vectors, q, qd["identity"], ref_map, args)
    return rows


def read_through(folder: Path, chunk: int = 64 << 20) -> float:
    """Read the size's store files (and cached sketches and lists) once, so that the timed
    searches rerank from the page cache, as a served index does, instead of paying first
    reads from disk in whichever method runs first. Returns the seconds it took."""
    t = time.perf_counter()
    buf = bytearray(chunk)
    for f in sorted(folder.glob("*.npy")) + sorted(folder.glob("*/*.npy")):
        with f.open("rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t


def cached_sketch(
    folder: Path, store: Any, settings: TokenIvfSettings, n: int
) -> tuple[TokenSketch, float]:
    """The store's token sketches of ``settings.refine_dims`` dimensions and their build
    time, built once and kept next to the data (projection fitted on the k-means sample)."""
    saved = folder / f"sketch-{settings.refine_dims}"
    if (saved / "build_s.txt").is_file():
        sk = TokenSketch(
            torch.from_numpy(np.load(saved / "projection.npy")),
            torch.from_numpy(np.load(saved / "codes.npy", mmap_mode="r+")),
            torch.from_numpy(np.load(saved / "scales.npy")),
            None,
        )
        return sk, float((saved / "build_s.txt").read_text())
    t = time.perf_counter()
    sk = sketch_store(decode_rows(store), settings, n, K, None)
    took = time.perf_counter() - t
    saved.mkdir(parents=True, exist_ok=True)
    np.save(saved / "projection.npy", sk.projection.numpy())
    np.save(saved / "codes.npy", sk.codes.numpy())
    np.save(saved / "scales.npy", sk.scales.numpy())
    (saved / "build_s.txt").write_text(f"{took:.1f}")
    return sk, took


def cached_impacts(saved: Path, store: Any, base: TokenIvf, n: int) -> tuple[torch.Tensor, float]:
    """Each token's similarity to its centroid (the impacts that order capped lists) and
    its time, computed once and kept beside the cached token IVF."""
    file = saved / "impacts.npy"
    if file.is_file():
        return torch.from_numpy(np.load(file)), float((saved / "impacts_s.txt").read_text())
    t = time.perf_counter()
    impacts = token_impacts(decode_rows(store), base.codes, base.centroids, n)
    took = time.perf_counter() - t
    np.save(file, impacts.numpy())
    (saved / "impacts_s.txt").write_text(f"{took:.1f}")
    return impacts, took


def quantization_table(
    n: int,
    tokens: torch.Tensor,
    q: Tokens,
    identity: torch.Tensor,
    ref_map: float,
    args: argparse.Namespace,
) -> list[dict]:
    """Exhaustive LI mAP and bytes per image of each store (fp16 is the reference)."""
    reg = get_registry()
    matcher = reg.build("matcher", {"name": "late_interaction", "device": "cpu"})
    sample = Tokens(
        tokens[torch.randperm(len(tokens))[: max(1, 100_000 // K * 4)].sort().values].float()
    )
    out = []
    for label, cfg in (
        ("int8", {"name": "int8"}),
        ("residual2", {"name": "residual", "nbits": 2, "centroids": args.lists[0] or 1024}),
        ("residual1", {"name": "residual", "nbits": 1, "centroids": args.lists[0] or 1024}),
    ):
        t = time.perf_counter()
        qz = reg.build("quantizer", cfg, seed=0)
        qz.fit(sample)
        parts = [
            qz.encode(Tokens(tokens[a : a + CHUNK].float())) for a in range(0, len(tokens), CHUNK)
        ]
        store = parts[0]
        for p in parts[1:]:
            store = store.concat(p)
        build = time.perf_counter() - t
        inp = RetrievalInputs(
            unit(q.vectors.mean(1)), torch.empty(len(tokens), 1), q, store, matcher, DEPTH
        )
        r = reg.build("stage", {"name": "exhaustive", "timing_queries": 0}).search(inp)
        mp = average_precision(r.indices, identity)
        row = {
            "n": n,
            "method": f"store:{label}",
            "S": "-",
            "recall10": float("nan"),
            "mAP": mp,
            "recovered": mp / ref_map,
            "ms": r.report.metrics()["ms_per_query"],
            "ms_single": float("nan"),
            "bytes": store.bytes_per_image(),
            "build_s": build,
            "rss_peak_gib": rss_gib()[1],
        }
        print(fmt(row), flush=True)
        out.append(row)
    return out


def fmt(row: dict) -> str:
    return (
        f"| {row['n']:,} | {row['method']} | {row['S']} | {row['recall10']:.3f} "
        f"| {row['mAP']:.4f} | {row['recovered']:.3f} | {row['ms']:.2f} "
        f"| {row['ms_single']:.2f} | {row['bytes']:,.0f} | {row['build_s']:.1f} "
        f"| {row['rss_peak_gib']:.1f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 100_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--shortlists", type=int, nargs="+", default=[50, 100, 200, 500])
    ap.add_argument(
        "--methods",
        nargs="*",
        default=["pooled", "muvera_flat", "muvera_ivfpq", "token_ivf"],
        choices=list(METHODS),
    )
    ap.add_argument(
        "--lists", type=int, nargs="+", default=[0], help="token IVF lists (0: automatic)"
    )
    ap.add_argument("--nprobe", type=int, nargs="+", default=[4], help="token IVF probes")
    ap.add_argument(
        "--refine",
        type=int,
        nargs="+",
        default=[0],
        help="token IVF: list-score candidates re-scored on token sketches (0: none)",
    )
    ap.add_argument(
        "--coarse", type=int, default=0, help="token IVF: two-level k-means cells (0: one)"
    )
    ap.add_argument(
        "--cell-probe",
        type=int,
        nargs="+",
        default=[0],
        help="token IVF with --coarse: probe only the lists of each token's best cells (0: all)",
    )
    ap.add_argument(
        "--grow-lists",
        action="store_true",
        help="token IVF lists scale with N: --lists at the first size, times N / that size",
    )
    ap.add_argument(
        "--sample-per-list",
        type=int,
        default=0,
        help="token IVF k-means sample: this many tokens per list (0: the stage's default)",
    )
    ap.add_argument(
        "--max-postings",
        type=int,
        nargs="+",
        default=[0],
        help="token IVF: postings read per probed list, best impact first (0: all)",
    )
    ap.add_argument(
        "--refine-dims", type=int, nargs="+", default=[64], help="token IVF sketch dimensions"
    )
    ap.add_argument("--store", choices=["fp16", "int8"], default="fp16", help="rerank store")
    ap.add_argument("--single", type=int, default=16, help="queries also timed one at a time")
    ap.add_argument("--quantization", action="store_true", help="also the quantization table")
    ap.add_argument("--data", default="outputs/bench_multivector")
    ap.add_argument("--json", default="outputs/bench_multivector/results.json")
    ap.add_argument("--clean", action="store_true", help="delete each size's data afterwards")
    ap.add_argument(
        "--warm",
        action="store_true",
        help="read each size's store into the page cache, and search once untimed before "
        "each timed search (steady state of a served index; needs the RAM)",
    )
    args = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    print(
        "| N | method | S | recall@10 of LI | mAP | mAP recovered | ms/query "
        "| ms/query single | bytes/img | build s | peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for n in args.sizes:
        rows += run_size(n, args)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else []
        Path(args.json).write_text(json.dumps(old + rows, indent=1))
        if args.clean:
            shutil.rmtree(Path(args.data) / f"n{n}-{args.store}")
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
