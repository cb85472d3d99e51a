"""The token IVF's list score: an approximate late interaction read off the inverted lists.

For each real query token, its ``nprobe`` best centroids are visited in descending score; an
image in one of their lists gets, for that token, the score of the first (best) centroid it
appears under, and an image in none of them gets the token's ``fill`` (0, or the score of the
next, unprobed centroid: an upper bound of what the image's nearest token can score through
any other list, as WARP imputes missing similarities). Summed over query tokens, this is late
interaction with every gallery token replaced by its centroid, restricted to the probed lists,
and it needs only the lists (no per-token codes are gathered): the cost is the postings
visited, not the images touched times their tokens.

Ranking by the sum is the same as ranking by the sum of ``score - fill`` over the tokens that
found the image (the fills are a per-query constant), which is what is accumulated.

:func:`score_lists` runs the C kernel ``list_score.c`` (compiled on first use like the fused
rerank kernel, called through ctypes) or, where it cannot be built, :func:`score_lists_numpy`
(vectorized numpy, same result); tests compare both with a brute-force reference.
:func:`score_top_s` scores and keeps the best S in one call (the selection in C too).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from pathlib import Path

import numpy as np

from craterlab.retrieval import fused

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("list_score.c")
SOURCE_BYTES = SOURCE.read_bytes()
"""The kernel source as imported, compiled on first use: it matches the bindings below."""
FLAGS = ("-O3", "-fPIC", "-shared")


_lock = threading.Lock()


def library() -> ctypes.CDLL | None:
    """The compiled list-score kernel, or None (logged once) when it cannot be built
    (or ``CRATERLAB_LIST_KERNEL=0``)."""
    if os.environ.get("CRATERLAB_LIST_KERNEL", "1") == "0":
        return None
    with _lock:  # the first call may come from several worker threads at once
        return _load()


@functools.cache
def _load() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(fused.build(source_file=SOURCE, flags=FLAGS, source=SOURCE_BYTES)))
    except (OSError, RuntimeError) as exc:
        log.warning("token IVF list-score kernel unavailable (%s); using numpy", exc)
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    fn = lib.craterlab_list_score
    fn.argtypes = [ptr, ptr, ptr, ptr, i64, i64, ptr, ctypes.c_int32, ptr, ptr, i64, i64, i64, ptr]
    fn.restype = i64
    top = lib.craterlab_top_s
    top.argtypes = [ptr, ptr, i64, i64, ptr, ptr]
    top.restype = i64
    child = lib.craterlab_child_probe
    child.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, i64, i64, ptr, ptr]
    child.restype = None
    return lib


BLOCK = 65_536
"""Images per pass of the kernel over lists sorted by image: 512 KB of slots, a core's L2."""


SLOT = np.dtype([("acc", np.float32), ("stamp", np.int32)])
"""One image's running sum and token stamp, side by side as the kernel's ``slot_t``."""


class Workspace:
    """Per-thread scratch of the kernel: per image a zeroed sum and a token stamp."""

    def __init__(self, n: int) -> None:
        self.slot = np.zeros(n, SLOT)
        self.slot["stamp"] = -1
        self.out_ids = np.empty(n, np.int32)
        self.out_vals = np.empty(n, np.float32)
        self.base = 0

    def next_base(self, t: int) -> int:
        if self.base + t >= 2**31 - 1:
            self.slot["stamp"] = -1
            self.base = 0
        base = self.base
        self.base += t
        return base


_local = threading.local()


def _workspace(n: int) -> Workspace:
    ws = getattr(_local, "ws", None)
    if ws is None or len(ws.slot) != n:
        ws = _local.ws = Workspace(n)
    return ws


def _kernel_scores(
    lib: ctypes.CDLL,
    offsets: np.ndarray,
    ids: np.ndarray,
    n: int,
    probes: np.ndarray,
    vals: np.ndarray,
    cap: int,
    sorted_lists: bool,
) -> tuple[Workspace, int]:
    """Run the list-score kernel: the touched images and their sums are the workspace's
    first ``m`` out_ids / out_vals (valid until the thread's next call). Lists sorted by
    image are read in blocks of :data:`BLOCK` images (same result, fewer cache misses)."""
    probes = np.ascontiguousarray(probes, np.int32)
    vals = np.ascontiguousarray(vals, np.float32)
    if probes.size and (probes.min() < 0 or probes.max() >= len(offsets) - 1):
        raise IndexError(f"probe outside the {len(offsets) - 1} lists")
    ws = _workspace(n)
    t, p = probes.shape
    cursor = np.empty(t * p, np.int64)
    m = lib.craterlab_list_score(
        offsets.ctypes.data, ids.ctypes.data, probes.ctypes.data, vals.ctypes.data, t, p,
        ws.slot.ctypes.data, ws.next_base(t), ws.out_ids.ctypes.data, ws.out_vals.ctypes.data,
        cap, BLOCK if sorted_lists else 0, n, cursor.ctypes.data,
    )  # fmt: skip
    return ws, int(m)


