"""``python -m craterlab cache [info|clear]``: show or remove feature-cache entries.

What an entry is, and which folders are provably entries, is :mod:`craterlab.cache`'s to say;
this module only prints and asks.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from craterlab.errors import CraterlabError


def main(argv: list[str]) -> int:
    """Inspect or clear the feature cache: ``cache info [--verify]``, ``cache clear [PATTERN]``."""
    return cli(argv, os.environ.get("CRATERLAB_CACHE", "outputs/cache"))


def cli(argv: list[str], cache_dir: str) -> int:
    """`python -m craterlab cache [info|clear]`: show or remove feature-cache entries."""
    parser = argparse.ArgumentParser(
        prog="python -m craterlab cache", description="Inspect or clear the feature cache."
    )
    parser.add_argument("--dir", default=cache_dir, help=f"cache directory (default {cache_dir})")
    sub = parser.add_subparsers(dest="command")
    p_info = sub.add_parser("info", help="list entries with their size and status")
    p_info.add_argument("--verify", action="store_true", help="check every file's checksum")
    p_clear = sub.add_parser("clear", help="remove entries")
    p_clear.add_argument("pattern", nargs="?", default="*", help="entry name glob (default: all)")
    p_clear.add_argument(
        "--status", choices=["complete", "partial", "corrupt"], help="only entries in this state"
    )
    p_clear.add_argument("--yes", "-y", action="store_true", help="don't ask for confirmation")
    args = parser.parse_args(argv or ["info"])
    from craterlab.cache import cache_info, human_bytes  # after parsing: --help imports no torch

    root = Path(args.dir)
    if args.command in (None, "info"):
        entries = cache_info(root, verify=getattr(args, "verify", False))
        print(f"Feature cache: {root.resolve()}")
        if not entries:
            print("  (empty)")
            return 0
        for e in entries:
            progress = f"{e.done}/{e.images}" if e.status == "partial" else f"{e.images}"
            print(
                f"  {e.status:8s} {human_bytes(e.bytes):>9s}  {progress:>11s} images  {e.name}"
                + (f"  [{e.problem}]" if e.problem else "")
            )
        total = sum(e.bytes for e in entries)
        print(f"  {len(entries)} entries, {human_bytes(total)} in total")
        return 0
    return clear_command(root, args.pattern, args.status, args.yes)


def clear_command(root: Path, pattern: str, status: str | None, yes: bool) -> int:
    """List what `cache clear` would delete, ask (unless ``yes``), then delete only that."""
    from craterlab.cache import clear_cache, human_bytes, other_items, select_entries

    chosen = select_entries(root, pattern=pattern, status=status)
    others = other_items(root)
    print(f"Feature cache: {root.resolve()}")
    if others:
        names = ", ".join(p.name for p in others[:8]) + (" ..." if len(others) > 8 else "")
        print(f"  left alone ({len(others)} items that are not cache entries): {names}")
    if not chosen:
        print("  no cache entries to remove")
        return 0
    for e in chosen:
        print(f"  would remove {e.status:8s} {human_bytes(e.bytes):>9s}  {e.name}")
    total = human_bytes(sum(e.bytes for e in chosen))
    if not yes:
        if not sys.stdin.isatty():
            raise CraterlabError(
                f"cache clear would remove {len(chosen)} entries ({total}) listed above, and "
                "there is no terminal to confirm on. Run it again with --yes to remove them."
            )
        answer = input(f"Remove these {len(chosen)} entries ({total})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("Nothing removed.")
            return 1
    removed = clear_cache(root, pattern=pattern, status=status)
    freed = sum(e.bytes for e in removed)
    print(f"Removed {len(removed)} entries ({human_bytes(freed)}) from {root.resolve()}")
    return 0
