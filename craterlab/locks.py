"""Exclusive ``flock`` locks between processes (and threads): a cache entry being extracted, an
index being updated, the MLflow view being merged. One holder at a time; the others wait."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import IO

log = logging.getLogger(__name__)

POLL_S = 0.02  # how often a bounded wait asks again


@contextlib.contextmanager
def exclusive(handle: IO, waiting: str = "", timeout_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the open file ``handle`` for the ``with`` body.

    When another holder has it, ``waiting`` (if any) is logged and the wait begins: until it
    is free, or at most ``timeout_s`` seconds (then TimeoutError, naming the file)."""
    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if waiting:
            log.info("%s", waiting)
        if timeout_s is None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"another holder kept {handle.name} for more than {timeout_s:g} s"
                        ) from None
                    time.sleep(POLL_S)
    try:
        yield
    finally:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
