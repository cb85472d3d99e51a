"""User-facing errors: each names the problem and the fix, and is printed without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CraterlabError(Exception):
    """A mistake the user can fix (bad name, bad config, missing data); shown as one paragraph."""


class UnknownComponentError(CraterlabError, KeyError):
    """A component name that no installed plugin registers."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class ConfigError(CraterlabError, ValueError):
    """A component config with an unknown key, a wrong type or an invalid value."""


class DataError(CraterlabError):
    """A dataset that is missing, unreadable or inconsistent; names the path or rows."""


def closest(name: str, known: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest known name, or '' when none is close."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def disk_full_message(exc: BaseException) -> str | None:
    """The one-paragraph message for an OSError that means "no space left" (or over quota),
    naming the file being written; None for any other error."""
    import errno

    if not isinstance(exc, OSError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    where = f" while writing {exc.filename}" if exc.filename else ""
    return (
        f"The disk is full{where} ({exc.strerror}). Free some space on that filesystem, or "
        "point the outputs elsewhere (output_dir / hydra.run.dir, cache.dir or "
        "CRATERLAB_CACHE, --out), and run it again."
    )
