"""The one flock helper: a second holder waits (logging why), a bounded wait ends in an error
that names the file, and the lock is free again once the first holder leaves."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from craterlab.locks import exclusive


def test_a_second_holder_waits_for_the_first_and_a_bounded_wait_names_the_file(
    tmp_path: Path, caplog
) -> None:
    path = tmp_path / "entry.lock"
    with open(path, "a+") as first, open(path, "a+") as second:
        with exclusive(first):
            t0 = time.monotonic()
            with pytest.raises(TimeoutError, match="entry.lock"), exclusive(second, timeout_s=0.2):
                pass
            assert time.monotonic() - t0 >= 0.2  # it waited its time, then gave up
        order = []
        holder = threading.Thread(target=lambda: hold(first, order))
        holder.start()
        while not order:
            time.sleep(0.01)
        with caplog.at_level(logging.INFO), exclusive(second, "Waiting for the other one ..."):
            order.append("second")
        holder.join()
    assert order == ["first in", "first out", "second"]  # no overlap: the second waited
    assert "Waiting for the other one ..." in caplog.text


def hold(handle, order: list[str]) -> None:
    with exclusive(handle):
        order.append("first in")
        time.sleep(0.3)
        order.append("first out")
