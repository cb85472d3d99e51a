"""Your own crater crops, listed in a CSV manifest.

Columns: ``image_id, path, crater_id, role`` (role: gallery, query or train), optional
``relevant_ids`` (semicolon-separated co-visible crater ids of a query; default: the query's
own crater_id) and ``view_type``. Paths are relative to the CSV's folder, or absolute (how
users list their own images: accepted, and the log says how many lie outside the folder). A
relative path that climbs out of the folder (``../``) is refused unless
``allow_outside_root=true``. (A downloaded release, :mod:`craterlab.data.craterbench`, refuses
both.)

The manifest is validated when the dataset is built (cheap checks: columns, extra fields,
roles, duplicate ids, paths, bad files, queries with no relevant gallery image); every problem
of every category is reported in one error with the offending rows, nothing is dropped
silently. With ``check_files`` (default) every image
header is read up front (missing files, FIFOs and devices, files that are no image,
decompression bombs over ``max_image_pixels``): all bad files are reported together, or left
out and counted in the log with ``skip_bad=true``. Relevance ids naming no gallery crater are
counted in a warning (an error with ``strict=true``). Images are decoded lazily by
``load_image``, which names the file when it cannot be decoded.

The dataset identity (which keys cached features) hashes the manifest's bytes and each image's
path, size and mtime, with or without ``check_files``: editing an image invalidates its cache.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import defaultdict
from pathlib import Path

from craterlab.data.base import (
    DEFAULT_MAX_IMAGE_PIXELS,
    CraterIdMap,
    FileDataset,
    bad_files_message,
    check_max_pixels,
    listing,
    log_skipped,
    outside_root,
    screen_files,
)
from craterlab.data.base import SPLITS as ROLES
from craterlab.errors import DataError
from craterlab.hashing import fingerprint
from craterlab.types import ImageRecord

REQUIRED = ("image_id", "path", "crater_id", "role")
OPTIONAL = ("relevant_ids", "view_type")

log = logging.getLogger(__name__)


class ManifestDataset(FileDataset):
    """Crater crops listed in a CSV manifest (see the module docstring for the columns)."""

    identity_prefix = "manifest"

    def __init__(
        self,
        path: str,
        check_files: bool = True,
        skip_bad: bool = False,
        strict: bool = False,
        allow_outside_root: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if not path:
            raise DataError(
                "dataset=manifest needs dataset.path=FILE.csv: a CSV with columns "
                "image_id,path,crater_id,role[,relevant_ids,view_type] (see "
                "docs/data-and-weights.md, 'Your own crops', and examples/manifest/)."
            )
        csv_path = Path(path).expanduser()
        if not csv_path.is_file():
            raise DataError(
                f"Manifest {csv_path} does not exist (dataset.path={path!r}, resolved from "
                f"{os.getcwd()}). Pass an existing CSV: dataset.path=/abs/path/to/manifest.csv."
            )
        self.path = csv_path.resolve()
        self.root = self.path.parent
        self.name = f"manifest:{self.path.stem}"
        self.check_files = check_files
        self.skip_bad = skip_bad
        self.strict = strict
        self.allow_outside_root = allow_outside_root
        self.max_image_pixels = check_max_pixels(max_image_pixels)
        self.skipped: dict[str, str] = {}  # image_id -> why it was left out (skip_bad)
        rows = self._read_rows()
        self._records, self._paths, stats = self._validate(rows)
        parts: list[object] = ["manifest", self.path.read_bytes(), stats]
        if self.skipped:
            parts.append(sorted(self.skipped))
        self._identity = fingerprint(*parts)
        if not check_files:
            log.info(
                "%s: dataset.check_files=false, images are not checked up front; cached features "
                "are matched to the images by path+size+mtime of each file",
                self.location,
            )

    # ------------------------------------------------------------------ reading

    def _read_rows(self) -> list[tuple[int, dict[str, str]]]:
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                header = [h.strip() for h in (reader.fieldnames or [])]
                missing = [c for c in REQUIRED if c not in header]
                if missing:
                    raise DataError(
                        f"Manifest {self.path} lacks column(s) {', '.join(missing)}; found "
                        f"columns: {', '.join(header) or '(none)'}. The header must be "
                        f"{','.join(REQUIRED)} plus optionally {','.join(OPTIONAL)}."
                    )
                rows, extra = [], []
                for row in reader:
                    line = reader.line_num
                    if None in row:  # more fields than the header has columns
                        extra.append(f"line {line}: extra value(s) {row.pop(None)!r}")
                    rows.append(
                        (line, {(k or "").strip(): (v or "").strip() for k, v in row.items()})
                    )
        except UnicodeDecodeError as exc:
            raise DataError(
                f"Manifest {self.path} is not UTF-8 text ({exc}); save it as UTF-8 CSV."
            ) from None
        self._row_problems = []
        if extra:
            self._row_problems.append(
                f"{len(extra)} row(s) have more fields than the header ({len(header)} columns: "
                f'{",".join(header)}); quote values that contain commas ("a,b"), separate '
                "relevant_ids with semicolons, or add the missing columns to the header:"
                + listing(extra)
            )
        if not rows:
            raise DataError(f"Manifest {self.path} has a header but no rows; list your images.")
        return rows

    def _validate(
        self, rows: list[tuple[int, dict[str, str]]]
    ) -> tuple[dict[str, list[ImageRecord]], dict[str, Path], list[tuple[str, int, int]]]:
        # every category is collected, then raised once
        problems = [*getattr(self, "_row_problems", []), *self._check_rows(rows)]
        names: list[str] = []
        for _, row in rows:
            names.append(row["crater_id"])
            names += [r for r in row.get("relevant_ids", "").split(";") if r.strip()]
        ids = CraterIdMap(names)
        self.crater_ids = ids

        paths, labels, outside = self._resolve_paths(rows)
        if outside:
            problems.append(
                f"{len(outside)} path(s) leave the manifest's folder {self.root} with ../. Move "
                "the images under that folder, list them by absolute path, or set "
                "dataset.allow_outside_root=true if the manifest is yours and the paths are "
                "meant:" + listing([labels[i] for i in outside])
            )
        screen = screen_files(
            {k: v for k, v in paths.items() if k not in outside},  # never read a refused path
            check_images=self.check_files,
            max_pixels=self.max_image_pixels,
        )
        if screen.bad and not self.skip_bad:
            problems.append(bad_files_message("the manifest", screen.bad, labels))
        elif screen.bad:
            log_skipped(f"manifest {self.path}", screen.bad, labels)
            self.skipped = dict(screen.bad)
            rows = [(line, row) for line, row in rows if row["image_id"] not in self.skipped]
            paths = {k: v for k, v in paths.items() if k not in self.skipped}

        records: dict[str, list[ImageRecord]] = defaultdict(list)
        gallery_craters = {ids(r["crater_id"]) for _, r in rows if r["role"].lower() == "gallery"}
        no_relevant, unknown = [], []
        for line, row in rows:
            role = row["role"].lower()
            cid = ids(row["crater_id"])
            rel: frozenset[int] = frozenset()
            if role == "query":
                given = [r for r in row.get("relevant_ids", "").split(";") if r.strip()]
                rel = frozenset(ids(r) for r in given) if given else frozenset({cid})
                if not rel & gallery_craters:
                    no_relevant.append(
                        f"line {line}: query {row['image_id']!r} relevant_ids="
                        f"{';'.join(ids.to_name[i] for i in sorted(rel))}"
                    )
                elif rel - gallery_craters:
                    unknown.append(
                        f"line {line}: query {row['image_id']!r}: "
                        f"{';'.join(ids.to_name[i] for i in sorted(rel - gallery_craters))}"
                    )
            records[role].append(
                ImageRecord(
                    row["image_id"], cid, row.get("view_type", ""), str(paths[row["image_id"]]), rel
                )
            )
        if not records["gallery"]:
            problems.append("there are no gallery rows (role=gallery); retrieval needs a gallery.")
        if no_relevant:
            skipped = f" ({len(self.skipped)} bad image(s) were skipped)" if self.skipped else ""
            problems.append(
                f"{len(no_relevant)} query row(s) have no relevant gallery image{skipped} (none "
                "of their relevant_ids is the crater_id of a gallery row); add the gallery crops "
                "or fix relevant_ids:" + listing(no_relevant)
            )
        if unknown and self.strict:
            problems.append(unknown_relevance_message(len(unknown)) + listing(unknown))
        self._raise(problems)
        if unknown:
            log.warning(
                "Manifest %s: %s%s",
                self.path,
                unknown_relevance_message(len(unknown)),
                listing(unknown),
            )
        return dict(records), paths, screen.stats

    def _check_rows(self, rows: list[tuple[int, dict[str, str]]]) -> list[str]:
        """Roles, empty required values and duplicate ids, all listed (not raised)."""
        problems: list[str] = []
        bad_role, empty, seen, dupes = [], [], {}, []
        for line, row in rows:
            if row["role"].lower() not in ROLES:
                bad_role.append(f"line {line}: role={row['role']!r} (image_id={row['image_id']!r})")
            for col in ("image_id", "path", "crater_id"):
                if not row[col]:
                    empty.append(f"line {line}: empty {col}")
            if row["image_id"] in seen:
                dupes.append(
                    f"line {line}: image_id {row['image_id']!r} "
                    f"(first on line {seen[row['image_id']]})"
                )
            else:
                seen[row["image_id"]] = line
        if bad_role:
            problems.append(f"roles must be one of {', '.join(ROLES)}:" + listing(bad_role))
        if empty:
            problems.append("required values are empty:" + listing(empty))
        if dupes:
            problems.append("duplicate image ids:" + listing(dupes))
        return problems

    def _resolve_paths(
        self, rows: list[tuple[int, dict[str, str]]]
    ) -> tuple[dict[str, Path], dict[str, str], list[str]]:
        """image_id -> file (relative paths from the manifest's folder) and -> its row label,
        and the ids whose relative path climbs out of the folder with ``../`` (refused unless
        allow_outside_root). Absolute paths are the user's own listing: accepted, and the log
        says how many lie outside the manifest's folder."""
        paths: dict[str, Path] = {}
        labels: dict[str, str] = {}
        escapes: list[str] = []
        absolute_outside: list[str] = []
        for line, row in rows:
            given = Path(row["path"]).expanduser()
            p = given if given.is_absolute() else self.root / given
            paths[row["image_id"]] = p
            labels[row["image_id"]] = f"line {line}: {row['path']}"
            if self.allow_outside_root or not outside_root(p, self.root):
                continue
            if given.is_absolute():
                absolute_outside.append(f"line {line}: {row['path']}")
            else:
                escapes.append(row["image_id"])
        if absolute_outside:
            log.info(
                "Manifest %s: %d image(s) are listed by absolute path outside the manifest's "
                "folder; reading them where they are:%s",
                self.path,
                len(absolute_outside),
                listing(absolute_outside),
            )
        return paths, labels, escapes

    def _raise(self, problems: list[str]) -> None:
        """One DataError listing every problem (nothing when there is none)."""
        if problems:
            body = "\n".join(f"- {p}" for p in problems)
            raise DataError(f"Manifest {self.path} has problems:\n{body}")

    # ------------------------------------------------------------------ protocol

    @property
    def location(self) -> str:
        return f"manifest {self.path}"


def unknown_relevance_message(n: int) -> str:
    return (
        f"{n} query row(s) list relevant_ids that name no gallery crater (no gallery row has "
        "that crater_id); those ids cannot be retrieved and count for nothing in the metrics. "
        "Fix the ids or add the gallery crops (dataset.strict=true makes this an error):"
    )
