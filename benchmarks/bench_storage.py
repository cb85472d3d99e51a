"""Bytes per image of every quantizer at K=16, 32, 64 (D=384), against the study's figures,
plus a cheap synthetic quality proxy at K=32: exhaustive late-interaction top-10 agreement with
FP32 and the mean absolute score error.

    python benchmarks/bench_storage.py [--gallery 2000 --queries 100]

``int8_image`` is INT8 with one scale per image (``quantizer.scale=image``). Bytes are the
store's ``nbytes`` (equal to its serialized payload; checked here by saving);
the PQ codebook is a per-gallery constant, printed apart. Real quality (mAP relative to FP32)
comes from end-to-end sweeps (``quantizer=fp32,fp16,int8,pq96,pq48``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from craterlab.retrieval.matchers import LateInteraction
from craterlab.retrieval.quantizers import (
    Fp16Quantizer,
    Fp32Quantizer,
    Int8Quantizer,
    PQQuantizer,
)
from craterlab.types import Tokens

STUDY_K32 = {"fp32": "49 KB", "int8": "12.4 KB", "pq96": "3.1 KB"}


def quantizers() -> dict[str, object]:
    return {
        "fp32": Fp32Quantizer(),
        "fp16": Fp16Quantizer(),
        "int8": Int8Quantizer(),
        "int8_image": Int8Quantizer(scale="image"),
        "pq96": PQQuantizer(m=96),
        "pq48": PQQuantizer(m=48),
    }


def unit(n: int, k: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, k, d, generator=g), dim=-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gallery", type=int, default=2000)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--dim", type=int, default=384)
    a = p.parse_args()
    d = a.dim
    print(
        f"{'quantizer':10s} {'K':>4s} {'B/token':>8s} {'B/image':>9s} {'saved B/img':>11s} "
        f"{'codebook B':>10s} {'study (K=32)':>12s}"
    )
    for k in (16, 32, 64):
        tokens = Tokens(unit(max(16, 512 // k + 1), k, d, seed=k))  # >= 256 tokens to train PQ
        for name, q in quantizers().items():
            q.fit(tokens)
            store = q.encode(tokens)
            with tempfile.TemporaryDirectory() as tmp:
                written = store.save(tmp)
                on_disk = sum(
                    f.stat().st_size for f in Path(tmp).glob("*.bin") if f.name != "codebook.bin"
                )
            assert written == on_disk == store.nbytes
            print(
                f"{name:10s} {k:4d} {store.bytes_per_token():8.0f} {store.bytes_per_image():9.0f} "
                f"{on_disk / len(store):11.0f} {store.overhead_bytes:10d} "
                f"{STUDY_K32.get(name, '') if k == 32 else '':>12s}"
            )

    # Quality proxy at K=32: queries are noisy copies of gallery images.
    k = 32
    g = Tokens(unit(a.gallery, k, d, seed=1))
    gen = torch.Generator().manual_seed(2)
    src = torch.randint(0, a.gallery, (a.queries,), generator=gen)
    q = g.vectors[src] + 0.08 * torch.randn(a.queries, k, d, generator=gen)
    q = Tokens(torch.nn.functional.normalize(q, dim=-1))
    matcher = LateInteraction("cpu")
    ref = matcher.score(q, g)
    ref_top = ref.topk(10, dim=1).indices.sort(1).values
    print(f"\nquality proxy, K=32, gallery {a.gallery}, {a.queries} queries (noisy copies)")
    print(
        f"{'quantizer':10s} {'top-1 = fp32':>12s} {'top-10 set = fp32':>17s} "
        f"{'mean |score err|':>16s}"
    )
    for name, quant in quantizers().items():
        quant.fit(g)
        store = quant.encode(g)
        s = matcher.score_store(q, store)  # the kernel a run would use for this store
        top = s.topk(10, dim=1).indices.sort(1).values
        print(
            f"{name:10s} {(s.argmax(1) == ref.argmax(1)).float().mean():12.1%} "
            f"{(top == ref_top).all(1).float().mean():17.1%} {(s - ref).abs().mean():16.5f}"
        )


if __name__ == "__main__":
    main()
