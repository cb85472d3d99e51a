"""Retrieval: where late interaction is computed, where a store's bytes come from, and how a
gallery is searched.

- :mod:`.late_interaction`: the math, as pure reference functions (masks included).
- :mod:`.cpu_engine` / :mod:`.gather_engine`: the fast CPU kernels (fp32, bf16, int8) and the
  tiled any-device path; :mod:`.matchers` picks one by (store format, device).
- :mod:`.stores` / :mod:`.quantizers`: token stores as data (bytes, save, load) and the
  quantizers that train and encode them.
- :mod:`.vector_index` (stage 1), :mod:`.stages` (single, exhaustive, two-stage) and
  :mod:`.index` (a saved, checksummed gallery index).
- :mod:`.generators`: stage-1 candidate generators over token sets (MUVERA :mod:`.fde`,
  token-level IVF :mod:`.token_ivf`), reranked exactly; :mod:`.residual`: ColBERTv2 residual
  compression of token stores.

This package registers the built-in matchers, quantizers and stages.
"""

from __future__ import annotations

from typing import Any

from craterlab.hookspecs import hookimpl
from craterlab.lazy import lazy_exports

__all__ = [
    "Bf16Quantizer",
    "CodeStore",
    "Cosine",
    "ExhaustiveStage",
    "Fp16Quantizer",
    "Fp16Store",
    "Fp32Quantizer",
    "Fp32Store",
    "EncodedGallery",
    "Int8Quantizer",
    "Int8Store",
    "LateInteraction",
    "MuveraStage",
    "PQQuantizer",
    "PQStore",
    "ResidualQuantizer",
    "ResidualStore",
    "SearchResult",
    "SingleStage",
    "Stage1Settings",
    "TokenIvfStage",
    "TwoStage",
    "SingleVectorIndex",
    "quantize_int8",
]
__getattr__ = lazy_exports(
    __name__,
    {
        "Bf16Quantizer": "craterlab.retrieval.quantizers",
        "CodeStore": "craterlab.retrieval.stores",
        "Cosine": "craterlab.retrieval.matchers",
        "EncodedGallery": "craterlab.retrieval.index",
        "ExhaustiveStage": "craterlab.retrieval.stages",
        "Fp16Quantizer": "craterlab.retrieval.quantizers",
        "Fp16Store": "craterlab.retrieval.stores",
        "Fp32Quantizer": "craterlab.retrieval.quantizers",
        "Fp32Store": "craterlab.retrieval.stores",
        "Int8Quantizer": "craterlab.retrieval.quantizers",
        "Int8Store": "craterlab.retrieval.stores",
        "LateInteraction": "craterlab.retrieval.matchers",
        "MuveraStage": "craterlab.retrieval.generators",
        "PQQuantizer": "craterlab.retrieval.quantizers",
        "PQStore": "craterlab.retrieval.stores",
        "ResidualQuantizer": "craterlab.retrieval.residual",
        "ResidualStore": "craterlab.retrieval.residual",
        "SearchResult": "craterlab.retrieval.index",
        "SingleStage": "craterlab.retrieval.stages",
        "SingleVectorIndex": "craterlab.retrieval.vector_index",
        "Stage1Settings": "craterlab.retrieval.vector_index",
        "TokenIvfStage": "craterlab.retrieval.generators",
        "TwoStage": "craterlab.retrieval.stages",
        "quantize_int8": "craterlab.retrieval.quantizers",
    },
)


@hookimpl
def register_matchers(register: Any) -> None:
    register(
        "late_interaction",
        "craterlab.retrieval.matchers:LateInteraction",
        "Late interaction (1/Kq) sum_i max_j <q_i, g_j> with masks; CPU kernels fp32/bf16/int8",
    )
    register(
        "cosine",
        "craterlab.retrieval.matchers:Cosine",
        "Cosine of single vectors (K>1: normalized mean of the tokens)",
    )


@hookimpl
def register_quantizers(register: Any) -> None:
    register(
        "fp32",
        "craterlab.retrieval.quantizers:Fp32Quantizer",
        "FP32 tokens (no compression; 4 B per dimension)",
    )
    register(
        "fp16", "craterlab.retrieval.quantizers:Fp16Quantizer", "FP16 tokens (2 B per dimension)"
    )
    register(
        "bf16",
        "craterlab.retrieval.quantizers:Bf16Quantizer",
        "BF16 tokens (2 B per dimension; scored by the bf16 kernel)",
    )
    register(
        "int8",
        "craterlab.retrieval.quantizers:Int8Quantizer",
        "INT8 symmetric scalar (1 B/dim + 4 B scale per token or image)",
    )
    register(
        "pq",
        "craterlab.retrieval.quantizers:PQQuantizer",
        "Product quantization via FAISS (m bytes per token)",
    )
    register(
        "residual",
        "craterlab.retrieval.residual:ResidualQuantizer",
        "ColBERTv2 residual: centroid id + 1 or 2 bits per dimension, decoded on the fly",
    )


@hookimpl
def register_stages(register: Any) -> None:
    register(
        "single",
        "craterlab.retrieval.stages:SingleStage",
        "Stage 1 only: single-vector top-L (FAISS factory or torch)",
    )
    register(
        "exhaustive",
        "craterlab.retrieval.stages:ExhaustiveStage",
        "Late interaction over the whole gallery (tiled)",
    )
    register(
        "two_stage",
        "craterlab.retrieval.stages:TwoStage",
        "Stage-1 top-S shortlist, then matcher rerank",
    )
    register(
        "muvera",
        "craterlab.retrieval.generators:MuveraStage",
        "MUVERA fixed-dimensional encodings (FAISS) top-S, rerank",
    )
    register(
        "token_ivf",
        "craterlab.retrieval.generators:TokenIvfStage",
        "Token-level IVF union (PLAID pre-score) top-S, rerank",
    )
