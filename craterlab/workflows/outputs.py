"""Output files of the workflow commands: checked before any work is done.

An output never replaces one of the command's inputs (a query manifest, an index's files, the
crops being ingested), and never replaces an existing file unless ``--overwrite`` is given.
A folder where a file is expected, a missing or read-only folder, or a name longer than the
filesystem allows is named up front, not after the encoding.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from craterlab.errors import ConfigError

NAME_MAX = 255


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    a, b = os.path.abspath(path), os.path.abspath(folder)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def check_outputs(
    outputs: Iterable[str | os.PathLike[str]],
    *,
    overwrite: bool,
    inputs: Iterable[str | os.PathLike[str]] = (),
    input_dirs: Iterable[str | os.PathLike[str]] = (),
    option: str = "--out",
) -> list[Path]:
    """The output paths, after refusing anything that would lose data (see the module doc).

    ``inputs``: files the command reads (never replaced, even with ``overwrite``);
    ``input_dirs``: folders whose contents are inputs (an index): nothing is written inside.
    """
    paths = [Path(o) for o in outputs]
    ins = [Path(i) for i in inputs]
    dirs = [Path(d) for d in input_dirs]
    existing: list[Path] = []
    for p in paths:
        if len(os.fsencode(p.name)) > NAME_MAX:
            raise ConfigError(
                f"The output name {p.name[:40]}... is {len(os.fsencode(p.name))} bytes long; "
                f"file names can have at most {NAME_MAX}. Choose a shorter {option}."
            )
        hit = next((i for i in ins if _same(p, i) or _inside(p, i) and _inside(i, p)), None)
        if hit is not None:
            raise ConfigError(
                f"The output {p} is an input of this command ({hit}); writing it would destroy "
                f"the input. Choose another {option}."
            )
        home = next((d for d in dirs if _inside(p, d)), None)
        if home is not None:
            raise ConfigError(
                f"The output {p} lies inside {home}, which this command reads (an index); "
                f"writing there would damage it. Choose an {option} outside it."
            )
        if p.is_dir():
            raise ConfigError(
                f"The output {p} is an existing folder, and {option} names a file here. "
                f"Choose a file name (e.g. {option} {p / 'results'})."
            )
        if p.exists() or p.is_symlink():
            existing.append(p)
        parent = p.parent
        probe = parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if probe.exists() and not probe.is_dir():
            raise ConfigError(f"The output {p} cannot be written: {probe} is a file, not a folder.")
        if not os.access(probe, os.W_OK):
            raise ConfigError(
                f"The output {p} cannot be written: {probe} is not writable. Choose another "
                f"{option}."
            )
    if existing and not overwrite:
        shown = ", ".join(str(p) for p in existing[:5])
        raise ConfigError(
            f"{len(existing)} output file(s) already exist: {shown}. Nothing was written. Pass "
            f"--overwrite to replace them, or choose another {option}."
        )
    return paths
