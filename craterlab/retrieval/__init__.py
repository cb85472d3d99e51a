"""Built-in retrieval plugins: stages (single-vector, exhaustive late interaction, two-stage)
and the saved gallery index (:class:`GalleryIndex`)."""

from __future__ import annotations

from typing import Any

from craterlab.hookspecs import hookimpl
from craterlab.retrieval.index import GalleryIndex, SearchResult
from craterlab.retrieval.stages import ExhaustiveStage, SingleStage, TwoStage
from craterlab.retrieval.vector_index import VectorIndex

__all__ = [
    "ExhaustiveStage",
    "GalleryIndex",
    "SearchResult",
    "SingleStage",
    "TwoStage",
    "VectorIndex",
]


@hookimpl
def register_stages(register: Any) -> None:
    register("single", SingleStage, "Stage 1 only: single-vector top-L (FAISS factory or torch)")
    register("exhaustive", ExhaustiveStage, "Late interaction over the whole gallery (tiled)")
    register("two_stage", TwoStage, "Stage-1 top-S shortlist, then matcher rerank")
