"""A gallery index that is built once and queried many times, without the backbone.

:class:`GalleryIndex` keeps the gallery's image ids (row i of every array is ``ids[i]``, so
ids are stable across save/load), its single vectors with a stage-1 index, and optionally its
token store. ``save(dir)`` writes::

    dir/meta.json        format version, index spec and knobs, sizes
    dir/ids.json         gallery image ids, in row order
    dir/vectors.bin      (N, D) float32 single vectors
    dir/stage1/          the FAISS index (index.faiss), or nothing extra for 'torch'
    dir/store/           the token store (CodeStore.save: meta.json + raw .bin arrays)

``GalleryIndex.load(dir).search(...)`` answers queries from query vectors (and tokens, for
late interaction) computed by the same backbone/pooling/aggregator.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from craterlab.devices import resolve_device
from craterlab.errors import ConfigError, DataError
from craterlab.matching import LateInteraction
from craterlab.quantization import CodeStore
from craterlab.retrieval.stages import ExhaustiveStage, SingleStage, TwoStage
from craterlab.retrieval.vector_index import VectorIndex
from craterlab.types import Matcher, Ranking, RetrievalInputs, Tokens

FORMAT_VERSION = 1


@dataclass
class SearchResult:
    """A ranking with the gallery ids resolved: ``ids[q][r]`` is the r-th result of query q."""

    ids: list[list[str]]
    ranking: Ranking


class GalleryIndex:
    """Gallery ids + single vectors with a stage-1 index + (optional) token store."""

    def __init__(
        self,
        ids: Sequence[str],
        vectors: torch.Tensor,
        store: Any | None = None,
        index: str = "Flat",
        nprobe: int | None = None,
        ef_search: int | None = None,
        device: str = "auto",
    ) -> None:
        ids = [str(i) for i in ids]
        if len(ids) != len(vectors):
            raise DataError(f"{len(ids)} gallery ids but {len(vectors)} gallery vectors.")
        if len(set(ids)) != len(ids):
            raise DataError("Gallery ids must be unique (they identify results after loading).")
        if store is not None and len(store) != len(ids):
            raise DataError(f"{len(ids)} gallery ids but a token store of {len(store)} images.")
        self.ids = ids
        self.vectors = vectors.detach().float().cpu().contiguous()
        self.store = store
        self.params = {"index": index, "nprobe": nprobe, "ef_search": ef_search, "device": device}
        self.vindex: VectorIndex | None = None

    def _stage1(self) -> VectorIndex:
        if self.vindex is None:
            stage = SingleStage(**self.params)
            self.vindex = stage.make_index(self.vectors)
        return self.vindex

    def search(
        self,
        query_vectors: torch.Tensor,
        query_tokens: Tokens | None = None,
        *,
        mode: Literal["single", "two_stage", "exhaustive"] = "two_stage",
        shortlist: int = 100,
        depth: int = 10,
        matcher: Matcher | None = None,
    ) -> SearchResult:
        """Top-``depth`` gallery ids per query, by single vectors, two-stage, or exhaustive LI."""
        if mode != "single" and (query_tokens is None or self.store is None):
            raise ConfigError(
                f"mode={mode!r} needs query tokens and a gallery token store; this index has "
                f"{'a' if self.store is not None else 'no'} store. Use mode='single' or build "
                "the index with tokens."
            )
        if mode == "single":
            stage: Any = SingleStage(**self.params, timing_queries=0)
        elif mode == "two_stage":
            stage = TwoStage(shortlist, **self.params, timing_queries=0)
        elif mode == "exhaustive":
            stage = ExhaustiveStage(timing_queries=0)
        else:
            raise ConfigError(f"Unknown mode {mode!r}; use 'single', 'two_stage' or 'exhaustive'.")
        if isinstance(stage, SingleStage):
            stage.prebuilt = self._stage1()
        qt = query_tokens if query_tokens is not None else Tokens(query_vectors.unsqueeze(1))
        inputs = RetrievalInputs(
            query_vectors=query_vectors.float(),
            gallery_vectors=self.vectors,
            query_tokens=qt,
            gallery_store=self.store,
            matcher=matcher or LateInteraction(self.params["device"]),
            depth=depth,
        )
        ranking = stage.search(inputs)
        ids = [[self.ids[j] if j >= 0 else "" for j in row] for row in ranking.indices.tolist()]
        return SearchResult(ids, ranking)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the index (see the module docstring); returns the directory."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / "ids.json").write_text(json.dumps(self.ids))
        self.vectors.numpy().tofile(path / "vectors.bin")
        self._stage1().save(path / "stage1")
        if self.store is not None:
            if not hasattr(self.store, "save"):
                raise DataError("This token store cannot be saved (it has no save method).")
            self.store.save(path / "store")
        meta = {
            "format_version": FORMAT_VERSION,
            "n": len(self.ids),
            "dim": int(self.vectors.shape[1]),
            "has_store": self.store is not None,
            **self.params,
        }
        (path / "meta.json").write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str], device: str | None = None) -> GalleryIndex:
        """An index written by :meth:`save`; no backbone or images needed."""
        path = Path(directory)
        if not (path / "meta.json").exists():
            raise DataError(
                f"No gallery index at {path} (missing meta.json). Build one and save it with "
                "GalleryIndex.save(dir) first."
            )
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"Gallery index {path} has format version {meta.get('format_version')}, this "
                f"craterlab reads version {FORMAT_VERSION}. Rebuild the index."
            )
        ids = json.loads((path / "ids.json").read_text())
        n, dim = meta["n"], meta["dim"]
        vectors = torch.from_numpy(np.fromfile(path / "vectors.bin", np.float32).reshape(n, dim))
        store = CodeStore.load(path / "store") if meta["has_store"] else None
        params = {k: meta[k] for k in ("index", "nprobe", "ef_search", "device")}
        if device is not None:
            params["device"] = device
        out = cls(ids, vectors, store, **params)
        vi = VectorIndex(
            params["index"], params["nprobe"], params["ef_search"], resolve_device(params["device"])
        )
        out.vindex = vi.load(path / "stage1", n, dim)
        return out
