"""Where a workflow index lives on disk, and the rules that keep users' files safe.

- A folder is replaced only when it is a craterlab index (``workflow.json`` + ``gallery/`` and
  nothing else) and the caller allowed it (``--overwrite``, or saving back the index it
  loaded), or when it is empty. Anything else (a crops folder, the working directory, a file)
  is refused, never deleted.
- A save writes ``DIR.partial`` and swaps it in with two renames (``DIR`` -> ``DIR.old``,
  ``DIR.partial`` -> ``DIR``). A kill between them leaves the two siblings; the next load or
  save restores the complete one (:func:`recover_interrupted`).
- Updates (``index add`` / ``remove``) hold an exclusive lock on ``DIR.lock`` from load to save,
  as the feature cache locks its entries, so two updates at once both land.
- The space a save needs is checked first, and a write that still fails for space (disk full,
  quota) removes what it wrote and names the path, the size needed and the free space.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from craterlab.errors import ConfigError, DataError
from craterlab.locks import exclusive

log = logging.getLogger("craterlab")

INDEX_ENTRIES = frozenset({"workflow.json", "gallery"})
"""What a saved workflow index holds; a folder with anything else is not replaced."""
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def index_path(directory: str | os.PathLike[str]) -> Path:
    """An absolute, normalised path (``.``/``..`` resolved without following links)."""
    return Path(os.path.abspath(os.fspath(directory)))


def is_index_dir(path: Path) -> bool:
    """True for a folder that holds a workflow index and nothing else (complete or not)."""
    if not path.is_dir() or path.is_symlink():
        return False
    names = {p.name for p in path.iterdir()}
    return "workflow.json" in names and names <= INDEX_ENTRIES | {"workflow.json.tmp"}


def _listing(path: Path, limit: int = 5) -> str:
    names = sorted(p.name for p in path.iterdir())
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_index_target(path: Path, *, overwrite: bool) -> None:
    """Refuse to write an index over anything but an empty folder or (allowed) an index."""
    if len(os.fsencode(path.name)) > 240:  # DIR.partial must fit the filesystem's 255 bytes
        raise ConfigError(
            f"The index folder name {path.name[:40]}... is {len(os.fsencode(path.name))} bytes "
            "long; it can have at most 240 (the filesystem allows 255, and a save writes "
            "NAME.partial beside it). Choose a shorter --out."
        )
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ConfigError(
            f"{path} exists and is not a folder (a file or a link); an index is a folder, and "
            "craterlab never replaces a file it did not make. Choose another --out (a new "
            "folder name)."
        )
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not is_index_dir(path):
        raise ConfigError(
            f"{path} is a folder that is not a craterlab index (it holds {_listing(path)}); "
            "writing the index there would delete its contents, so it is refused (also with "
            "--overwrite). Choose a new folder for --out, e.g. --out "
            f"{path / 'index'}."
        )
    if not overwrite:
        raise ConfigError(
            f"{path} already holds a craterlab index. Pass --overwrite to replace it "
            "(CraterIndex.save(dir, overwrite=True)), use `python -m craterlab index add` to add "
            "crops to it, or choose another --out."
        )


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _ours(path: Path) -> bool:
    """A ``.partial``/``.old`` sibling that a save made (an index folder, maybe incomplete)."""
    if not path.is_dir() or path.is_symlink():
        return False
    names = {p.name for p in path.iterdir()}
    return names <= INDEX_ENTRIES | {"workflow.json.tmp"}


def _complete(path: Path) -> bool:
    """A ``.partial`` is complete once its workflow.json (written last, atomically) parses."""
    try:
        json.loads((path / "workflow.json").read_text())
    except (OSError, ValueError):
        return False
    return (path / "gallery" / "meta.json").is_file()


def recover_interrupted(path: Path) -> str | None:
    """Finish or undo a save that was killed between its renames; returns what was done.

    ``DIR`` missing with a complete ``DIR.partial``: the new version is moved into place.
    ``DIR`` missing with ``DIR.old``: the previous version is restored. Siblings that are not
    a save's are never touched; a damaged state is named.
    """
    try:
        return _recover(path)
    except OSError:  # another process recovered it at the same moment
        if path.is_dir():
            return None
        raise


def _recover(path: Path) -> str | None:
    partial, old = _sibling(path, ".partial"), _sibling(path, ".old")
    if path.exists():
        if old.exists() and _ours(old):  # killed after the swap, before the cleanup
            shutil.rmtree(old, ignore_errors=True)
        return None
    if partial.exists() and _ours(partial) and _complete(partial):
        partial.rename(path)
        if old.exists() and _ours(old):
            shutil.rmtree(old, ignore_errors=True)
        done = f"restored index {path} from {partial.name} (a save was interrupted after writing)"
    elif old.exists() and _ours(old) and (old / "workflow.json").is_file():
        old.rename(path)
        if partial.exists() and _ours(partial):
            shutil.rmtree(partial, ignore_errors=True)
        done = (
            f"restored index {path} from {old.name} (a save was interrupted before the new "
            "version was complete; that update is lost and must be repeated)"
        )
    else:
        return None
    log.warning("%s", done[0].upper() + done[1:])
    return done


def clear_partial(path: Path) -> Path:
    """The ``DIR.partial`` to write into, emptied only if a save made it."""
    partial = _sibling(path, ".partial")
    if partial.exists() or partial.is_symlink():
        if not _ours(partial):
            raise ConfigError(
                f"{partial} exists and is not a half-written craterlab index (it holds "
                f"{_listing(partial) if partial.is_dir() else 'a file'}); saving the index "
                f"{path} would use that name. Move it away or choose another --out."
            )
        shutil.rmtree(partial)
    return partial


@contextlib.contextmanager
def index_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on the index at ``path`` (file ``DIR.lock`` beside it): a second
    update waits for the first, then loads what the first saved."""
    lock = _sibling(path, ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a+")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise ConfigError(
            f"Cannot create the lock file {lock} for index {path} ({exc.strerror}); the "
            "index's folder must be writable to update it."
        ) from None
    with handle as f, exclusive(f, f"Waiting for another update of index {path} ..."):
        yield


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def space_error(path: Path, needed: int, what: str) -> DataError:
    return DataError(
        f"Not enough disk space to write {what} at {path}: it needs about {human(needed)}, "
        f"{human(free_bytes(path))} are free on that filesystem. Nothing was changed. Free "
        "some space there (or point the output at another disk) and run it again."
    )


