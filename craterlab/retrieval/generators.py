"""Stage-1 candidate generators that see token sets, then the exact late-interaction rerank.

- ``muvera`` (:class:`MuveraStage`): fixed-dimensional encodings (:mod:`.fde`) of the gallery
  token sets in a FAISS index (``Flat``, ``HNSW32``, ``IVF1024,PQ64``, ... any factory string);
  a query's FDE searches it for the top S.
- ``token_ivf`` (:class:`TokenIvfStage`): a token-level inverted file (:mod:`.token_ivf`); the
  union of the lists probed by the query's tokens, ordered by the list score (or PLAID's
  centroid interaction, or hit counts).

Both rerank their top S with the matcher (exact late interaction from the token store), as
``two_stage`` does for the pooled-vector shortlist, and report the same figures: bytes per
image (generator + store), per-query latency of ``stage1`` and ``rerank`` (batched and one
query at a time), and ``build_s`` / ``generator_bytes`` in ``Ranking.extra``.

A generator is built once per gallery and kept in ``RetrievalInputs.prepared`` under its kind
with its settings (:meth:`CandidateStage.generator`): a search with other settings than the
kept generator's rebuilds it, unless the generator was loaded with a saved index (it cannot be
rebuilt from there without the settings that built it): then the search is refused, naming
both settings, instead of searching one generator's index with another's queries.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Protocol

import faiss
import numpy as np
import torch

from craterlab.errors import ConfigError
from craterlab.retrieval.fde import FdeEncoder, FdeSettings
from craterlab.retrieval.stages import (
    check_common,
    matcher_sync,
    on_matcher_device,
    rerank_store,
    shortlist_rerank_report,
    store_extra,
)
from craterlab.retrieval.timing import single_query_latencies, timed_blocks
from craterlab.retrieval.token_ivf import TokenIvf, TokenIvfSettings, build_token_ivf
from craterlab.retrieval.vector_index import ivf_lists
from craterlab.types import Ranking, RetrievalInputs, Tokens, TokenStore


class Generator(Protocol):
    """A built candidate generator over one gallery."""

    ntotal: int
    persisted: bool

    @property
    def nbytes(self) -> int: ...

    def identity(self) -> dict[str, Any]: ...

    def candidates(self, queries: Tokens, s: int) -> torch.Tensor: ...


def check_token_sets(tokens: Tokens, what: str) -> None:
    """Token sets must be one (N, K, D) tensor: sets of varying K arrive padded with a mask."""
    v = tokens.vectors
    if not isinstance(v, torch.Tensor) or v.dim() != 3:
        raise ConfigError(
            f"The {what} must be token sets as one (N, K, D) tensor, got "
            f"{getattr(v, 'shape', type(v).__name__)}. Token sets of varying K must be padded "
            "to the largest K with a mask of the real tokens (Tokens(vectors, mask))."
        )
    if tokens.mask is not None and tuple(tokens.mask.shape) != tuple(v.shape[:2]):
        raise ConfigError(
            f"The {what}' mask has shape {tuple(tokens.mask.shape)}, their vectors "
            f"{tuple(v.shape)}: the mask must be (N, K), True on real tokens."
        )


def complete(cand: torch.Tensor, ng: int) -> torch.Tensor:
    """Rows of distinct in-range candidates: a row with missing (-1) or repeated entries keeps
    its candidates in order, then the other gallery rows in row order (ranked below them)."""
    out = cand.clone()
    for i, row in enumerate(cand.tolist()):
        seen = list(dict.fromkeys(c for c in row if 0 <= c < ng))
        if len(seen) == len(row):
            continue
        taken = set(seen)
        rest = (j for j in range(ng) if j not in taken)
        seen += [next(rest) for _ in range(len(row) - len(seen))]
        out[i] = torch.tensor(seen)
    return out


def decode_rows(store: TokenStore) -> Any:
    """rows -> decoded Tokens of a store (through its gather/decode)."""
    return lambda rows: store.decode(rows)


# --------------------------------------------------------------------------- MUVERA


class FdeGenerator:
    """Document FDEs of a gallery in a FAISS inner-product index; queries search it."""

    def __init__(
        self,
        encoder: FdeEncoder,
        index: str = "Flat",
        nprobe: int | None = None,
        ef_search: int | None = None,
        train_size: int = 100_000,
        chunk: int = 4096,
    ) -> None:
        self.encoder = encoder
        self.spec = index
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.train_size = train_size
        self.chunk = chunk
        self.ntotal = 0
        self.persisted = False
        self.faiss_index: Any = None

    def identity(self) -> dict[str, Any]:
        return {
            **self.encoder.identity(),
            "index": self.spec,
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
        }

    def build(self, store: TokenStore) -> FdeGenerator:
        """Encode the store's rows in chunks and add them to the index (trained first, on a
        sample of ``train_size`` encodings, when the index needs training)."""
        n = len(store)
        dim = self.encoder.out_dim
        try:
            index = faiss.index_factory(dim, self.spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ConfigError(
                f"FAISS cannot build the MUVERA index {self.spec!r}: "
                f"{str(exc).splitlines()[0][:200]}. Use a factory string such as 'Flat', "
                "'HNSW32' or 'IVF1024,PQ64'."
            ) from None
        if not index.is_trained:
            nlist = ivf_lists(index)
            ntrain = min(n, self.train_size)
            if nlist is not None and ntrain < nlist:
                raise ConfigError(
                    f"The MUVERA index {self.spec!r} has {nlist} IVF lists but only {ntrain} "
                    f"gallery encodings to train them. Use fewer lists (e.g. "
                    f"'IVF{max(1, ntrain // 39)},PQ64') or index=Flat."
                )
            rows = np.sort(np.random.default_rng(0).choice(n, ntrain, replace=False))
            train = [
                self.encoder.encode(
                    store.decode(torch.from_numpy(rows[a : a + self.chunk])), "document"
                )
                for a in range(0, ntrain, self.chunk)
            ]
            index.train(np.ascontiguousarray(torch.cat(train).numpy()))
        for a in range(0, n, self.chunk):
            t = store.decode(torch.arange(a, min(n, a + self.chunk)))
            index.add(np.ascontiguousarray(self.encoder.encode(t, "document").numpy()))
        ps = faiss.ParameterSpace()
        for name, value in (("nprobe", self.nprobe), ("efSearch", self.ef_search)):
            if value is not None:
                try:
                    ps.set_index_parameter(index, name, int(value))
                except RuntimeError:
                    raise ConfigError(
                        f"The MUVERA index {self.spec!r} has no search parameter {name!r} "
                        "(nprobe: IVF indexes, ef_search: HNSW ones)."
                    ) from None
        self.faiss_index = index
        self.ntotal = n
        return self

    @property
    def nbytes(self) -> int:
        """Serialized size of the index (computed from the code size beyond 1 GiB)."""
        if self.ntotal * self.encoder.out_dim * 4 < 2**30:
            return int(faiss.serialize_index(self.faiss_index).nbytes)
        from faiss.contrib.factory_tools import get_code_size

        return int(self.ntotal * get_code_size(self.encoder.out_dim, self.spec))

    def candidates(self, queries: Tokens, s: int) -> torch.Tensor:
        qf = self.encoder.encode(queries, "query").numpy()
        return torch.from_numpy(self.faiss_index.search(np.ascontiguousarray(qf), s)[1]).long()


# --------------------------------------------------------------------------- stages


class CandidateStage:
    """Top-S candidates from a generator built over the gallery's token store, reranked by
    the matcher. Subclasses say how to build the generator (:meth:`build`)."""

    kind = ""

    def __init__(self, shortlist: int = 100, block: int = 1000, timing_queries: int = 16) -> None:
        check_common(timing_queries, block)
        if shortlist < 1:
            raise ValueError(f"shortlist must be >= 1, got {shortlist}")
        self.shortlist = shortlist
        self.block = block
        self.timing_queries = timing_queries
        self.build_s = 0.0

    def settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def build(self, store: TokenStore) -> Generator:
        raise NotImplementedError

    def generator(self, inputs: RetrievalInputs) -> Generator:
        """The generator over this gallery: ``inputs.prepared``'s when it has these settings,
        else built now (refused when the kept one was loaded from a saved index)."""
        return self.prepare(inputs.gallery_store, inputs.prepared)

    def prepare(self, store: TokenStore, prepared: dict[str, Any]) -> Generator:
        """The generator over ``store`` kept in ``prepared`` (built and kept there when
        missing or built with other settings; see :meth:`generator`)."""
        key = f"generator:{self.kind}"
        kept = prepared.get(key)
        if kept is not None and kept.ntotal == len(store):
            if kept.identity() == self.identity_of_settings(kept):
                return kept
            if kept.persisted:
                raise ConfigError(
                    f"This index's {self.kind} generator was built with {kept.identity()}, "
                    f"but the search asks for {self.settings()}. Search with the settings "
                    "the index was built with, or rebuild the index with the new ones: "
                    "queries encoded with other settings would search it silently wrong."
                )
        t0 = time.perf_counter()
        gen = self.build(store)
        self.build_s = time.perf_counter() - t0
        prepared[key] = gen
        return gen

    def identity_of_settings(self, built: Generator) -> dict[str, Any]:
        """What a generator built with this stage's settings reports as its identity."""
        raise NotImplementedError

    def search(self, inputs: RetrievalInputs) -> Ranking:
        check_token_sets(inputs.query_tokens, "query tokens")
        store = on_matcher_device(inputs.gallery_store, inputs.matcher)
        ng = len(inputs.gallery_store)
        s = min(self.shortlist, ng)
        depth = min(inputs.depth, ng)
        want = max(s, depth)
        gen = self.generator(inputs)
        q = inputs.query_tokens
        nq = len(q)
        cand = torch.full((nq, want), -1, dtype=torch.long)

        def generate(q0: int, q1: int) -> None:
            cand[q0:q1] = gen.candidates(q[q0:q1], want)

        lat1 = timed_blocks(nq, self.block, generate)
        cand = complete(cand, ng)
        short = cand[:, :s]
        rr = torch.empty(nq, s)

        def rerank_block(q0: int, q1: int) -> None:
            rr[q0:q1] = rerank_store(inputs.matcher, q[q0:q1], store, short[q0:q1])

        sync = matcher_sync(inputs.matcher)
        lat2 = timed_blocks(nq, self.block, rerank_block, sync)
        order = rr.argsort(dim=1, descending=True, stable=True)
        ids = short.gather(1, order)
        scores = rr.gather(1, order)
        if depth > s:  # the tail keeps the generator's order, strictly below the reranked head
            floor = torch.nan_to_num(scores.min(dim=1, keepdim=True).values, neginf=0.0)
            tail = floor - 1.0 - torch.arange(depth - s, dtype=torch.float32)
            ids = torch.cat([ids, cand[:, s:depth]], dim=1)
            scores = torch.cat([scores, tail.expand(nq, -1)], dim=1)
        ids, scores = ids[:, :depth], scores[:, :depth]
        single1 = single_query_latencies(
            lambda i: gen.candidates(q[i : i + 1], s), nq, self.timing_queries
        )
        single2 = single_query_latencies(
            lambda i: rerank_store(inputs.matcher, q[i : i + 1], store, short[i : i + 1]),
            nq,
            self.timing_queries,
            sync,
        )
        gen_bytes = float(gen.nbytes)
        report = shortlist_rerank_report(
            gen_bytes / max(1, ng) + inputs.gallery_store.bytes_per_image(),
            (lat1, lat2),
            (single1, single2),
        )
        extra = {"generator_bytes": gen_bytes, "shortlist": float(s), "build_s": self.build_s}
        extra.update(store_extra(inputs.gallery_store))
        return Ranking(
            indices=ids,
            scores=scores,
            shortlist=short,
            timings_ms=report.timings_ms(),
            extra=extra,
            report=report,
        )


