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
from craterlab.retrieval.generators import MuveraStage, TokenIvfStage
from craterlab.retrieval.index import EncodedGallery, SearchResult
from craterlab.retrieval.matchers import Cosine, LateInteraction
from craterlab.retrieval.quantizers import (
    Bf16Quantizer,
    Fp16Quantizer,
    Fp32Quantizer,
    Int8Quantizer,
    PQQuantizer,
    quantize_int8,
)
from craterlab.retrieval.residual import ResidualQuantizer, ResidualStore
from craterlab.retrieval.stages import ExhaustiveStage, SingleStage, TwoStage
from craterlab.retrieval.stores import CodeStore, Fp16Store, Fp32Store, Int8Store, PQStore
from craterlab.retrieval.vector_index import SingleVectorIndex, Stage1Settings

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


@hookimpl
def register_matchers(register: Any) -> None:
    register(
        "late_interaction",
        LateInteraction,
        "Late interaction (1/Kq) sum_i max_j <q_i, g_j> with masks; CPU kernels fp32/bf16/int8",
    )
    register("cosine", Cosine, "Cosine of single vectors (K>1: normalized mean of the tokens)")


@hookimpl
def register_quantizers(register: Any) -> None:
    register("fp32", Fp32Quantizer, "FP32 tokens (no compression; 4 B per dimension)")
    register("fp16", Fp16Quantizer, "FP16 tokens (2 B per dimension)")
    register("bf16", Bf16Quantizer, "BF16 tokens (2 B per dimension; scored by the bf16 kernel)")
    register(
        "int8", Int8Quantizer, "INT8 symmetric scalar (1 B/dim + 4 B scale per token or image)"
    )
    register("pq", PQQuantizer, "Product quantization via FAISS (m bytes per token)")
    register(
        "residual",
        ResidualQuantizer,
        "ColBERTv2 residual: centroid id + 1 or 2 bits per dimension, decoded on the fly",
    )


@hookimpl
def register_stages(register: Any) -> None:
    register("single", SingleStage, "Stage 1 only: single-vector top-L (FAISS factory or torch)")
    register("exhaustive", ExhaustiveStage, "Late interaction over the whole gallery (tiled)")
    register("two_stage", TwoStage, "Stage-1 top-S shortlist, then matcher rerank")
    register("muvera", MuveraStage, "MUVERA fixed-dimensional encodings (FAISS) top-S, rerank")
    register("token_ivf", TokenIvfStage, "Token-level IVF union (PLAID pre-score) top-S, rerank")
