"""Typed values that flow between pipeline stages, and the interfaces components implement.

Data flows one way::

    CraterDataset -> Backbone.encode -> Features -> Pooling / Selector / Aggregator
        -> vectors (N, D) and Tokens (N, K, D) -> Quantizer -> TokenStore
        -> Stage (index search, rerank, exhaustive) -> Ranking -> metrics

Every component kind is a small protocol here, so a third-party plugin knows exactly what to
return. Heavy values are torch tensors; scoring and token functions are pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset: a gallery crop, a query view or a training crop.

    ``relevant_ids`` is the cluster-tolerant relevance set I(q) of a query: the crater ids
    co-visible in its view. It is empty for gallery and train images.
    """

    image_id: str
    crater_id: int
    view_type: str = ""
    path: str | None = None
    relevant_ids: frozenset[int] = frozenset()


class CraterDataset(Protocol):
    """A retrieval benchmark: a gallery, queries with relevance sets, and a training split."""

    name: str

    def records(self, split: str) -> Sequence[ImageRecord]:
        """Records of one split: ``"gallery"``, ``"query"`` or ``"train"`` (may be empty)."""
        ...

    def load_image(self, record: ImageRecord) -> Image.Image:
        """The image as an RGB PIL image; a corrupt or missing file raises a
        :class:`craterlab.errors.CraterlabError` that names its path."""
        ...

    def identity(self) -> str:
        """A string that changes whenever the images could change (used as a cache key)."""
        ...


# --------------------------------------------------------------------------- features


@dataclass
class Features:
    """Backbone output for N images.

    ``cls``: (N, D) CLS token (or a pooled global vector for CNNs).
    ``tokens``: (N, T, D) patch tokens in raster order over ``grid`` = (rows, cols).
    ``attn``: (N, T) last-block CLS->patch attention averaged over heads (rows sum to 1), or
    None for models without attention.
    """

    cls: torch.Tensor
    tokens: torch.Tensor
    attn: torch.Tensor | None
    grid: tuple[int, int]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: slice | torch.Tensor) -> Features:
        return Features(
            cls=self.cls[index],
            tokens=self.tokens[index],
            attn=None if self.attn is None else self.attn[index],
            grid=self.grid,
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Features:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype or t.dtype)

        return Features(
            cls=move(self.cls),
            tokens=move(self.tokens),
            attn=None if self.attn is None else move(self.attn),
            grid=self.grid,
        )


@dataclass
class Tokens:
    """A set of K token vectors per image: ``vectors`` (N, K, D), ``mask`` (N, K) bool or None.

    ``mask[i, j]`` is False where image i has fewer than K real tokens (padding).
    """

    vectors: torch.Tensor
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def __getitem__(self, index: slice | torch.Tensor) -> Tokens:
        return Tokens(self.vectors[index], None if self.mask is None else self.mask[index])


class Backbone(Protocol):
    """A frozen vision model that turns image batches into :class:`Features`."""

    dim: int
    has_attention: bool
    model: torch.nn.Module
    weights_status: str
    """How the weights were obtained: 'pretrained', 'checkpoint:<path>', 'random (requested)' or
    'random (fallback: ...)'; the run prints it and tags the MLflow run with it."""

    def transform(self, image: Image.Image) -> torch.Tensor:
        """One PIL image to a normalized (3, H, W) tensor, following the model's own config."""
        ...

    def encode(self, images: torch.Tensor) -> Features:
        """A (B, 3, H, W) batch on the model's device to features (no gradients)."""
        ...

    def forward_features(self, images: torch.Tensor) -> Features:
        """Like ``encode`` but with gradients (fine-tuning uses it)."""
        ...

    def to(self, device: torch.device | str) -> Backbone: ...

    def identity(self) -> dict[str, Any]:
        """Everything that determines the features (model, weights, transform); a cache key."""
        ...


class Pooling(Protocol):
    """Features -> one L2-normalized vector per image, (N, D)."""

    def __call__(self, features: Features) -> torch.Tensor: ...


class Selector(Protocol):
    """Features -> K of the patch tokens per image (L2-normalized)."""

    def __call__(self, features: Features) -> Tokens: ...


class Aggregator(Protocol):
    """Features -> K aggregated tokens per image (L2-normalized).

    Aggregators that learn from the gallery (VLAD centroids) implement ``fit``; the run calls it
    on the gallery features before aggregating anything.
    """

    def __call__(self, features: Features) -> Tokens: ...


class Matcher(Protocol):
    """Scores queries against gallery token sets; pure functions of tensors."""

    def score(self, queries: Tokens, gallery: Tokens) -> torch.Tensor:
        """(Nq, Ng) scores of every query against every gallery item."""
        ...

    def rerank(self, queries: Tokens, gallery: Tokens, candidates: torch.Tensor) -> torch.Tensor:
        """(Nq, S) scores of each query against its own candidate gallery indices (Nq, S)."""
        ...


@runtime_checkable
class StoreMatcher(Matcher, Protocol):
    """A matcher that scores a :class:`TokenStore` from its codes (choosing a kernel by the
    store's format and its device) instead of scoring the decoded tokens. Stages use these
    methods when a matcher has them, else they decode the store and call ``score``/``rerank``."""

    def score_store(self, queries: Tokens, store: TokenStore) -> torch.Tensor:
        """(Nq, Ng) scores of every query against every item of the store."""
        ...

    def rerank_store(
        self, queries: Tokens, store: TokenStore, candidates: torch.Tensor
    ) -> torch.Tensor:
        """(Nq, S) scores of each query against its candidate rows of the store (-1: none)."""
        ...