class MuveraStage(CandidateStage):
    """MUVERA: top-S by the inner product of fixed-dimensional encodings (FAISS), then rerank.

    ``simhash_bits``, ``repetitions``, ``projection_dim`` (0: none), ``final_dim`` (0: no count
    sketch), ``fill_empty``, ``seed``: the encoding (:class:`~.fde.FdeSettings`). ``index``,
    ``nprobe``, ``ef_search``: the FAISS index of the encodings.
    """

    kind = "muvera"

    def __init__(
        self,
        shortlist: int = 100,
        simhash_bits: int = 4,
        repetitions: int = 8,
        projection_dim: int = 32,
        final_dim: int = 0,
        fill_empty: bool = True,
        index: str = "Flat",
        nprobe: int | None = None,
        ef_search: int | None = None,
        seed: int = 0,
        block: int = 1000,
        timing_queries: int = 16,
    ) -> None:
        super().__init__(shortlist, block, timing_queries)
        self.fde = FdeSettings(
            simhash_bits, repetitions, projection_dim, final_dim, fill_empty, seed
        )
        try:
            self.fde.check()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        self.index = index
        self.nprobe = nprobe
        self.ef_search = ef_search

    def settings(self) -> dict[str, Any]:
        return {
            **asdict(self.fde),
            "index": self.index,
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
        }

    def identity_of_settings(self, built: Generator) -> dict[str, Any]:
        dim = built.identity().get("dim")
        return {**self.settings(), "dim": dim}

    def build(self, store: TokenStore) -> FdeGenerator:
        dim = int(store.decode(torch.zeros(1, dtype=torch.long)).vectors.shape[-1])
        encoder = FdeEncoder(dim, self.fde)
        return FdeGenerator(encoder, self.index, self.nprobe, self.ef_search).build(store)


