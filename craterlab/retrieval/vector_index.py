"""Stage-1 single-vector indexes: FAISS factory strings, or an exact torch matmul + top-k.

``index`` is a FAISS ``index_factory`` string over inner product ("Flat", "IVF1024,Flat",
"HNSW32", "IVF256,PQ48", ...) or ``"torch"``: exact inner-product search by chunked matmul +
topk (fp16 on CUDA). On CPU, FAISS ``Flat`` is the faster exact search on the benchmark
machine (``benchmarks/bench_retrieval.py`` times both side by side); ``torch`` is there for
GPUs. Search knobs (``nprobe`` for IVF,
``efSearch`` for HNSW) are applied when the index has them.

``index=auto`` picks by gallery size (:func:`auto_index`), from single-query measurements on
noisy "families" data (``benchmarks/bench_single_query.py``, recall of the exact pipeline's
top-10 after the rerank): exact ``Flat`` below 50,000 items; ``HNSW32`` with efSearch 32 from
50,000 (a Flat scan of 50,000 x 384 floats is memory-bound at several ms; FAISS's default
efSearch 16 kept 0.979 of the exact top-10, 32 keeps 0.994); ``PQ96x4fs`` from 1,000,000: an
exhaustive scan of 4-bit fast-scan PQ codes (48 bytes per item, built in seconds), which kept
0.997 where ``IVF1024,PQ48`` with nprobe 32 kept 0.54 (the relevant items' single vectors lie
in other cells) and HNSW32 took 730 s to build. Its cost grows with N (about 2.5 ms per query
and core at 1M). Searches of a few queries run FAISS on one thread (:data:`FEW_QUERIES`): a
Flat search of one query at 50,000 took 7.8 ms on two OpenMP threads and 3.6 ms on one.

:class:`Stage1Settings` is the one place these settings live: stages, the saved gallery index
and the run all pass it around, and a saved index records every field of it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from craterlab.devices import compute_dtype, resolve_device
from craterlab.errors import ConfigError, DataError
from craterlab.retrieval.timing import timed_blocks

AUTO_HNSW_FROM = 50_000
AUTO_PQ_FROM = 1_000_000
AUTO_EF_SEARCH = 32
FEW_QUERIES = 4
"""Searches of at most this many queries run FAISS single-threaded (no OpenMP team)."""


def auto_index(n: int) -> tuple[str, int | None, int | None]:
    """(factory string, nprobe, efSearch) that ``index=auto`` builds for ``n`` items."""
    if n >= AUTO_PQ_FROM:
        return "PQ96x4fs", None, None
    if n >= AUTO_HNSW_FROM:
        return "HNSW32", None, AUTO_EF_SEARCH
    return "Flat", None, None


def search_threads(nq: int) -> int:
    """FAISS threads for a search of ``nq`` queries: 1 for a few, all of them otherwise."""
    return 1 if nq <= FEW_QUERIES else faiss.omp_get_max_threads()


@dataclass(frozen=True)
class Stage1Settings:
    """Everything that defines a stage-1 index: the FAISS factory string (or 'torch'), the
    IVF ``nprobe`` and HNSW ``ef_search`` search knobs (None: FAISS's defaults) and the device
    of the 'torch' index ('auto', 'cpu', 'cuda', ...)."""

    index: str = "Flat"
    nprobe: int | None = None
    ef_search: int | None = None
    device: str = "auto"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stage1Settings:
        """Settings from a mapping (a saved index's metadata); unknown keys are ignored."""
        return cls(**{k: data[k] for k in ("index", "nprobe", "ef_search", "device") if k in data})

    def make(self, chunk: int = 1000) -> SingleVectorIndex:
        """An empty index with these settings (``build`` or ``load`` fills it)."""
        return SingleVectorIndex(
            self.index, self.nprobe, self.ef_search, resolve_device(self.device), chunk
        )


class SingleVectorIndex:
    """Top-k inner-product search over the gallery's single vectors; ids are row numbers."""

    def __init__(
        self,
        index: str = "Flat",
        nprobe: int | None = None,
        ef_search: int | None = None,
        device: str | torch.device = "cpu",
        chunk: int = 1000,
    ) -> None:
        self.spec = index
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.device = torch.device(device)
        self.chunk = max(1, chunk)
        self.faiss_index: Any = None
        self.vectors: torch.Tensor | None = None
        self.dim: int | None = None
        self.ntotal = 0
        self._nbytes: tuple[tuple[int, int], int] | None = None

    @property
    def settings(self) -> Stage1Settings:
        return Stage1Settings(self.spec, self.nprobe, self.ef_search, str(self.device))

    @property
    def is_torch(self) -> bool:
        return self.spec.lower() == "torch"

    def build(self, vectors: torch.Tensor) -> SingleVectorIndex:
        """Train (if the index needs it) and add the gallery vectors (N, D)."""
        v = vectors.detach().float()
        if v.dim() != 2:
            raise DataError(f"Gallery vectors must be (N, D); got shape {tuple(v.shape)}.")
        self.dim = v.shape[1]
        self.ntotal = v.shape[0]
        if self.spec.lower() == "auto":  # resolved once, by gallery size; saved resolved
            self.spec, nprobe, ef = auto_index(self.ntotal)
            self.nprobe = self.nprobe if self.nprobe is not None else nprobe
            self.ef_search = self.ef_search if self.ef_search is not None else ef
        if self.is_torch:
            dt = compute_dtype(self.device)
            self.vectors = v.to(self.device, dt).contiguous()
            return self
        try:
            index = faiss.index_factory(self.dim, self.spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ConfigError(
                f"FAISS cannot build index {self.spec!r}: {str(exc).splitlines()[0][:200]}. "
                "Use a faiss index_factory string such as 'Flat', 'IVF1024,Flat' or 'HNSW32', "
                "or 'torch' for exact search by matmul."
            ) from None
        x = np.ascontiguousarray(v.cpu().numpy(), dtype=np.float32)
        if not index.is_trained:
            nlist = ivf_lists(index)
            if nlist is not None and x.shape[0] < nlist:
                raise ConfigError(
                    f"Index {self.spec!r} has {nlist} IVF lists but the gallery has only "
                    f"{x.shape[0]} vectors to train them. Use fewer lists (e.g. "
                    f"'IVF{max(1, x.shape[0] // 39)},Flat') or index=Flat."
                )
            index.train(x)
        index.add(x)
        self.faiss_index = index
        self._apply_knobs()
        return self

    def _apply_knobs(self) -> None:
        ps = faiss.ParameterSpace()
        for name, value in (("nprobe", self.nprobe), ("efSearch", self.ef_search)):
            if value is None:
                continue
            try:
                ps.set_index_parameter(self.faiss_index, name, int(value))
            except RuntimeError:
                raise ConfigError(
                    f"Index {self.spec!r} has no search parameter {name!r}; nprobe applies to "
                    "IVF indexes and ef_search to HNSW ones. Remove it from the stage config."
                ) from None

    def search(
        self, queries: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """(scores, indices) of the top-k, each (Nq, k) on CPU, and per-query latencies (ms,
        amortized over each chunk of queries). Missing results (approximate indexes) are -1."""
        q = queries.detach().float()
        if q.dim() != 2 or (self.dim is not None and q.shape[1] != self.dim):
            raise DataError(
                f"Query vectors have shape {tuple(q.shape)} but this index holds "
                f"{self.dim}-dimensional gallery vectors. Encode the queries with the backbone "
                "and pooling that built the index."
            )
        nq = q.shape[0]
        k = min(k, self.ntotal)
        scores = torch.empty(nq, k)
        ids = torch.empty(nq, k, dtype=torch.long)

        def block(q0: int, q1: int) -> None:
            scores[q0:q1], ids[q0:q1] = self._search_chunk(q[q0:q1], k)

        lat = timed_blocks(nq, self.chunk, block)
        return scores, ids, lat

    def _search_chunk(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_torch:
            assert self.vectors is not None
            sim = q.to(self.device, self.vectors.dtype) @ self.vectors.T
            s, i = sim.topk(k, dim=1)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return s.float().cpu(), i.cpu()
        x = np.ascontiguousarray(q.cpu().numpy())
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(search_threads(len(x)))
        try:
            s, i = self.faiss_index.search(x, k)
        finally:
            faiss.omp_set_num_threads(threads)
        return torch.from_numpy(s), torch.from_numpy(i).long()

    @property
    def nbytes(self) -> int:
        """Size of the serialized index (the vectors for 'torch'). Serializing a FAISS index
        is O(N), and stages report this per search call, so it is kept until the index changes
        (build, load, add, remove)."""
        if self.is_torch:
            return 0 if self.vectors is None else self.ntotal * (self.dim or 0) * 4
        key = (id(self.faiss_index), self.ntotal)
        if self._nbytes is None or self._nbytes[0] != key:
            self._nbytes = (key, int(faiss.serialize_index(self.faiss_index).nbytes))
        return self._nbytes[1]

    # -- incremental updates (rows are ids: appended rows continue from ntotal)
    def add(self, vectors: torch.Tensor) -> None:
        """Append rows to a built index: FAISS ``add`` keeps the trained quantizer and PQ
        codebooks (no retraining); 'torch' concatenates."""
        v = vectors.detach().float().cpu()
        self._nbytes = None
        if self.is_torch:
            assert self.vectors is not None
            self.vectors = torch.cat([self.vectors, v.to(self.vectors)])
        else:
            self.faiss_index.add(np.ascontiguousarray(v.numpy(), dtype=np.float32))
        self.ntotal += len(v)

    def remove(self, rows: np.ndarray, remaining: torch.Tensor) -> str:
        """Delete ``rows`` (sorted, unique) so the other rows keep their order and ids become
        row numbers of the compacted gallery again; ``remaining`` are the vectors left (used
        only to rebuild an HNSW graph, which FAISS cannot delete from). Returns how."""
        rows = np.asarray(rows, dtype=np.int64)
        self._nbytes = None
        if self.is_torch:
            assert self.vectors is not None
            keep = torch.from_numpy(np.setdiff1d(np.arange(self.ntotal), rows))
            self.vectors = self.vectors[keep.to(self.vectors.device)]
            self.ntotal = len(keep)
            return "rows dropped"
        ivf = _ivf_of(self.faiss_index)
        if ivf is not None:
            self.faiss_index.remove_ids(rows)
            for list_no in range(ivf.nlist):  # ids above a removed row shift down
                size = ivf.invlists.list_size(list_no)
                if size:
                    ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(list_no), size)
                    ids -= np.searchsorted(rows, ids, side="left")
            self.ntotal = int(self.faiss_index.ntotal)
            return "IVF entries removed and renumbered in place"
        try:
            self.faiss_index.remove_ids(rows)
        except RuntimeError:  # HNSW: no deletion in FAISS
            self.build(remaining)
            return "graph rebuilt from the remaining vectors (HNSW cannot delete)"
        self.ntotal = int(self.faiss_index.ntotal)
        return "rows removed"

    def save(self, directory: str | os.PathLike[str]) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        if self.is_torch:
            assert self.vectors is not None
            self.vectors.float().cpu().numpy().tofile(path / "vectors.bin")
        else:
            faiss.write_index(self.faiss_index, str(path / "index.faiss"))

    def load(self, directory: str | os.PathLike[str], ntotal: int, dim: int) -> SingleVectorIndex:
        """Read an index written by :meth:`save` over ``ntotal`` vectors of ``dim``; a file
        that is missing, unreadable or holds another count or dimension is a
        :class:`DataError` that names it."""
        path = Path(directory)
        self.ntotal, self.dim = ntotal, dim
        if self.is_torch:
            file = path / "vectors.bin"
            want = ntotal * dim * 4
            got = file.stat().st_size if file.is_file() else None
            if got != want:
                raise DataError(
                    f"Stage-1 file {file} is {'missing' if got is None else f'{got} bytes'}; "
                    f"{ntotal} x {dim} float32 vectors need {want}. Re-save the index."
                )
            v = np.fromfile(file, dtype=np.float32).reshape(ntotal, dim)
            self.vectors = torch.from_numpy(v).to(self.device, compute_dtype(self.device))
            return self
        file = path / "index.faiss"
        if not file.is_file():
            raise DataError(f"Stage-1 file {file} is missing. Re-save the index.")
        try:
            index = faiss.read_index(str(file))
        except RuntimeError as exc:
            raise DataError(
                f"Stage-1 file {file} is not a readable FAISS index "
                f"({str(exc).splitlines()[0][:160]}). Re-save the index."
            ) from None
        if index.ntotal != ntotal or index.d != dim:
            raise DataError(
                f"Stage-1 file {file} holds {index.ntotal} vectors of dim {index.d}, but the "
                f"index has {ntotal} gallery items of dim {dim}: it belongs to another gallery. "
                "Re-save the index."
            )
        self.faiss_index = index
        self._apply_knobs()
        return self


def _ivf_of(index: Any) -> Any:
    """The IVF part of a FAISS index (IVF-Flat, IVF-PQ, ...), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, AttributeError):
        return None


def ivf_lists(index: Any) -> int | None:
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except (RuntimeError, AttributeError):
        return None