class TokenStore(Protocol):
    """Encoded gallery tokens as a quantizer stores them: data only (no scoring)."""

    def __len__(self) -> int: ...

    @property
    def nbytes(self) -> int:
        """Bytes of the stored codes (what a deployment keeps per gallery)."""
        ...

    def bytes_per_image(self) -> float: ...

    def decode(self, index: slice | torch.Tensor | None = None) -> Tokens:
        """Tokens reconstructed from the codes (all images, or the given indices)."""
        ...


class Quantizer(Protocol):
    """Compresses token sets; ``fit`` on gallery tokens first (a no-op for scalar formats)."""

    def fit(self, tokens: Tokens) -> None: ...

    def encode(self, tokens: Tokens) -> TokenStore: ...


# --------------------------------------------------------------------------- retrieval


@dataclass
class RetrievalInputs:
    """What a retrieval stage may use: single vectors, token sets, a matcher, the depth.

    Stages never see the backbone or the images. ``prepared`` holds gallery-side structures
    already built over exactly this gallery (a loaded index's stage-1 index, a candidate
    generator's index), keyed by the settings that built them: a stage reuses the entry of its
    own settings and adds what it builds, so an index searched many times builds each once.
    """

    query_vectors: torch.Tensor
    gallery_vectors: torch.Tensor
    query_tokens: Tokens
    gallery_store: TokenStore
    matcher: Matcher
    depth: int
    prepared: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageReport:
    """What a stage measured about itself, in a form a run logs without knowing the stage.

    ``bytes_per_image``: what a deployment of this mode stores per gallery image (stage-1
    index and/or token store). ``latency_ms``: per-query latencies in milliseconds of each timed
    part, batched (a block's time divided by its size), including ``total`` (the mode's
    per-query cost); ``single_latency_ms``: the same parts timed one query at a time.
    ``reference``: this ranking is the exact answer that approximate modes are measured against
    (exhaustive late interaction); ``recovers_reference``: report ``mAP_recovered``, this mode's
    mAP over the reference's. ``stage1``: the stage-1 index settings used (``index``,
    ``nprobe``, ``ef_search``), or None for a stage without one.
    """

    bytes_per_image: float
    latency_ms: dict[str, list[float]] = field(default_factory=dict)
    single_latency_ms: dict[str, list[float]] = field(default_factory=dict)
    reference: bool = False
    recovers_reference: bool = False
    stage1: dict[str, Any] | None = None

    @classmethod
    def from_timings(
        cls, timings_ms: dict[str, list[float]], bytes_per_image: float = float("nan")
    ) -> StageReport:
        """A report for a stage that fills only ``Ranking.timings_ms`` (third-party stages):
        ``*_single`` keys are single-query latencies; the total is ``total`` when present, else
        the sum of the parts' means."""
        batched = {k: v for k, v in timings_ms.items() if not k.endswith("_single")}
        single = {k[: -len("_single")]: v for k, v in timings_ms.items() if k.endswith("_single")}
        if "total" not in batched:
            parts = [v for v in batched.values() if v]
            n = max((len(v) for v in parts), default=0)
            if n:
                batched["total"] = [sum(float(np.mean(v)) for v in parts)] * n
        return cls(bytes_per_image, batched, single)

    def timings_ms(self) -> dict[str, list[float]]:
        """The latencies as one flat mapping (single-query parts get a ``_single`` suffix)."""
        out = dict(self.latency_ms)
        out.update({f"{k}_single": v for k, v in self.single_latency_ms.items()})
        return out

    def metrics(self) -> dict[str, float]:
        """p50/p95 latency of every part (``latency_<part>[_single]_p50_ms``), the mean total
        per query (``ms_per_query``) and ``bytes_per_image``."""
        out: dict[str, float] = {}
        for part, values in self.timings_ms().items():
            out[f"latency_{part}_p50_ms"] = _percentile(values, 50)
            out[f"latency_{part}_p95_ms"] = _percentile(values, 95)
        total = self.latency_ms.get("total") or []
        out["ms_per_query"] = float(np.mean(total)) if total else float("nan")
        out["bytes_per_image"] = float(self.bytes_per_image)
        return out


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class Ranking:
    """Per-query ranked gallery indices (Nq, L) and their scores, best first.

    ``shortlist`` holds the stage-1 candidates (Nq, S) for two-stage retrieval, so R@S can be
    measured. ``report`` is the stage's own :class:`StageReport` (bytes, latencies, role);
    ``timings_ms`` is its flat view (part name -> per-query ms, ``_single`` suffix for
    one-query-at-a-time timings) and ``extra`` holds other figures to log (``index_bytes``,
    ``store_bytes``, ``shortlist``, ...).
    """

    indices: torch.Tensor
    scores: torch.Tensor
    shortlist: torch.Tensor | None = None
    timings_ms: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)
    report: StageReport | None = None

    def stage_report(self, default_bytes: float = float("nan")) -> StageReport:
        """``report``, or one derived from ``timings_ms`` (and ``default_bytes`` per image) for
        stages that do not write one."""
        if self.report is not None:
            return self.report
        return StageReport.from_timings(self.timings_ms, default_bytes)


class Stage(Protocol):
    """A retrieval mode (single-vector, exhaustive late interaction, two-stage)."""

    def search(self, inputs: RetrievalInputs) -> Ranking: ...


class Loss(Protocol):
    """A metric-learning loss over a batch of embeddings (B, D) and integer labels (B,)."""

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Fittable(Protocol):
    """Components that learn something from the gallery before use (VLAD, PCA, PQ)."""

    def fit(self, features: Any) -> None: ...