class TokenIvfStage(CandidateStage):
    """Token-level IVF: the union of the lists probed by each query token, ordered by the
    list score (``score="lists"``), PLAID's centroid interaction (``"centroids"``) or hit
    counts (``"counts"``), top S reranked. ``lists`` 0 uses a residual store's centroids
    (else PLAID's count, at most ``max_lists``); ``nprobe``: lists per query token; ``fill``:
    the list score of a token that found no list holding the image (``next``, ``zero``);
    ``refine``: the list score's best that many re-scored on ``refine_dims``-dimensional token
    sketches before the top S are reranked (PLAID's staged pruning; 0: off); ``max_postings``:
    postings read per probed list, best impact first (0: all); ``coarse``: lists trained by a
    two-level k-means with that many cells (0: one k-means); ``cell_probe``: with ``coarse``,
    a query token probes only the lists of its best ``cell_probe`` cells (0: every list)."""

    kind = "token_ivf"

    def __init__(
        self,
        shortlist: int = 100,
        lists: int = 0,
        nprobe: int = 4,
        score: str = "lists",
        fill: str = "next",
        sample: int = 100_000,
        iters: int = 10,
        seed: int = 0,
        max_lists: int = 8192,
        refine: int = 0,
        refine_dims: int = 64,
        max_postings: int = 0,
        coarse: int = 0,
        cell_probe: int = 0,
        block: int = 1000,
        timing_queries: int = 16,
    ) -> None:
        super().__init__(shortlist, block, timing_queries)
        self.ivf = TokenIvfSettings(
            lists, nprobe, score, fill, sample, iters, seed, max_lists, refine, refine_dims,
            max_postings, coarse, cell_probe,
        )  # fmt: skip
        try:
            self.ivf.check()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    def settings(self) -> dict[str, Any]:
        return asdict(self.ivf)

    def identity_of_settings(self, built: Generator) -> dict[str, Any]:
        lists = self.ivf.lists or built.identity()["lists"]
        return {**self.settings(), "lists": lists}

    def build(self, store: TokenStore) -> TokenIvf:
        n = len(store)
        k = int(store.decode(torch.zeros(1, dtype=torch.long)).vectors.shape[1])
        return build_token_ivf(store, decode_rows(store), self.ivf, n, k)
