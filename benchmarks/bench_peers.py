"""Peer late-interaction engines beside craterlab on bench_multivector.py's token sets.

For docs/multivector.md ("Peer engines"): fast-plaid, PyLate's scoring and maxsim-cpu.

Same data, same queries, same exhaustive late-interaction (LI) reference as
``bench_multivector.py`` (K=32, D=384, int8 store with per-token scales; the peers get those
tokens dequantized, i.e. the very values craterlab's int8 kernel scores). Three steps:

1. craterlab's rows, the data and the exhaustive reference (craterlab's venv)::

       python benchmarks/bench_multivector.py --sizes 50000 --queries 100 --store int8 \\
           --shortlists 100 200 500 --single 16 --methods pooled token_ivf_zero \\
           --lists 2048 --nprobe 4

2. fast-plaid (PLAID's engine) in its own environment, since it pins torch 2.7-2.11 and
   craterlab runs torch 2.14 (PyPI's torch 2.11 wheel brings CUDA packages, about 4.8 GB
   in all; it runs on the CPU)::

       python3 -m venv .plaidenv
       .plaidenv/bin/pip install fast-plaid==1.7.0.2110    # pulls torch==2.11.0
       .plaidenv/bin/python benchmarks/bench_peers.py plaid --nbits 4

   It builds a fast-plaid index over the 50K token sets (57 minutes on 2 shared cores: its
   k-means of 1.25M tokens into 16,384 centroids and the compression of 1.6M tokens run in
   fp32 torch on the CPU), searches the queries (batched and one at a time) with each
   ``--settings`` pair and writes the rankings to ``peers-plaid-*.json`` in the data folder.

3. The scorers and the table (craterlab's venv, with ``pip install --no-deps pylate`` and
   ``pip install maxsim-cpu``)::

       python benchmarks/bench_peers.py scorers

   Reranks the same candidates (the pooled shortlist's and the token IVF's top S) with
   craterlab's fused int8 kernel, PyLate's ``colbert_scores`` and maxsim-cpu, one run,
   and the exhaustive search with each; then prints fast-plaid's rows from step 2 with the
   same recall and mAP definitions (``bench_multivector.average_precision`` /
   ``recall_top10``).

The machine is shared and loaded: compare within one run, by ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

K, D, DEPTH = 32, 384, 100


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def dequantized(folder: Path, rows: Any = slice(None), dtype: Any = np.float32) -> np.ndarray:
    """The int8 store's tokens of ``rows`` as floats: codes x per-token scale, the values
    craterlab's int8 kernel scores."""
    codes = np.load(folder / "codes.npy", mmap_mode="r")
    scales = np.load(folder / "scales.npy", mmap_mode="r")
    out = codes[rows].astype(np.float32)
    out *= scales[rows][..., None]
    return out.astype(dtype, copy=False)


def need_data(folder: Path) -> None:
    if not (folder / "codes.npy").is_file() or not list(folder.glob("exhaustive-*.pt")):
        raise SystemExit(
            f"No int8 token sets with an exhaustive reference in {folder}. Make them first "
            "with step 1 of this script's docstring (benchmarks/bench_multivector.py "
            "--store int8 ...), with the same --data folder and size."
        )


# -- step 2: fast-plaid (run by the peer environment's python; numpy + torch only here)


