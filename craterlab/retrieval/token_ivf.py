"""Token-level inverted file: candidate images from the gallery tokens nearest each query token.

Every real gallery token is assigned to its nearest of ``C`` centroids (k-means over gallery
tokens, or the centroids of a residual-compressed store, whose ids are exactly these
assignments, as in PLAID). The inverted list of centroid c holds the images owning a token
assigned to c. A query probes, for each of its real tokens, the ``nprobe`` centroids most
similar to it; the candidates are the union of the probed lists. They are ordered by

- ``score="lists"`` (default): the list score (:mod:`.list_score`): per query token, the
  score of the best probed centroid whose list holds the image (``fill`` where none does),
  summed over tokens; read off the lists alone, in one pass over the postings;
- ``score="centroids"``: PLAID's exact centroid interaction, (1/Kq) sum_i max_j <q_i,
  c(g_j)>, the late interaction of the query with the image's tokens replaced by their
  centroids (gathers every candidate's per-token centroid ids);
- ``score="counts"``: the number of query tokens whose probed lists hold the image
  (ColBERTv1-style union, ranked by how many query tokens found it),

and, with ``refine`` > 0, PLAID's staged pruning: the ``refine`` best of that order are
scored again by a cheaper approximate late interaction on low-dimensional int8 sketches of
their tokens (:mod:`.token_sketch`) and reordered by it. The top S go to the exact
late-interaction rerank. With ``max_postings`` > 0 (list score only) each list's postings are
ordered by impact, the similarity of the image's best token in that list to the centroid,
and a probe reads at most the first ``max_postings``: the work per query is bounded however
large the gallery grows, at the cost of the images cut. Bytes: the lists (int32 image ids
per (centroid, image) pair), for ``centroids`` unless the store already holds them the token
centroid ids (int32 per token), and with ``refine`` the sketches (``refine_dims`` + 4 bytes
per token); the centroids and the sketch projection are per-gallery overhead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import faiss
import numpy as np
import torch

from craterlab.errors import ConfigError, DataError
from craterlab.retrieval.cpu_engine import run_blocks
from craterlab.retrieval.list_score import child_probe, score_top_s
from craterlab.retrieval.quantizers import quantize_int8
from craterlab.retrieval.residual import assign
from craterlab.retrieval.token_sketch import TokenSketch, build_sketch, fit_projection
from craterlab.types import Tokens


@dataclass(frozen=True)
class TokenIvfSettings:
    """``lists``: centroids (0: the residual store's, else PLAID's rule of thumb,
    2**floor(log2(16 sqrt(tokens))), at most ``max_lists``). ``nprobe``: lists probed per
    query token. ``score``: ``lists``, ``centroids`` or ``counts`` (module docstring).
    ``fill``: a list score's value for a token that found no list holding the image,
    ``next`` (the next centroid's score) or ``zero``. ``refine``: candidates of that order
    re-scored on token sketches of ``refine_dims`` dimensions before the top S are taken (0:
    none). ``max_postings``: postings read per probed list, best impact first (0: all).
    ``coarse``: 0 trains the lists by one k-means; > 0 by a two-level one (``coarse`` cells,
    each split into ``lists / coarse``), so that a token's assignment costs about ``coarse +
    lists / coarse`` centroid products instead of ``lists``. ``cell_probe`` (with ``coarse``):
    a query token scores the cells, then only the lists of its best ``cell_probe`` cells
    (0: every list), so probing costs ``coarse + cell_probe * lists / coarse`` products.
    ``sample``/``iters``/``seed``: k-means training when the lists are trained here
    (the sketch projection is fitted on the same sample)."""

    lists: int = 0
    nprobe: int = 4
    score: str = "lists"
    fill: str = "next"
    sample: int = 100_000
    iters: int = 10
    seed: int = 0
    max_lists: int = 8192
    refine: int = 0
    refine_dims: int = 64
    max_postings: int = 0
    coarse: int = 0
    cell_probe: int = 0

    def check(self) -> None:
        if (
            self.lists < 0
            or self.nprobe < 1
            or self.sample < 1
            or self.iters < 1
            or self.max_lists < 1
            or self.refine < 0
            or self.refine_dims < 1
            or self.max_postings < 0
            or self.coarse < 0
            or self.cell_probe < 0
        ):
            raise ConfigError(
                "token_ivf needs lists >= 0 (0: automatic), nprobe >= 1, sample >= 1, "
                "iters >= 1, max_lists >= 1, refine >= 0 (0: off), refine_dims >= 1, "
                "max_postings >= 0 (0: all), coarse >= 0, cell_probe >= 0"
            )
        if self.coarse and (self.lists <= self.coarse or self.lists % self.coarse):
            raise ConfigError(
                f"token_ivf coarse={self.coarse} splits each coarse cell into lists / coarse "
                f"lists, but lists={self.lists}: set lists to a multiple of coarse above it "
                "(e.g. lists=8192 coarse=1024), or coarse=0 for one k-means."
            )
        if self.cell_probe and (not self.coarse or self.score != "lists"):
            raise ConfigError(
                f"token_ivf cell_probe={self.cell_probe} probes through the coarse cells of a "
                f"two-level index with the list score, but coarse={self.coarse} and "
                f"score={self.score!r}: set coarse (e.g. lists=8192 coarse=1024) and "
                "score=lists, or cell_probe=0."
            )
        if self.max_postings and self.score != "lists":
            raise ConfigError(
                f"token_ivf max_postings={self.max_postings} caps the list score's reads; "
                f"score={self.score!r} reads whole lists. Use score=lists or max_postings=0."
            )
        if self.score not in SCORES or self.fill not in FILLS:
            raise ConfigError(
                f"token_ivf score={self.score!r} fill={self.fill!r}: score must be one of "
                f"{', '.join(SCORES)} and fill one of {', '.join(FILLS)}."
            )

    def auto_lists(self, tokens: int) -> int:
        """PLAID's list count for ``tokens`` gallery tokens, capped at ``max_lists``."""
        return int(min(self.max_lists, 2 ** int(np.floor(np.log2(16 * np.sqrt(tokens))))))


SCORES = ("lists", "centroids", "counts")
FILLS = ("next", "zero")


def train_centroids(tokens: np.ndarray, lists: int, iters: int, seed: int) -> np.ndarray:
    """Spherical k-means centroids of (T, D) tokens; fewer tokens than lists is an error."""
    if len(tokens) < lists:
        raise ConfigError(
            f"The token IVF has {lists} lists but only {len(tokens)} gallery tokens to train "
            f"them: lists would stay empty or be trained on duplicates. Use lists <= "
            f"{len(tokens)} (token_ivf lists=0 picks it from the token count)."
        )
    km = faiss.Kmeans(tokens.shape[1], lists, niter=iters, seed=seed, spherical=True)
    km.train(np.ascontiguousarray(tokens, dtype=np.float32))
    return km.centroids.astype(np.float32)


class TokenIvf:
    """Inverted lists (centroid -> images) over per-token centroid ids ``codes`` (N, K).

    The per-token ids are kept only where the score reads them (``score="centroids"``)."""

    def __init__(
        self,
        centroids: torch.Tensor,
        codes: torch.Tensor,
        mask: torch.Tensor | None,
        settings: TokenIvfSettings,
        codes_shared: bool = False,
        sketch: TokenSketch | None = None,
        impacts: torch.Tensor | None = None,
        cells: torch.Tensor | None = None,
    ) -> None:
        n, k = codes.shape
        c = codes.reshape(-1).numpy().astype(np.int64)
        img = np.repeat(np.arange(n, dtype=np.int64), k)
        imp = None if impacts is None else impacts.reshape(-1).numpy().astype(np.float32)
        if mask is not None:
            real = mask.reshape(-1).numpy().astype(bool)
            c, img = c[real], img[real]
            imp = None if imp is None else imp[real]
        if imp is None:
            pairs = np.unique(c * n + img)  # sorted by centroid, then image; duplicates merged
        else:  # per list, best impact first: a pair's impact is its best token's
            key = c * n + img
            order = np.lexsort((-imp, key))
            key, imp = key[order], imp[order]
            first = np.concatenate([[True], key[1:] != key[:-1]])
            key, imp = key[first], imp[first]
            pairs = key[np.lexsort((-imp, key // n))]
        counts = np.bincount(pairs // n, minlength=len(centroids))
        offsets = np.concatenate([[0], np.cumsum(counts)])
        self._set(
            centroids, pairs % n, offsets, n, settings, codes, mask, codes_shared, sketch,
            impacts is not None, cells,
        )  # fmt: skip

    def _set(
        self,
        centroids: torch.Tensor,
        list_ids: np.ndarray,
        offsets: np.ndarray,
        ntotal: int,
        settings: TokenIvfSettings,
        codes: torch.Tensor | None,
        mask: torch.Tensor | None,
        codes_shared: bool,
        sketch: TokenSketch | None = None,
        impact_ordered: bool = False,
        cells: torch.Tensor | None = None,
    ) -> None:
        """Every field, from the lists (built from the codes or read from a saved index)."""
        if settings.cell_probe and (cells is None or len(centroids) % len(cells)):
            raise ConfigError(
                f"token_ivf cell_probe={settings.cell_probe} probes through the coarse cells, "
                "but this index has none: build it with coarse set (two-level lists)."
            )
        self.cells = None if cells is None else cells.float().contiguous()
        if settings.max_postings and not impact_ordered:
            raise ConfigError(
                f"token_ivf max_postings={settings.max_postings} reads each list's best "
                "postings first, but these lists are not ordered by impact: build the index "
                "with max_postings set (build_token_ivf orders them then)."
            )
        self.impact_ordered = impact_ordered
        if settings.refine and (sketch is None or sketch.dims != settings.refine_dims):
            held = "none" if sketch is None else f"{sketch.dims}-dimensional ones"
            raise ConfigError(
                f"token_ivf refine={settings.refine} needs token sketches of "
                f"{settings.refine_dims} dimensions, but this index holds {held}: build it "
                "with these settings (build_token_ivf sketches the store when refine > 0)."
            )
        self.sketch = sketch if settings.refine else None
        self.settings = settings
        self.centroids = centroids.float().contiguous()
        self.child_rows = child_rows(self.centroids) if settings.cell_probe else None
        keep = settings.score == "centroids"
        self.codes = codes if keep else None
        self.mask = mask if keep else None
        self.codes_shared = codes_shared
        self.persisted = False
        self.ntotal = ntotal
        self.list_ids = torch.from_numpy(np.ascontiguousarray(list_ids, np.int32))
        self.offsets = np.ascontiguousarray(offsets, np.int64)

    @classmethod
    def from_lists(
        cls,
        centroids: torch.Tensor,
        list_ids: np.ndarray,
        offsets: np.ndarray,
        ntotal: int,
        settings: TokenIvfSettings,
        codes: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        codes_shared: bool = False,
        sketch: TokenSketch | None = None,
        impact_ordered: bool = False,
        cells: torch.Tensor | None = None,
    ) -> TokenIvf:
        """A token IVF from its saved lists (:mod:`.generator_io`); ``codes`` (N, K) are
        needed only for ``score="centroids"``."""
        if settings.score == "centroids" and codes is None:
            raise ValueError("score=centroids needs the per-token codes")
        if len(offsets) != len(centroids) + 1 or int(offsets[-1]) != len(list_ids):
            raise ValueError(
                f"{len(offsets)} list offsets ending at {int(offsets[-1])} for "
                f"{len(centroids)} lists of {len(list_ids)} postings"
            )
        out = cls.__new__(cls)
        out._set(
            centroids, list_ids, offsets, ntotal, settings, codes, mask, codes_shared, sketch,
            impact_ordered, cells,
        )  # fmt: skip
        return out

    @property
    def nbytes(self) -> int:
        """Per-gallery-item bytes in total: lists, offsets, codes when read and not the
        store's, and the sketches when refining."""
        own = 0 if self.codes is None or self.codes_shared else self.codes.numel() * 4
        sketch = 0 if self.sketch is None else self.sketch.nbytes
        return int(self.list_ids.numel() * 4 + self.offsets.size * 8 + own + sketch)

    @property
    def overhead_bytes(self) -> int:
        sketch = 0 if self.sketch is None else self.sketch.overhead_bytes
        cells = 0 if self.cells is None else self.cells.numel() * 4
        return int(self.centroids.numel() * 4 + sketch + cells)

    def identity(self) -> dict[str, object]:
        return {**asdict(self.settings), "lists": len(self.centroids)}

    def candidates(self, queries: Tokens, s: int) -> torch.Tensor:
        """(Nq, S) candidate gallery rows per query (best first, -1 where fewer exist)."""
        q = queries.vectors.float()
        if q.dim() != 3 or q.shape[-1] != self.centroids.shape[1]:
            raise DataError(
                f"Query tokens of shape {tuple(q.shape)} cannot probe a token IVF over "
                f"{self.centroids.shape[1]}-dimensional gallery tokens: compute them with the "
                "backbone and aggregator that built the gallery."
            )
        out = torch.full((len(q), s), -1, dtype=torch.long)
        nprobe = min(self.settings.nprobe, len(self.centroids))
        extra = int(self.settings.fill == "next" and nprobe < len(self.centroids))
        cells = self.cells if self.settings.cell_probe else None
        width = len(self.centroids) if cells is None else len(cells)
        small = q.shape[0] * q.shape[1] * width < 2**22
        sims = top = best_cells = None
        with _one_thread_if(small):
            if cells is None:
                sims = q @ self.centroids.T  # (Nq, Kq, C)
                top = sims.topk(nprobe + extra, dim=-1)  # (Nq, Kq, nprobe [+1])
            else:  # each token's best cells, batched; their children per query below
                want = min(self.settings.cell_probe, len(cells))
                best_cells = (q @ cells.T).topk(want, dim=-1).indices  # (Nq, Kq, P)

        refine = self.settings.refine

        def one(i: int) -> None:
            real = slice(None) if queries.mask is None else queries.mask[i].bool()
            depth = max(s, refine)
            if best_cells is not None:
                values, ids = self.probe_children(q[i][real], best_cells[i][real], nprobe)
                best = self._rank(None, values, ids, depth)
            else:
                assert sims is not None and top is not None
                best = self._rank(sims[i][real], top.values[i][real], top.indices[i][real], depth)
            if refine:
                best = self.refined(q[i][real], best)
            best = best[:s]
            out[i, : len(best)] = best

        # the list-score kernel releases the GIL: queries run on the engine's worker threads
        workers = torch.get_num_threads() if self.settings.score == "lists" else 1
        with _one_thread_if(small and (refine > 0 or best_cells is not None)):
            run_blocks(one, len(q), workers)
        return out

    def probe_children(
        self, q: torch.Tensor, cells: torch.Tensor, nprobe: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One query's tokens q (Kq, D) and their best cells (Kq, P): each token's best
        ``nprobe`` lists (+1 for fill next) among those cells' children, as (scores, list ids)
        (Kq, nprobe [+1]), best first, like a full probe's ``topk``. The C kernel reads the
        children in place; where it is not built, they are gathered and scored in torch."""
        per = len(self.centroids) // len(self.cells)  # type: ignore[arg-type]
        width = cells.shape[1] * per
        k = min(nprobe + int(self.settings.fill == "next" and nprobe < width), width)
        assert self.child_rows is not None  # made with the index when cell_probe is set
        codes, scales, table = self.child_rows
        done = child_probe(q.numpy(), cells.numpy(), codes, scales, per, k)
        if done is not None:
            return torch.from_numpy(done[0]), torch.from_numpy(done[1]).long()
        kids = (cells.unsqueeze(-1) * per + torch.arange(per)).flatten(1)  # (Kq, P * per)
        sims = torch.einsum("td,tcd->tc", q, table[kids])
        top = sims.topk(k, dim=-1)
        return top.values, kids.gather(-1, top.indices)

    def refined(self, query: torch.Tensor, ranked: torch.Tensor) -> torch.Tensor:
        """``ranked`` (best first) with its first ``refine`` rows reordered by the sketch
        score of the query's real tokens (Kq, D) (ties keep the earlier order)."""
        assert self.sketch is not None
        head = ranked[: self.settings.refine]
        score = self.sketch.score(query, head)
        order = torch.sort(score, descending=True, stable=True).indices
        return torch.cat([head[order], ranked[self.settings.refine :]])

    def _lists(self, centroid_ids: np.ndarray) -> np.ndarray:
        ids = self.list_ids.numpy()
        parts = [ids[self.offsets[c] : self.offsets[c + 1]] for c in centroid_ids]
        return np.concatenate(parts) if parts else np.empty(0, np.int32)

    def _rank(
        self, sims: torch.Tensor | None, top: torch.Tensor, probes: torch.Tensor, s: int
    ) -> torch.Tensor:
        """Top-``s`` candidate rows of one query from its real tokens' best centroids
        (``top`` scores and ``probes`` ids, (Kq, nprobe [+1]), descending) and, for the
        centroid interaction, their scores against every centroid ``sims`` (Kq, C)."""
        nprobe = min(self.settings.nprobe, len(self.centroids))
        probes = probes[:, :nprobe]
        if self.settings.score == "lists":
            fill = top[:, nprobe:] if top.shape[1] > nprobe else torch.zeros(len(top), 1)
            vals = (top[:, :nprobe] - fill).numpy()
            ids = self.list_ids.numpy()
            cap = self.settings.max_postings
            best = score_top_s(
                self.offsets, ids, self.ntotal, probes.numpy(), vals, s, cap,
                sorted_lists=not self.impact_ordered,
            )  # fmt: skip
            return torch.from_numpy(best)
        if self.settings.score == "centroids":
            assert sims is not None
            cand = np.unique(self._lists(np.unique(probes.numpy())))
            if len(cand) == 0:
                return torch.empty(0, dtype=torch.long)
            score = self.centroid_interaction(sims, torch.from_numpy(cand.astype(np.int64)))
        else:
            per_token = [np.unique(self._lists(p.numpy())) for p in probes]
            hits = np.concatenate(per_token) if per_token else np.empty(0, np.int32)
            cand, counts = np.unique(hits, return_counts=True)
            if len(cand) == 0:
                return torch.empty(0, dtype=torch.long)
            score = torch.from_numpy(counts.astype(np.float32))
        k = min(s, len(cand))
        order = score.topk(k).indices
        return torch.from_numpy(cand.astype(np.int64))[order]

    def centroid_interaction(
        self, sims: torch.Tensor, rows: torch.Tensor, chunk: int = 4096
    ) -> torch.Tensor:
        """(len(rows),) PLAID pre-scores: (1/Kq) sum_i max_j sims[i, code(rows, j)]."""
        if self.codes is None:
            raise ConfigError(
                "This token IVF keeps no per-token codes: build it with score=centroids."
            )
        st = sims.T.contiguous()  # (C, Kq)
        out = torch.empty(len(rows))
        for a in range(0, len(rows), chunk):
            r = rows[a : a + chunk]
            codes = self.codes.index_select(0, r).long()  # (n, K)
            per_tok = st[codes.reshape(-1)].view(len(r), codes.shape[1], -1)  # (n, K, Kq)
            if self.mask is not None:
                m = self.mask.index_select(0, r).bool()
                per_tok = per_tok.masked_fill(~m.unsqueeze(-1), float("-inf"))
            out[a : a + len(r)] = per_tok.max(dim=1).values.mean(dim=1)
        return out


def child_rows(centroids: torch.Tensor) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """The centroids as the probe through cells reads them: int8 codes, their scales, and
    the float rows they decode to (what the torch fallback scores). Ranking a token's
    children needs no more precision, and int8 reads a quarter of the bytes."""
    codes, scales = quantize_int8(centroids)
    return codes.numpy(), scales.numpy(), codes.float() * scales.unsqueeze(1)


def by_cell(parent: np.ndarray, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, starts): the rows sorted by their cell ``parent`` (stable) and where each
    cell's run begins (``cells + 1`` offsets): cell c's rows are
    ``order[starts[c] : starts[c + 1]]``."""
    order = np.argsort(parent, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(parent, minlength=cells))])
    return order, starts


@contextlib.contextmanager
def _one_thread_if(small: bool) -> Iterator[None]:
    """Run a few-query probe on one torch thread: waking the intra-op pool for a matmul of a
    few MFLOP cost about 40 ms per query on a loaded 2-core machine, the work itself 1 ms."""
    if not small or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_token_ivf(
    gallery: object, tokens_of: object, settings: TokenIvfSettings, n: int, k: int
) -> TokenIvf:
    """A token IVF over a gallery store: its own centroid ids when it is residual-coded
    (``lists`` 0 or equal to the store's), else k-means on a sample of decoded tokens and an
    assignment of every token (both chunked over rows of the store)."""
    settings.check()
    centroids = getattr(gallery, "centroids", None)
    codes = getattr(gallery, "codes", None)
    mask = getattr(gallery, "mask", None)
    if (
        isinstance(centroids, torch.Tensor)
        and isinstance(codes, torch.Tensor)
        and settings.lists in (0, len(centroids))
    ):
        sketch, impacts = list_extras(tokens_of, settings, n, k, mask, codes.cpu(), centroids.cpu())
        return TokenIvf(
            centroids.cpu(), codes.cpu(), mask, settings, codes_shared=True, sketch=sketch,
            impacts=impacts,
        )  # fmt: skip
    decode = tokens_of  # callable: rows -> Tokens
    sample = sample_tokens(decode, settings, n, k)
    few = 2 ** int(np.floor(np.log2(max(1, len(sample) // 4))))  # >= 4 samples per list
    lists = settings.lists or min(settings.auto_lists(n * k), few)
    if settings.coarse:
        cent, top = train_two_level(sample, lists, settings.coarse, settings.iters, settings.seed)
    else:
        cent = top = train_centroids(sample, lists, settings.iters, settings.seed)
    per = lists // settings.coarse if settings.coarse else 0
    codes_out = torch.empty(n, k, dtype=torch.int32)
    int8 = _int8_rows(gallery)
    for a in range(0, n, 8192):
        rows = torch.arange(a, min(n, a + 8192))
        if int8 is not None:  # the store's int8 codes against int8 centroids (VNNI)
            x = int8[a : a + len(rows)]
            ids = assign_int8(x, top)
        else:
            x = decode(rows).vectors.float()  # type: ignore[operator]
            flat = x.reshape(-1, x.shape[-1]).numpy()
            ids = torch.from_numpy(assign(flat, top)).view(len(rows), -1)
        if per:  # the nearest of the coarse cell's own lists
            flat_x = x.reshape(-1, x.shape[-1])
            ids = assign_children(flat_x, ids.reshape(-1), torch.from_numpy(cent), per)
        codes_out[a : a + len(rows)] = ids.view(len(rows), -1)
    sketch, impacts = list_extras(
        decode, settings, n, k, mask, codes_out, torch.from_numpy(cent), sample
    )
    cells = torch.from_numpy(top) if settings.coarse else None
    return TokenIvf(
        torch.from_numpy(cent), codes_out, mask, settings, sketch=sketch, impacts=impacts,
        cells=cells,
    )  # fmt: skip


def list_extras(
    decode: object,
    settings: TokenIvfSettings,
    n: int,
    k: int,
    mask: torch.Tensor | None,
    codes: torch.Tensor,
    centroids: torch.Tensor,
    sample: np.ndarray | None = None,
) -> tuple[TokenSketch | None, torch.Tensor | None]:
    """What the settings add to the lists of a store whose tokens have centroid ids ``codes``:
    the token sketches when ``refine`` is set, the tokens' impacts when ``max_postings`` is."""
    sketch = sketch_store(decode, settings, n, k, mask, sample) if settings.refine else None
    impacts = None
    if settings.max_postings:
        impacts = token_impacts(decode, codes, centroids.float(), n)
    return sketch, impacts


def train_two_level(
    sample: np.ndarray, lists: int, coarse: int, iters: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(lists, D) centroids and (coarse, D) cell centroids of a two-level spherical k-means:
    ``coarse`` cells over the sample, then each cell split into ``per = lists // coarse``
    lists (list ``c * per + j`` is child j of cell c).

    A child is ``normalize(cell + beta * r_j)``: ``r_j`` a k-means direction of the cell's
    residuals (its tokens with the cell direction projected out, normalized), ``beta`` their
    mean norm. Every child then has the same component along the cell, so the max inner
    product picks a child by the residual direction alone; children trained as plain
    spherical k-means on the cell's tokens put two thirds of them in one child (the one
    nearest the cell's mean), since all share that direction. A cell with no more tokens
    than children uses the residuals it has and repeats the cell for the rest."""
    top = train_centroids(sample, coarse, iters, seed)
    parent = assign(sample, top)
    per = lists // coarse
    out = np.repeat(top, per, axis=0)
    order, starts = by_cell(parent, coarse)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # a few hundred points per cell: OpenMP's wake-up dominates
    try:
        for c in range(coarse):
            pts = sample[order[starts[c] : starts[c + 1]]].astype(np.float32)
            res = pts - np.outer(pts @ top[c], top[c])
            norms = np.linalg.norm(res, axis=1)
            keep = norms > 1e-6
            res, norms = res[keep] / norms[keep, None], norms[keep]
            if len(res) > per:
                km = faiss.Kmeans(
                    res.shape[1],
                    per,
                    niter=iters,
                    seed=seed,
                    spherical=True,
                    min_points_per_centroid=1,
                )
                km.train(np.ascontiguousarray(res))
                dirs = km.centroids
            else:
                dirs = res
            if len(dirs):
                kids = top[c] + float(norms.mean()) * dirs
                out[c * per : c * per + len(kids)] = kids / np.linalg.norm(
                    kids, axis=1, keepdims=True
                )
    finally:
        faiss.omp_set_num_threads(threads)
    return out.astype(np.float32), top


def assign_children(
    tokens: torch.Tensor, parent: torch.Tensor, centroids: torch.Tensor, per: int
) -> torch.Tensor:
    """(T,) int32: for each token (T, D) (float, or int8 codes: a positive scale does not
    change the argmax), the nearest of its cell ``parent``'s ``per`` children in
    ``centroids`` (child j of cell c is row c * per + j).

    The tokens are sorted by cell once, so each cell scores one contiguous slice against
    its children (a gather per cell cost 15 ms of indexing per cell-chunk on 2 cores); the
    small per-cell products run on one thread."""
    kids = centroids.view(-1, per, centroids.shape[1])
    order_np, starts = by_cell(parent.numpy().astype(np.int64), len(kids))
    order = torch.from_numpy(order_np)
    grouped = tokens[order]
    best = torch.empty(len(tokens), dtype=torch.int64)
    with _one_thread_if(True):
        for c in np.flatnonzero(np.diff(starts)):  # the cells holding tokens
            a, b = int(starts[c]), int(starts[c + 1])
            best[a:b] = (grouped[a:b].float() @ kids[c].T).argmax(dim=1) + int(c) * per
    out = torch.empty(len(tokens), dtype=torch.int32)
    out[order] = best.to(torch.int32)
    return out


def token_impacts(
    decode: object, codes: torch.Tensor, centroids: torch.Tensor, n: int, chunk: int = 2048
) -> torch.Tensor:
    """(N, K) each token's similarity to its assigned centroid (``codes`` (N, K)), decoded
    ``chunk`` rows at a time: the impact that orders a capped list's postings."""
    out = torch.empty(codes.shape, dtype=torch.float32)
    for a in range(0, n, chunk):
        rows = torch.arange(a, min(n, a + chunk))
        t = decode(rows).vectors.float()  # type: ignore[operator]
        out[a : a + len(rows)] = (t * centroids[codes[rows].long()]).sum(-1)
    return out


def sketch_store(
    decode: object,
    settings: TokenIvfSettings,
    n: int,
    k: int,
    mask: torch.Tensor | None,
    sample: np.ndarray | None = None,
) -> TokenSketch:
    """The ``refine_dims``-dimensional sketches of every token of a store (projection fitted
    on ``sample``, or on a sample drawn as the k-means one is)."""
    if sample is None:
        sample = sample_tokens(decode, settings, n, k)
    projection = fit_projection(sample, settings.refine_dims)
    return build_sketch(decode, n, projection, mask)  # type: ignore[arg-type]


def sample_tokens(decode: object, settings: TokenIvfSettings, n: int, k: int) -> np.ndarray:
    """(T, D) real gallery tokens, about ``settings.sample`` of them spread over the rows
    (decoded 4,096 rows at a time): the k-means and sketch-projection training set."""
    rng = np.random.default_rng(settings.seed)
    per_row = max(1, min(k, settings.sample // max(1, n) + 1))
    rows = np.sort(rng.choice(n, min(n, max(1, settings.sample // per_row)), replace=False))
    parts = []
    for a in range(0, len(rows), 4096):  # decoded a chunk of rows at a time (a 1M gallery)
        real = _real(decode(torch.from_numpy(rows[a : a + 4096])))  # type: ignore[operator]
        keep = min(len(real), per_row * min(4096, len(rows) - a))
        parts.append(real[np.sort(rng.choice(len(real), keep, replace=False))])
    sample = np.concatenate(parts)
    if len(sample) > settings.sample:
        sample = sample[rng.choice(len(sample), settings.sample, replace=False)]
    return sample


def _int8_rows(gallery: object) -> torch.Tensor | None:
    """The (N, K, D) int8 codes of an int8 store with positive per-token scales, else None."""
    payload = getattr(gallery, "payload", None)
    if not isinstance(payload, dict) or getattr(gallery, "format", "") != "int8":
        return None
    codes = payload.get("codes")
    if (
        not isinstance(codes, torch.Tensor)
        or codes.dtype != torch.int8
        or codes.device.type != "cpu"
    ):
        return None
    return codes


def assign_int8(codes: torch.Tensor, centroids: np.ndarray) -> torch.Tensor:
    """Nearest centroid (max inner product) of int8-coded tokens (n, K, D), as int32 (n, K).

    A token is its codes times a positive scale, so its best centroid is the argmax of
    codes . c; the centroids are quantized to int8 with one scale each and the products run
    as an int8 matmul (about 3x an fp32 one on VNNI CPUs). Ties closer than the centroids'
    rounding may pick the other centroid, which only moves a token between two lists it is
    equally near."""
    codes8, scale = quantize_int8(torch.from_numpy(np.ascontiguousarray(centroids, np.float32)))
    cq = codes8.T.contiguous()  # (D, C)
    flat = codes.reshape(-1, codes.shape[-1]).contiguous()
    try:
        dots = torch._int_mm(flat, cq).float()
    except RuntimeError:  # shapes or a build without the int8 CPU kernel
        dots = flat.float() @ cq.float()
    best = (dots * scale.unsqueeze(0)).argmax(dim=1)
    return best.to(torch.int32).view(codes.shape[0], codes.shape[1])


def _real(tokens: Tokens) -> np.ndarray:
    x = tokens.vectors.float()
    flat = x.reshape(-1, x.shape[-1])
    if tokens.mask is not None:
        flat = flat[tokens.mask.reshape(-1).bool()]
    return flat.numpy()
