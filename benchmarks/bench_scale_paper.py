"""How cost grows with gallery size, for docs/performance.md, "Scale on paper".

    python benchmarks/bench_scale_paper.py --sizes 5000 50000            # about 10 min, 2 cores
    python benchmarks/bench_scale_paper.py --sizes 5000 50000 500000     # needs ~8 GB free RAM

Everything runs through craterlab's own components (registry-built quantizers, matcher and
retrieval stages), on synthetic token sets: N gallery items of K=32 random unit tokens of D=384
(ViT-S/16 width), and queries that are noisy copies of gallery items. Per size it times, per
query and over the same queries:

- exhaustive late interaction (INT8 store, integer kernel): every query scores all N items;
- two-stage: stage 1 top-S (S=100) from an approximate FAISS index (HNSW32, ef_search 128),
  then the late-interaction rerank of the S from the INT8 store; and with exact stage 1
  (``torch``: a matmul over all N single vectors) for comparison.

It also measures backbone extraction throughput of ViT-S/16 (random weights: speed does not
depend on them) on this CPU in fp32 and bf16, model only, and the bytes per image of every
quantizer (from a real encoded store) to project a 5-million-crater catalog. Ratios measured
side by side in one run are the result; absolute times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from craterlab.plugins import get_registry
from craterlab.types import RetrievalInputs, Tokens

K, D, QUERIES = 32, 384, 50
CATALOG = 5_000_000


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def gallery_and_queries(n: int, seed: int = 0) -> tuple[Tokens, Tokens]:
    g = torch.Generator().manual_seed(seed)
    gallery = torch.empty(n, K, D)
    for s in range(0, n, 8192):  # chunks: bounded temporary memory
        e = min(n, s + 8192)
        gallery[s:e] = unit(torch.randn(e - s, K, D, generator=g))
    picks = torch.randint(0, n, (QUERIES,), generator=g)
    queries = unit(gallery[picks] + 0.5 * torch.randn(QUERIES, K, D, generator=g) / D**0.5)
    return Tokens(gallery), Tokens(queries)


def pooled(tokens: Tokens) -> torch.Tensor:
    return unit(tokens.vectors.mean(dim=1))


def time_stage(stage_cfg: dict, inputs: RetrievalInputs) -> float:
    """ms per query of one stage, as the stage itself reports it (stage-1 index build and
    one-query-at-a-time timing excluded: the batched, amortized per-query time)."""
    stage = get_registry().build("stage", stage_cfg, seed=0)
    ranking = stage.search(inputs)
    return float(ranking.stage_report(default_bytes=0.0).metrics()["ms_per_query"])


def scale_row(n: int) -> dict:
    registry = get_registry()
    gallery, queries = gallery_and_queries(n)
    gallery_vectors = pooled(gallery)
    quantizer = registry.build("quantizer", {"name": "int8"}, seed=0)
    quantizer.fit(gallery)
    store = quantizer.encode(gallery)
    del gallery
    matcher = registry.build("matcher", {"name": "late_interaction", "device": "cpu"}, seed=0)
    inputs = RetrievalInputs(pooled(queries), gallery_vectors, queries, store, matcher, 100)
    row = {"n": n}
    row["exhaustive_ms"] = time_stage({"name": "exhaustive"}, inputs)
    for label, index in (("two_stage_hnsw_ms", "HNSW32"), ("two_stage_exact_ms", "torch")):
        cfg = {"name": "two_stage", "index": index, "shortlist": 100}
        if index.startswith("HNSW"):
            cfg["ef_search"] = 128
        row[label] = time_stage(cfg, inputs)
    return row


def extraction_rate(precision: str, batch: int = 32, rounds: int = 3) -> float:
    """ViT-S/16 images per second on this CPU, model only (random weights, 224 px)."""
    from craterlab.backbones import timm_vit

    model = timm_vit("vit_small_patch16_224", "augreg_in21k", weights="random", precision=precision)
    images = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        model.encode(images)  # warm-up
        t0 = time.perf_counter()
        for _ in range(rounds):
            model.encode(images)
    return batch * rounds / (time.perf_counter() - t0)


def storage_per_quantizer() -> dict[str, float]:
    """Token-store bytes per image (K=32, D=384) of every quantizer, from an encoded store."""
    g = torch.Generator().manual_seed(0)
    sample = Tokens(unit(torch.randn(1024, K, D, generator=g)))
    out = {}
    configs = {
        "fp32": {"name": "fp32"},
        "fp16": {"name": "fp16"},
        "int8": {"name": "int8"},
        "pq96": {"name": "pq", "m": 96, "nbits": 8},
        "pq48": {"name": "pq", "m": 48, "nbits": 8},
    }
    for name, config in configs.items():
        quantizer = get_registry().build("quantizer", config, seed=0)
        quantizer.fit(sample)
        out[name] = float(quantizer.encode(sample).bytes_per_image())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"threads": args.threads, "K": K, "D": D, "queries": QUERIES}
    result["scale"] = []
    for n in args.sizes:
        row = scale_row(n)
        result["scale"].append(row)
        print(json.dumps(row), flush=True)
    result["extract_img_per_s"] = {p: extraction_rate(p) for p in ("fp32", "bf16")}
    print("extraction img/s:", json.dumps(result["extract_img_per_s"]), flush=True)
    stores = storage_per_quantizer()
    vector = D * 4  # the fp32 single vector of stage 1
    result["catalog_gb"] = {q: (b + vector) * CATALOG / 1e9 for q, b in stores.items()}
    result["bytes_per_image"] = stores
    print(f"\n{CATALOG:,} craters: token store + stage-1 vector per quantizer")
    for q, b in stores.items():
        print(f"  {q:5s} {b:8.0f} + {vector} bytes/image = {result['catalog_gb'][q]:7.1f} GB")
    print(f"\nms/query at N = {', '.join(str(n) for n in args.sizes)} ({QUERIES} queries)")
    for key in ("exhaustive_ms", "two_stage_hnsw_ms", "two_stage_exact_ms"):
        values = [r[key] for r in result["scale"]]
        growth = values[-1] / values[0] if values[0] else float("nan")
        print(f"  {key:20s} " + "  ".join(f"{v:9.2f}" for v in values) + f"   x{growth:.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