def plaid(args: argparse.Namespace) -> None:
    """Build a fast-plaid index over the store's tokens and search the queries."""
    try:
        from fast_plaid import search as fp_search
    except ImportError as exc:
        raise SystemExit(
            f"fast-plaid is not importable here ({exc}). It pins torch 2.7-2.11, so it lives "
            "in its own environment: python3 -m venv .plaidenv && .plaidenv/bin/pip "
            "install fast-plaid==1.7.0.2110, then run this with .plaidenv/bin/python."
        ) from exc
    folder = Path(args.data) / f"n{args.n}-int8"
    need_data(folder)
    qd = torch.load(folder / "queries.pt")
    queries = qd["tokens"][: args.queries].float().contiguous()
    index_dir = folder / f"plaid-nbits{args.nbits}"
    t0 = time.perf_counter()
    if args.rebuild or not (index_dir / "metadata.json").is_file():
        docs: list[torch.Tensor] = []
        for a in range(0, args.n, 4096):  # fp16, chunk by chunk (1.2 GB in all at 50K)
            chunk = torch.from_numpy(dequantized(folder, slice(a, a + 4096), np.float16))
            docs += list(chunk.unbind(0))
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = fp_search.FastPlaid(index=str(index_dir), device="cpu")
        index.create(documents_embeddings=docs, nbits=args.nbits)
        build_s = time.perf_counter() - t0
        del docs
        (index_dir / "build.json").write_text(
            json.dumps({"build_s": build_s, "load_s": load_s, "rss_gib": peak_rss_gib()})
        )
    built = json.loads((index_dir / "build.json").read_text())
    index = fp_search.FastPlaid(index=str(index_dir), device="cpu")
    index_bytes = sum(
        p.stat().st_size for p in index_dir.iterdir() if p.is_file() and p.suffix != ".lock"
    )
    t0 = time.perf_counter()
    index.search(queries_embeddings=queries[:1], top_k=DEPTH, show_progress=False)
    first_s = time.perf_counter() - t0  # loads the index
    print(
        f"fast-plaid nbits={args.nbits}: build {built['build_s']:.1f} s (peak RSS "
        f"{built['rss_gib']:.2f} GiB), {index_bytes / args.n:,.0f} B/image, first search "
        f"{first_s:.1f} s, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    for probe, full in args.settings:
        kw = {"top_k": DEPTH, "n_ivf_probe": probe, "n_full_scores": full}
        t0 = time.perf_counter()
        res = index.search(queries_embeddings=queries, show_progress=False, **kw)
        batched = (time.perf_counter() - t0) * 1000 / len(queries)
        single = []
        for i in range(min(args.single, len(queries))):
            t0 = time.perf_counter()
            index.search(queries_embeddings=queries[i : i + 1], show_progress=False, **kw)
            single.append((time.perf_counter() - t0) * 1000)
        ids = [[d for d, _ in r] + [-1] * (DEPTH - len(r)) for r in res]
        out = {
            "engine": f"fast-plaid {args.nbits}-bit",
            "n_ivf_probe": probe,
            "n_full_scores": full,
            "ids": ids,
            "ms": batched,
            "ms_single": float(np.mean(single)),
            "bytes": index_bytes / args.n,
            "build_s": built["build_s"],
            "rss_gib": max(built["rss_gib"], peak_rss_gib()),
            "load": os.getloadavg()[0],
        }
        name = f"peers-plaid-nbits{args.nbits}-p{probe}-f{full}.json"
        (folder / name).write_text(json.dumps(out))
        print(
            f"  n_ivf_probe={probe} n_full_scores={full}: {batched:.2f} ms/query batched, "
            f"{out['ms_single']:.2f} single, peak RSS {out['rss_gib']:.2f} GiB",
            flush=True,
        )


# -- step 3: the scorers beside craterlab's kernel (craterlab's venv)


def pylate_scores() -> Any:
    """PyLate's ``colbert_scores``. ``pylate.utils``'s package init imports transformers and
    datasets (for training); the scoring code needs only ``pylate.utils.tensor``, so where
    those are absent the package is registered without running its init."""
    spec = importlib.util.find_spec("pylate")
    if spec is None or spec.origin is None:
        raise SystemExit("PyLate is not installed: pip install --no-deps pylate")
    if importlib.util.find_spec("transformers") is None and "pylate.utils" not in sys.modules:
        utils = types.ModuleType("pylate.utils")
        utils.__path__ = [str(Path(spec.origin).parent / "utils")]
        sys.modules["pylate.utils"] = utils
    from pylate.scores import colbert_scores

    return colbert_scores


def maxsim_cpu_scores() -> Any:
    """maxsim-cpu's ``maxsim_scores``, called on halves of the query's tokens. maxsim-cpu
    0.1.0 reads queries of more than 8,192 floats out of bounds (32 x 384 = 12,288 here:
    wrong scores, or a segfault), so each call gets 16 tokens and the two sums are added:
    late interaction is a sum over query tokens, so this is exact."""
    try:
        import maxsim_cpu
    except ImportError as exc:
        raise SystemExit(f"maxsim-cpu is not importable ({exc}): pip install maxsim-cpu") from exc
    limit = 8192

    def score(q: np.ndarray, docs: np.ndarray) -> np.ndarray:
        step = max(1, limit // q.shape[1])
        out = np.zeros(len(docs), np.float32)
        for a in range(0, len(q), step):
            out += maxsim_cpu.maxsim_scores(np.ascontiguousarray(q[a : a + step]), docs)
        return out

    return score


@dataclass
class Reference:
    """The data and exhaustive LI reference step 1 wrote, as craterlab's venv reads them."""

    folder: Path
    queries: torch.Tensor  # (Nq, K, D) fp32
    identity: torch.Tensor
    ids: torch.Tensor  # exhaustive LI's ranking (Nq, DEPTH)
    map: float
    mv: Any  # bench_multivector: the generator, metrics and methods

    def recall(self, ranked: torch.Tensor) -> float:
        return self.mv.recall_top10(ranked, self.ids[: len(ranked)])

    def recovered(self, ranked: torch.Tensor) -> float:
        return self.mv.average_precision(ranked[:, :DEPTH], self.identity) / self.map


def load_reference(args: argparse.Namespace) -> Reference:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_multivector as mv

    folder = Path(args.data) / f"n{args.n}-int8"
    need_data(folder)
    qd = torch.load(folder / "queries.pt")
    identity = qd["identity"][: args.queries]
    ids = torch.load(folder / f"exhaustive-{len(identity)}.pt")["ids"]
    return Reference(
        folder,
        qd["tokens"][: args.queries].float().contiguous(),
        identity,
        ids,
        mv.average_precision(ids, identity),
        mv,
    )


def scorers(args: argparse.Namespace) -> None:
    """Rerank the pooled shortlist's and the token IVF's candidates with each scorer."""
    from craterlab.plugins import get_registry
    from craterlab.retrieval.generator_io import load_generator
    from craterlab.retrieval.generators import complete
    from craterlab.retrieval.stages import rerank_store
    from craterlab.retrieval.stores import Int8Store
    from craterlab.retrieval.token_ivf import TokenIvf
    from craterlab.types import Tokens

    colbert_scores = pylate_scores()
    maxsim = maxsim_cpu_scores()
    ref = load_reference(args)
    qt, nq = ref.queries, len(ref.queries)
    q = Tokens(qt)
    store = Int8Store(
        {
            "codes": torch.from_numpy(np.load(ref.folder / "codes.npy", mmap_mode="r+")),
            "scales": torch.from_numpy(np.load(ref.folder / "scales.npy", mmap_mode="r+")),
        },
        K,
        D,
    )
    reg = get_registry()
    matcher = reg.build("matcher", {"name": "late_interaction", "device": "cpu"})
    print(
        f"torch threads {torch.get_num_threads()}, {nq} queries, N={args.n:,}, load average "
        f"{os.getloadavg()[0]:.1f}; exhaustive LI mAP {ref.map:.4f}",
        flush=True,
    )
    smax = max(args.shortlists)
    pooled = torch.from_numpy(np.load(ref.folder / "pooled.npy"))
    pooled_q = ref.mv.unit(qt.mean(1))
    sources = {"pooled": (pooled_q @ pooled.T).topk(smax, dim=1).indices}
    saved = ref.folder / f"token_ivf-{args.lists}"
    if (saved / "build_s.txt").is_file():
        _, base = load_generator(saved, store)
        cfg = {**ref.mv.METHODS["token_ivf_zero"], "lists": args.lists, "nprobe": args.nprobe}
        gen = TokenIvf(base.centroids, base.codes, base.mask, reg.build("stage", cfg).ivf)
        sources["token_ivf"] = complete(gen.candidates(q, smax), args.n)
    else:
        print(f"(no token IVF cached in {saved}: step 1 builds it; its rows are skipped)")
    print(
        "| candidates | S | scorer | inputs | recall@10 of LI | mAP recovered | same top-10 "
        "as craterlab | ms/query (single) | of which scoring | x craterlab |\n"
        "|---|---|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    rows = []
    warm = sources["pooled"][:1, :10]  # first calls: kernel plans, JIT, page faults
    rerank_store(matcher, q[:1], store, warm)
    maxsim(qt[0].numpy(), dequantized(ref.folder, warm[0].numpy()))
    colbert_scores(qt[:1], torch.from_numpy(dequantized(ref.folder, warm[0].numpy())))
    for src, cand in sources.items():
        for s in args.shortlists:
            short = cand[:, :s].contiguous()
            # craterlab: the fused int8 kernel, straight from the mapped codes
            t0 = time.perf_counter()
            rr = rerank_store(matcher, q, store, short)
            batched = (time.perf_counter() - t0) * 1000 / nq
            single = []
            for i in range(nq):
                t0 = time.perf_counter()
                rerank_store(matcher, q[i : i + 1], store, short[i : i + 1])
                single.append((time.perf_counter() - t0) * 1000)
            ours = short.gather(1, rr.argsort(dim=1, descending=True, stable=True))
            base_ms = float(np.mean(single))
            timings = {"craterlab fused": (ours, base_ms, base_ms)}
            for scorer in ("PyLate colbert_scores", "maxsim-cpu"):
                ranked, total, scoring = [], [], []
                for i in range(nq):
                    t0 = time.perf_counter()
                    docs = dequantized(ref.folder, short[i].numpy())  # gather + dequantize
                    t1 = time.perf_counter()
                    if scorer == "maxsim-cpu":
                        sc = torch.from_numpy(maxsim(qt[i].numpy(), docs))
                    else:
                        sc = colbert_scores(qt[i : i + 1], torch.from_numpy(docs))[0]
                    t2 = time.perf_counter()
                    total.append((t2 - t0) * 1000)
                    scoring.append((t2 - t1) * 1000)
                    ranked.append(short[i][sc.argsort(descending=True, stable=True)])
                timings[scorer] = (
                    torch.stack(ranked),
                    float(np.mean(total)),
                    float(np.mean(scoring)),
                )
            for scorer, (ranked_ids, ms, score_ms) in timings.items():
                row = {
                    "candidates": src,
                    "S": s,
                    "scorer": scorer,
                    "inputs": INPUTS[scorer],
                    "recall10": ref.recall(ranked_ids),
                    "recovered": ref.recovered(ranked_ids),
                    "same_top10": ref.mv.recall_top10(ranked_ids, ours),
                    "ms": ms,
                    "score_ms": score_ms,
                    "ratio": ms / base_ms,
                    "craterlab_batched_ms": batched,
                }
                rows.append(row)
                print(
                    f"| {src} | {s} | {scorer} | {row['inputs']} | {row['recall10']:.3f} | "
                    f"{row['recovered']:.3f} | {row['same_top10']:.3f} | {ms:.2f} | "
                    f"{score_ms:.2f} | {row['ratio']:.1f} |",
                    flush=True,
                )
            print(f"(craterlab batched over the {nq} queries: {batched:.2f} ms/query)")
    if args.exhaustive_queries:
        exhaustive(args, ref, colbert_scores, maxsim, lambda t: score_store_of(matcher, t, store))
    plaid_rows(ref)
    (ref.folder / "peers-scorers.json").write_text(json.dumps(rows, indent=1))
    print(f"peak RSS {peak_rss_gib():.2f} GiB, load average at the end {os.getloadavg()}")


INPUTS = {
    "craterlab fused": "int8 codes + scales",
    "PyLate colbert_scores": "fp32 (torch einsum)",
    "maxsim-cpu": "fp32, 2 calls of 16 tokens",
}


def score_store_of(matcher: Any, queries: torch.Tensor, store: Any) -> torch.Tensor:
    from craterlab.retrieval.stages import score_store
    from craterlab.types import Tokens

    return score_store(matcher, Tokens(queries), store)


def exhaustive(
    args: argparse.Namespace,
    ref: Reference,
    colbert_scores: Any,
    maxsim: Any,
    ours: Any,
) -> None:
    """Exhaustive LI over the whole gallery with each scorer, on the first queries."""
    m = min(args.exhaustive_queries, len(ref.queries))
    qt = ref.queries[:m]
    gallery = np.empty((args.n, K, D), np.float32)  # 2.5 GB at 50K
    for a in range(0, args.n, 4096):
        gallery[a : a + 4096] = dequantized(ref.folder, slice(a, a + 4096))
    gt = torch.from_numpy(gallery)
    print(
        f"\nexhaustive LI, first {m} queries (fp32 gallery {gallery.nbytes / 2**30:.1f} GiB, "
        f"load average {os.getloadavg()[0]:.1f})\n| scorer | recall@10 of LI | ms/query |"
        "\n|---|---|---|"
    )
    t0 = time.perf_counter()
    ranked = ours(qt).topk(DEPTH, dim=1).indices
    ms = (time.perf_counter() - t0) * 1000 / m
    print(f"| craterlab fused int8 (batched) | {ref.recall(ranked):.3f} | {ms:.1f} |")
    for name in ("PyLate colbert_scores", "maxsim-cpu"):
        ranked_rows = []
        t0 = time.perf_counter()
        for i in range(m):
            if name == "maxsim-cpu":
                sc = torch.from_numpy(maxsim(qt[i].numpy(), gallery))
            else:
                parts = [
                    colbert_scores(qt[i : i + 1], gt[a : a + 2048])[0]
                    for a in range(0, args.n, 2048)
                ]
                sc = torch.cat(parts)
            ranked_rows.append(sc.topk(DEPTH).indices)
        ms = (time.perf_counter() - t0) * 1000 / m
        recall = ref.recall(torch.stack(ranked_rows))
        print(f"| {name} (one query at a time) | {recall:.3f} | {ms:.1f} |", flush=True)


def plaid_rows(ref: Reference) -> None:
    """fast-plaid's rankings from step 2, with the same recall and mAP."""
    files = sorted(ref.folder.glob("peers-plaid-*.json"))
    if not files:
        print("(no fast-plaid results in the data folder: step 2 writes them)")
        return
    print(
        "\n| engine | n_ivf_probe | n_full_scores | recall@10 of LI | mAP recovered | "
        "ms/query (batched) | ms/query (single) | bytes/img | build s | peak RSS GiB | load |"
        "\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for f in files:
        r = json.loads(f.read_text())
        ids = torch.tensor(r["ids"])[: len(ref.ids)]
        print(
            f"| {r['engine']} | {r['n_ivf_probe']} | {r['n_full_scores']} | "
            f"{ref.recall(ids):.3f} | {ref.recovered(ids):.3f} | {r['ms']:.2f} | "
            f"{r['ms_single']:.2f} | {r['bytes']:,.0f} | {r['build_s']:.1f} | "
            f"{r['rss_gib']:.2f} | {r['load']:.1f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    for name in ("plaid", "scorers"):
        p = sub.add_parser(name)
        p.add_argument("--n", type=int, default=50_000, help="gallery size (step 1's --sizes)")
        p.add_argument("--queries", type=int, default=100)
        p.add_argument("--data", default="outputs/bench_multivector")
    p = sub.choices["plaid"]
    p.add_argument("--nbits", type=int, default=4, choices=[1, 2, 4, 8])
    p.add_argument(
        "--settings",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        nargs="+",
        default=[(8, 4096), (4, 1024)],
        help="n_ivf_probe,n_full_scores pairs",
    )
    p.add_argument("--single", type=int, default=16)
    p.add_argument("--rebuild", action="store_true")
    p = sub.choices["scorers"]
    p.add_argument("--shortlists", type=int, nargs="+", default=[100, 200, 500])
    p.add_argument("--lists", type=int, default=2048, help="the cached token IVF's lists")
    p.add_argument("--nprobe", type=int, default=4, help="the token IVF's probes")
    p.add_argument("--exhaustive-queries", type=int, default=20)
    args = ap.parse_args()
    plaid(args) if args.step == "plaid" else scorers(args)


if __name__ == "__main__":
    main()