def score_lists(
    offsets: np.ndarray,
    ids: np.ndarray,
    n: int,
    probes: np.ndarray,
    vals: np.ndarray,
    cap: int = 0,
    sorted_lists: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(images, summed values) of one query: ``probes`` (T, P) centroid ids per token, best
    first; ``vals`` (T, P) each probe's value (its score minus the token's fill). An image
    counts, per token, the value of the first probed list holding it. ``cap`` > 0: only the
    first ``cap`` postings of each list are read. ``sorted_lists``: each list's images are
    ascending (False for impact-ordered lists)."""
    lib = library()
    if lib is None:
        return score_lists_numpy(offsets, ids, n, probes, vals, cap)
    ws, m = _kernel_scores(lib, offsets, ids, n, probes, vals, cap, sorted_lists)
    return ws.out_ids[:m].copy(), ws.out_vals[:m].copy()


def score_top_s(
    offsets: np.ndarray,
    ids: np.ndarray,
    n: int,
    probes: np.ndarray,
    vals: np.ndarray,
    s: int,
    cap: int = 0,
    sorted_lists: bool = True,
) -> np.ndarray:
    """The ``s`` best images of :func:`score_lists`, best first (ties: lower row first), as
    int64: selected in C by a heap of ``s`` over the touched images, so neither the touched
    images nor their sums are copied out (what grows with the gallery is their count)."""
    lib = library()
    if lib is None:
        return top_s(*score_lists_numpy(offsets, ids, n, probes, vals, cap), s)
    ws, m = _kernel_scores(lib, offsets, ids, n, probes, vals, cap, sorted_lists)
    s = max(0, s)
    best_ids = np.empty(s, np.int32)
    best_vals = np.empty(s, np.float32)
    k = lib.craterlab_top_s(
        ws.out_ids.ctypes.data, ws.out_vals.ctypes.data, m, s,
        best_ids.ctypes.data, best_vals.ctypes.data,
    )  # fmt: skip
    return best_ids[:k].astype(np.int64)


def child_probe(
    q: np.ndarray, cells: np.ndarray, codes: np.ndarray, scales: np.ndarray, per: int, k: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """For query tokens ``q`` (T, D) and their cells (T, P): the ``k`` best lists among each
    token's cells' children (child j of cell c is centroid row ``c * per + j``; centroids
    as int8 ``codes`` (C, D) times ``scales`` (C,)), as (values, ids) (T, k), best first
    (ties: lower list first), computed in C on the rows in place; None where the kernel is
    not built."""
    lib = library()
    if lib is None:
        return None
    q = np.ascontiguousarray(q, np.float32)
    cells = np.ascontiguousarray(cells, np.int32)
    codes = np.ascontiguousarray(codes, np.int8)
    scales = np.ascontiguousarray(scales, np.float32)
    t, p = cells.shape
    if not 0 < k <= p * per or len(q) != t or q.shape[1] != codes.shape[1]:
        raise ValueError(f"child_probe: k={k} of {p} cells x {per} children, q {q.shape}")
    if cells.size and (cells.min() < 0 or (cells.max() + 1) * per > len(codes)):
        raise IndexError(f"cell outside the {len(codes) // per} cells")
    vals = np.empty((t, k), np.float32)
    ids = np.empty((t, k), np.int32)
    lib.craterlab_child_probe(
        q.ctypes.data, t, q.shape[1], cells.ctypes.data, p, codes.ctypes.data,
        scales.ctypes.data, per, k, ids.ctypes.data, vals.ctypes.data,
    )  # fmt: skip
    return vals, ids


def score_lists_numpy(
    offsets: np.ndarray,
    ids: np.ndarray,
    n: int,
    probes: np.ndarray,
    vals: np.ndarray,
    cap: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`score_lists` in vectorized numpy (the fallback where no C compiler runs)."""
    t, p = probes.shape
    flat = probes.reshape(-1).astype(np.int64)
    lens = offsets[flat + 1] - offsets[flat]
    if cap > 0:
        lens = np.minimum(lens, cap)
    if lens.sum() == 0:
        return np.empty(0, np.int32), np.empty(0, np.float32)
    starts = np.repeat(offsets[flat] - np.cumsum(lens) + lens, lens)
    imgs = ids[starts + np.arange(lens.sum())].astype(np.int64)
    tok = np.repeat(np.repeat(np.arange(t), p), lens)
    v = np.repeat(vals.reshape(-1).astype(np.float32), lens)
    _, first = np.unique(tok * n + imgs, return_index=True)  # first = best list per token
    images, inverse = np.unique(imgs[first], return_inverse=True)
    sums = np.bincount(inverse, weights=v[first], minlength=len(images)).astype(np.float32)
    return images.astype(np.int32), sums


def top_s(images: np.ndarray, scores: np.ndarray, s: int) -> np.ndarray:
    """The ``s`` best images, best first (ties: lower row first)."""
    if len(images) > s:  # the s-th best value, then the lowest images among its ties
        cut = -np.partition(-scores, s - 1)[s - 1]
        above = np.flatnonzero(scores > cut)
        tied = np.flatnonzero(scores == cut)
        tied = tied[np.argsort(images[tied], kind="stable")[: s - len(above)]]
        keep = np.concatenate([above, tied])
        images, scores = images[keep], scores[keep]
    order = np.lexsort((images, -scores))
    return images[order].astype(np.int64)
