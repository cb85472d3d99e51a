"""An encoded gallery: built once from vectors and tokens, queried many times by encoded
queries, without the backbone (the crater index of the workflows, which encodes images, is
:class:`craterlab.workflows.api.CraterIndex`; the stage-1 FAISS index is
:class:`craterlab.retrieval.vector_index.SingleVectorIndex`).

:class:`EncodedGallery` keeps the gallery's image ids (row i of every array is ``ids[i]``, so
ids are stable across save/load), its single vectors with a stage-1 index, and optionally its
token store. ``save(dir)`` writes::

    dir/meta.json        format version, stage-1 settings, who built it, counts, file manifest
    dir/ids.json         gallery image ids, in row order
    dir/vectors.bin      (N, D) float32 single vectors
    dir/stage1/          the FAISS index (index.faiss), or vectors.bin for 'torch'
    dir/store/           the token store (CodeStore.save: meta.json + raw .bin arrays)
    dir/generators/      multi-vector candidate generators built over it (generator_io)

``meta.json`` records every stage-1 setting (index, nprobe, ef_search, device), the caller's
``metadata`` (the run records its encoder and representation: backbone, weights, pooling,
tokens, K, quantizer), the counts (ids, vectors, stage-1 vectors, store items) and the size
and sha256 of every other file. ``EncodedGallery.load`` checks them all and names the file that
is missing, truncated, altered or from another gallery (``verify=False`` skips the checksums
of a huge index but still checks sizes and counts).

``add(ids, vectors, store)`` and ``remove(ids)`` update an index in place: ids stay stable
(rows are compacted, ids travel with them), nothing is re-encoded, Flat and IVF stage-1
indexes are updated incrementally (IVF ids renumbered in its inverted lists) and an HNSW graph,
which FAISS cannot delete from, is rebuilt on ``remove``.

``EncodedGallery.load(dir).search(...)`` answers queries from query vectors (and tokens, for
late interaction) computed by the same backbone, pooling and aggregator.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from craterlab.errors import ConfigError, DataError
from craterlab.hashing import sha256_of
from craterlab.plugins import get_registry
from craterlab.retrieval.matchers import LateInteraction
from craterlab.retrieval.stages import stage1_key
from craterlab.retrieval.stores import CodeStore, read_meta_file
from craterlab.retrieval.vector_index import SingleVectorIndex, Stage1Settings
from craterlab.safepaths import contained
from craterlab.types import Matcher, Ranking, RetrievalInputs, Tokens, TokenStore

FORMAT_VERSION = 2
"""Version 2 added the file manifest, the counts and the builder metadata."""


@dataclass
class SearchResult:
    """A ranking with the gallery ids resolved: ``ids[q][r]`` is the r-th result of query q."""

    ids: list[list[str]]
    ranking: Ranking


class EncodedGallery:
    """Gallery ids + single vectors with a stage-1 index + (optional) token store.

    ``index``, ``nprobe``, ``ef_search``, ``device``: the :class:`Stage1Settings` (or pass
    ``stage1``). ``metadata``: what built the index (encoder, representation), saved with it.
    """

    def __init__(
        self,
        ids: Sequence[str],
        vectors: torch.Tensor,
        store: TokenStore | None = None,
        index: str = "Flat",
        nprobe: int | None = None,
        ef_search: int | None = None,
        device: str = "auto",
        *,
        stage1: Stage1Settings | None = None,
        metadata: Mapping[str, Any] | None = None,
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
        self.stage1 = stage1 or Stage1Settings(index, nprobe, ef_search, device)
        self.metadata = dict(metadata or {})
        self.vindex: SingleVectorIndex | None = None
        self.prepared: dict[str, Any] = {}
        """Gallery-side structures the stages built over this gallery (reused by searches)."""

    @property
    def params(self) -> dict[str, Any]:
        """The stage-1 settings as a mapping (index, nprobe, ef_search, device)."""
        return self.stage1.as_dict()

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def _stage1(self) -> SingleVectorIndex:
        if self.vindex is None:
            self.vindex = self.stage1.make().build(self.vectors)
        return self.vindex

    def search(
        self,
        query_vectors: torch.Tensor,
        query_tokens: Tokens | None = None,
        *,
        mode: str = "two_stage",
        shortlist: int = 100,
        depth: int = 10,
        matcher: Matcher | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> SearchResult:
        """Top-``depth`` gallery ids per query, by the retrieval stage ``mode``: ``single``,
        ``two_stage``, ``exhaustive`` or any registered stage (a candidate generator such as
        ``muvera`` or ``token_ivf``), built through the registry from the index's stage-1
        settings, ``shortlist`` and ``options`` (further keys of the stage's config)."""
        if mode != "single" and (query_tokens is None or self.store is None):
            raise ConfigError(
                f"mode={mode!r} needs query tokens and a gallery token store; this index has "
                f"{'a' if self.store is not None else 'no'} store. Use mode='single' or build "
                "the index with tokens."
            )
        self._check_queries(query_vectors, query_tokens, mode)
        stage = get_registry().build("stage", self._stage_config(mode, shortlist, options))
        qt = query_tokens if query_tokens is not None else Tokens(query_vectors.unsqueeze(1))
        self.prepared[stage1_key(self.stage1)] = self._stage1()
        inputs = RetrievalInputs(
            query_vectors=query_vectors.float(),
            gallery_vectors=self.vectors,
            query_tokens=qt,
            gallery_store=self.store,  # type: ignore[arg-type]  # None only for mode='single'
            matcher=matcher or LateInteraction(self.stage1.device),
            depth=depth,
            prepared=self.prepared,
        )
        ranking = stage.search(inputs)
        ids = [[self.ids[j] if j >= 0 else "" for j in row] for row in ranking.indices.tolist()]
        return SearchResult(ids, ranking)

    def _stage_config(
        self, mode: str, shortlist: int, options: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """The stage config of ``mode``: the index's stage-1 settings for stages that search
        its single vectors (they take all of index, nprobe, ef_search and device), the
        shortlist, no timing, then ``options`` (a generator's own settings)."""
        component = get_registry().get("stage", mode)
        accepted = {p.name for p in component.params}
        stage1 = self.stage1.as_dict()
        offered: dict[str, Any] = {"shortlist": shortlist, "timing_queries": 0}
        if set(stage1) <= accepted:
            offered.update(stage1)
        config = {"name": mode, **{k: v for k, v in offered.items() if k in accepted}}
        config.update(options or {})
        return config

    def _check_queries(
        self, query_vectors: torch.Tensor, query_tokens: Tokens | None, mode: str
    ) -> None:
        """Queries must have the gallery's dimensions (else a one-paragraph error)."""
        built_by = self._built_by()
        if query_vectors.dim() != 2 or query_vectors.shape[1] != self.dim:
            raise DataError(
                f"Query vectors have shape {tuple(query_vectors.shape)}, but this gallery index "
                f"holds {self.dim}-dimensional vectors{built_by}. Encode the queries with the "
                "same backbone and pooling that built the index."
            )
        store_dim = self.store.dim if isinstance(self.store, CodeStore) else None
        if mode != "single" and query_tokens is not None and store_dim is not None:
            qdim = query_tokens.vectors.shape[-1]
            if query_tokens.vectors.dim() != 3 or qdim != store_dim:
                raise DataError(
                    f"Query tokens have shape {tuple(query_tokens.vectors.shape)}, but this "
                    f"gallery's token store holds {store_dim}-dimensional tokens{built_by}. "
                    "Compute the query tokens with the same backbone and aggregator."
                )
            if len(query_tokens) != len(query_vectors):
                raise DataError(
                    f"{len(query_vectors)} query vectors but {len(query_tokens)} query token "
                    "sets: pass one token set per query."
                )

    def _built_by(self) -> str:
        if not self.metadata:
            return ""
        items = ", ".join(f"{k}={v}" for k, v in self.metadata.items())
        return f" (built by {items})"

    # -- incremental updates: ids stay stable, nothing is re-encoded
    def add(self, ids: Sequence[str], vectors: torch.Tensor, store: TokenStore | None) -> None:
        """Append gallery items: their ids, single vectors and token store rows (a store of
        the same format, encoded with this store's codebook). The stage-1 index is updated
        incrementally (see :meth:`SingleVectorIndex.add`)."""
        ids = [str(i) for i in ids]
        clash = sorted(set(ids) & set(self.ids)) + [i for i in set(ids) if ids.count(i) > 1]
        if clash:
            raise DataError(
                f"Cannot add ids that are already in the gallery index: {', '.join(clash[:10])}. "
                "Remove them first, or give the new items other ids."
            )
        if len(vectors) != len(ids) or (store is not None and len(store) != len(ids)):
            raise DataError(f"{len(ids)} new ids but {len(vectors)} vectors / store rows.")
        if (store is None) != (self.store is None):
            raise DataError("Add token sets exactly when the index holds a token store.")
        self.prepared.clear()  # generators built over the old rows
        if self.store is not None:
            self.store = self.store.concat(store)  # type: ignore[attr-defined]
        self._stage1().add(vectors)
        self.vectors = torch.cat([self.vectors, vectors.detach().float().cpu()]).contiguous()
        self.ids = [*self.ids, *ids]

    def remove(self, ids: Sequence[str]) -> str:
        """Delete gallery items by id; the others keep their ids and order. Flat and IVF
        stage-1 indexes delete in place, an HNSW graph is rebuilt. Returns how."""
        row_of = {gid: i for i, gid in enumerate(self.ids)}
        unknown = [str(i) for i in ids if str(i) not in row_of]
        if unknown:
            raise DataError(
                f"{len(unknown)} id(s) to remove are not in the gallery index: "
                f"{', '.join(unknown[:10])}. Check the ids."
            )
        rows = np.unique(np.array([row_of[str(i)] for i in ids], dtype=np.int64))
        keep = torch.from_numpy(np.setdiff1d(np.arange(len(self.ids)), rows))
        remaining = self.vectors[keep].contiguous()
        how = self._stage1().remove(rows, remaining)
        self.prepared.clear()
        self.vectors = remaining
        if self.store is not None:
            self.store = self.store.take(keep)  # type: ignore[attr-defined]
        kept = set(keep.tolist())
        self.ids = [gid for i, gid in enumerate(self.ids) if i in kept]
        return how

    # -- save / load
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the index (see the module docstring); returns the directory."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / "ids.json").write_text(json.dumps(self.ids))
        self.vectors.numpy().tofile(path / "vectors.bin")
        vindex = self._stage1()
        vindex.save(path / "stage1")
        if self.store is not None:
            if not isinstance(self.store, CodeStore):
                raise DataError(
                    f"This token store ({type(self.store).__name__}) cannot be saved: only "
                    "craterlab's CodeStore formats can. Quantize with a built-in quantizer."
                )
            self.store.save(path / "store")
        generators = self._save_generators(path / "generators")
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.name != "meta.json" or _is_store_meta(p)
        )
        meta = {
            "format_version": FORMAT_VERSION,
            "n": len(self.ids),
            "dim": self.dim,
            "has_store": self.store is not None,
            **self.stage1.as_dict(),
            "built_by": self.metadata,
            "generators": generators,
            "counts": {
                "ids": len(self.ids),
                "vectors": len(self.vectors),
                "stage1": vindex.ntotal,
                "store": None if self.store is None else len(self.store),
            },
            "files": {
                p.relative_to(path).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
                for p in files
            },
        }
        (path / "meta.json").write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        device: str | None = None,
        *,
        verify: bool = True,
        mmap: bool = False,
    ) -> EncodedGallery:
        """An index written by :meth:`save`; no backbone or images needed.

        ``mmap=True`` maps the token store from disk instead of reading it into memory (for
        galleries larger than RAM; pair it with ``verify=False`` to skip hashing it).

        Every file is checked against the manifest in ``meta.json`` (present, same size, and
        with ``verify`` the same sha256) and the counts must agree; a problem is a
        :class:`DataError` naming the file. ``verify=False`` skips the checksums (for indexes
        too large to hash at every load).
        """
        path = Path(directory)
        meta = _read_meta(path)
        _check_files(path, meta["files"], verify)
        ids = json.loads((path / "ids.json").read_text())
        n, dim = meta["n"], meta["dim"]
        counts = meta["counts"]
        if len(ids) != n or counts["ids"] != n or counts["vectors"] != n or counts["stage1"] != n:
            raise DataError(
                f"Gallery index {path} is inconsistent: {len(ids)} ids in ids.json, counts "
                f"{counts}, n={n} in meta.json. Rebuild the index."
            )
        vectors = torch.from_numpy(np.fromfile(path / "vectors.bin", np.float32).reshape(n, dim))
        store = CodeStore.load(path / "store", mmap=mmap) if meta["has_store"] else None
        if store is not None and len(store) != n:
            raise DataError(
                f"Token store {path / 'store'} holds {len(store)} images but the index has {n} "
                "gallery ids: it belongs to another gallery. Rebuild the index."
            )
        settings = Stage1Settings.from_dict(meta)
        if device is not None:
            settings = Stage1Settings(settings.index, settings.nprobe, settings.ef_search, device)
        out = cls(ids, vectors, store, stage1=settings, metadata=meta.get("built_by") or {})
        out.vindex = settings.make().load(path / "stage1", n, dim)
        for kind in meta.get("generators") or {}:
            from craterlab.retrieval.generator_io import load_generator

            kind, gen = load_generator(path / "generators" / str(kind), store)
            out.prepared[f"generator:{kind}"] = gen
        return out

    def prepare_generator(self, mode: str, options: Mapping[str, Any] | None = None) -> bool:
        """Build (and keep, so :meth:`save` writes it) the candidate generator that searches
        with ``mode`` and ``options`` use; False when ``mode`` has none (e.g. two_stage)."""
        stage = get_registry().build("stage", self._stage_config(mode, 100, options))
        prepare = getattr(stage, "prepare", None)
        if prepare is None or self.store is None or not self.ids:
            return False
        prepare(self.store, self.prepared)
        return True

    def _save_generators(self, directory: Path) -> dict[str, Any]:
        """Write the generators kept over these rows; returns {kind: identity}."""
        from craterlab.retrieval.generator_io import save_generator

        if directory.exists():
            shutil.rmtree(directory)  # an older save's generators
        out = {}
        for key, gen in self.prepared.items():
            if key.startswith("generator:") and gen.ntotal == len(self.ids):
                kind = key.split(":", 1)[1]
                save_generator(gen, kind, directory / kind)
                out[kind] = gen.identity()
        return out


