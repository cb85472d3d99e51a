"""Sweep workers never outlive their launcher.

Hydra's joblib launcher runs jobs in a pool of worker processes (loky), each holding a
backbone, the features and the stores (about 1 GB). When the launching process is killed
(``kill -9``, an out-of-memory kill, a closed terminal), nothing tells the workers, and they
stayed alive. The launcher records its pid in the environment before the workers start
(:func:`remember_launcher`); each job process that is not the launcher starts a watchdog
thread (:func:`watch_launcher`) that exits the process once the launcher is gone.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger("craterlab")

LAUNCHER_ENV = "CRATERLAB_LAUNCHER_PID"
_watching: set[int] = set()


def remember_launcher() -> None:
    """Record this process as the sweep's launcher (inherited by the workers it starts)."""
    os.environ[LAUNCHER_ENV] = str(os.getpid())


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def watch_launcher(poll_s: float = 2.0) -> bool:
    """In a worker of a sweep, exit when the launcher dies; returns whether it watches.

    Does nothing in the launcher itself or outside a sweep; one watchdog per process.
    """
    try:
        launcher = int(os.environ.get(LAUNCHER_ENV, ""))
    except ValueError:
        return False
    me = os.getpid()
    if launcher == me or me in _watching:
        return me in _watching
    _watching.add(me)

    def watch() -> None:
        while alive(launcher):
            time.sleep(poll_s)
        log.warning("The sweep's launcher (pid %d) is gone: this worker exits.", launcher)
        os._exit(143)

    threading.Thread(target=watch, name="craterlab-launcher-watch", daemon=True).start()
    return True