def check_space(path: Path, needed: int, what: str) -> None:
    """Refuse up front when the filesystem of ``path`` has less than ``needed`` bytes free."""
    if free_bytes(path) < needed:
        raise space_error(path, needed, what)


def is_space_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in SPACE_ERRNOS


COMPONENT_GROUPS = ("backbone", "pooling", "selector", "aggregator", "quantizer", "matcher")


def check_workflow_meta(path: Path, meta: object) -> dict:
    """``workflow.json``'s content, after checking every field an index reads from it (types,
    not only presence); a damaged or hand-edited file is one error listing what is wrong."""
    file = path / "workflow.json"
    if not isinstance(meta, dict):
        raise DataError(
            f"Index {path} has a damaged workflow.json (a JSON {type(meta).__name__}, not an "
            "object). Rebuild the index."
        )
    problems: list[str] = []
    overrides = meta.get("overrides")
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        problems.append("overrides must be a list of strings")
    config = meta.get("config")
    if not isinstance(config, dict):
        problems.append("config must be an object")
    else:
        for group in COMPONENT_GROUPS:
            part = config.get(group)
            if not isinstance(part, dict) or not isinstance(part.get("name"), str):
                problems.append(f"config.{group} must be an object with a name")
        stage1 = config.get("stage1")
        if not isinstance(stage1, dict) or not isinstance(stage1.get("index"), str):
            problems.append("config.stage1 must be an object with an index string")
        for key in ("k", "seed"):
            if not isinstance(config.get(key), int) or isinstance(config.get(key), bool):
                problems.append(f"config.{key} must be a whole number")
        if "cache" in config and not isinstance(config["cache"], dict):
            problems.append("config.cache must be an object")
    if not isinstance(meta.get("encoder"), dict):
        problems.append("encoder must be an object")
    items = meta.get("items")
    if not isinstance(items, list):
        problems.append("items must be a list")
    else:
        for i, it in enumerate(items):
            if not (
                isinstance(it, dict)
                and all(isinstance(it.get(k), str) for k in ("id", "path", "crater"))
                and all(
                    isinstance(it.get(k, 0.0), int | float) and not isinstance(it.get(k), bool)
                    for k in ("x", "y", "diameter")
                )
            ):
                problems.append(
                    f"items[{i}] must be an object with id, path, crater (strings) and numeric "
                    "x, y, diameter"
                )
                break
    if not isinstance(meta.get("n"), int) or isinstance(meta.get("n"), bool):
        problems.append("n must be a whole number")
    if problems:
        raise DataError(
            f"Index {path} has a damaged workflow.json ({file}): {'; '.join(problems)}. It was "
            "truncated or edited by hand. Rebuild the index (python -m craterlab index SOURCE "
            "--out NEWDIR), or restore the file."
        )
    return meta


def local_cache(recorded: object) -> dict:
    """The feature cache of the machine that uses an index: ``CRATERLAB_CACHE`` (else
    ``outputs/cache``). The builder's recorded ``cache.dir`` is information, never a place to
    write (it may not exist here, or belong to someone else)."""
    enabled = recorded.get("enabled", True) if isinstance(recorded, dict) else True
    return {
        "enabled": enabled is not False,
        "dir": os.environ.get("CRATERLAB_CACHE", "outputs/cache"),
    }