def _is_store_meta(p: Path) -> bool:
    return p.name == "meta.json" and p.parent.name == "store"


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / "meta.json"
    meta = read_meta_file(
        path,
        "gallery index",
        missing="Build one and save it with EncodedGallery.save(dir) first.",
        damaged="Rebuild the index.",
    )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(
            f"Gallery index {path} has format version {version}, this craterlab reads version "
            f"{FORMAT_VERSION} (which records file checksums). Rebuild the index with "
            "EncodedGallery.save or save_index=true."
        )
    for key in ("n", "dim", "has_store", "counts", "files"):
        if key not in meta:
            raise DataError(f"Gallery index metadata {file} lacks {key!r}. Rebuild the index.")
    problems = []
    for key in ("n", "dim"):
        if not _count(meta[key]) or (key == "dim" and meta[key] == 0):
            problems.append(f"{key}={meta[key]!r} (a count)")
    if not isinstance(meta["has_store"], bool):
        problems.append(f"has_store={meta['has_store']!r} (true or false)")
    counts = meta["counts"]
    if not isinstance(counts, dict) or not all(
        _count(counts.get(k)) for k in ("ids", "vectors", "stage1")
    ):
        problems.append(f"counts={counts!r} (ids, vectors, stage1: counts)")
    if not isinstance(meta.get("index", "Flat"), str):
        problems.append(f"index={meta.get('index')!r} (a FAISS factory string)")
    for key in ("nprobe", "ef_search"):
        value = meta.get(key)
        if value is not None and (not _count(value) or value == 0):
            problems.append(f"{key}={value!r} (a whole number >= 1, or null)")
    if problems:
        raise DataError(
            f"Gallery index metadata {file} has invalid values: {'; '.join(problems)}. The file "
            "was damaged or edited by hand. Rebuild the index (or restore the value)."
        )
    return meta


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_files(path: Path, files: dict[str, dict[str, Any]], verify: bool) -> None:
    """Each manifest file exists with its recorded size (and sha256 when ``verify``)."""
    if not isinstance(files, dict):
        raise DataError(f"Gallery index {path}: meta.json's 'files' is not a mapping. Rebuild it.")
    for rel, info in files.items():
        file = contained(path, rel, f"Gallery index metadata {path / 'meta.json'}")
        if not (
            isinstance(info, dict)
            and isinstance(info.get("bytes"), int)
            and isinstance(info.get("sha256"), str)
        ):
            raise DataError(
                f"Gallery index metadata {path / 'meta.json'} has a damaged entry for {rel!r} "
                "(it needs 'bytes' and 'sha256'). Rebuild the index."
            )
        if not file.is_file():
            raise DataError(
                f"Gallery index file {file} is missing (the index's manifest lists it). "
                "Restore it or rebuild the index."
            )
        size = file.stat().st_size
        if size != info["bytes"]:
            raise DataError(
                f"Gallery index file {file} has {size} bytes, {info['bytes']} were saved: it "
                "is truncated or was replaced. Restore it or rebuild the index."
            )
        if verify and sha256_of(file) != info["sha256"]:
            raise DataError(
                f"Gallery index file {file} does not match its saved checksum: its content "
                "changed after saving (damaged, or copied from another index). Restore it or "
                "rebuild the index (EncodedGallery.load(..., verify=False) skips this check)."
            )
