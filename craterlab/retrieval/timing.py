"""The one timed-block loop: per-query latencies of work done in blocks of queries.

Every stage (and the stage-1 index) times its work the same way: a block of queries is timed
as a whole and each of its queries is charged the block's time divided by its size (batched
latency); :func:`single_query_latencies` times the first few queries one at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def timed_blocks(
    n: int,
    block: int,
    fn: Callable[[int, int], object],
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Call ``fn(q0, q1)`` for consecutive blocks of ``block`` of ``n`` queries; returns one
    latency in ms per query (its block's time / block size). ``sync`` (e.g. a CUDA
    synchronize) runs inside the timed region after each block."""
    lat: list[float] = []
    for q0 in range(0, n, max(1, block)):
        q1 = min(q0 + max(1, block), n)
        t0 = time.perf_counter()
        fn(q0, q1)
        if sync is not None:
            sync()
        lat.extend([(time.perf_counter() - t0) * 1e3 / (q1 - q0)] * (q1 - q0))
    return lat


def single_query_latencies(
    fn: Callable[[int], object],
    n: int,
    count: int,
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Latency in ms of ``fn(i)`` for the first ``min(count, n)`` queries, one at a time."""
    out = []
    for i in range(min(count, n)):
        t0 = time.perf_counter()
        fn(i)
        if sync is not None:
            sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out
