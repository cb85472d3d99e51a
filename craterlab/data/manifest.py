"""Your own crater crops, listed in a CSV manifest.

Columns: ``image_id, path, crater_id, role`` (role: gallery, query or train), optional
``relevant_ids`` (semicolon-separated co-visible crater ids of a query; default: the query's
own crater_id) and ``view_type``. Paths are relative to the CSV's folder (absolute paths work).

The manifest is validated when the dataset is built (cheap checks: columns, roles, duplicate
ids, missing files, queries with no relevant gallery image); every problem is reported with the
offending rows, nothing is dropped silently. Images are decoded lazily by ``load_image``, which
names the file when it cannot be decoded.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

from craterlab.data.base import SPLITS as ROLES
from craterlab.data.base import CraterIdMap, FileDataset, listing
from craterlab.errors import DataError
from craterlab.hashing import fingerprint
from craterlab.types import ImageRecord

REQUIRED = ("image_id", "path", "crater_id", "role")
OPTIONAL = ("relevant_ids", "view_type")


class ManifestDataset(FileDataset):
    """Crater crops listed in a CSV manifest (see the module docstring for the columns)."""

    identity_prefix = "manifest"

    def __init__(self, path: str, check_files: bool = True) -> None:
        if not path:
            raise DataError(
                "dataset=manifest needs dataset.path=FILE.csv: a CSV with columns "
                "image_id,path,crater_id,role[,relevant_ids,view_type] (see the README, "
                "'Your own crops', and examples/manifest/)."
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
        rows = self._read_rows()
        self._records, self._paths, stats = self._validate(rows, check_files)
        self._identity = fingerprint("manifest", self.path.read_bytes(), stats)

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
                rows = []
                for line, row in enumerate(reader, start=2):
                    rows.append(
                        (line, {(k or "").strip(): (v or "").strip() for k, v in row.items()})
                    )
        except UnicodeDecodeError as exc:
            raise DataError(
                f"Manifest {self.path} is not UTF-8 text ({exc}); save it as UTF-8 CSV."
            ) from None
        if not rows:
            raise DataError(f"Manifest {self.path} has a header but no rows; list your images.")
        return rows

    def _validate(
        self, rows: list[tuple[int, dict[str, str]]], check_files: bool
    ) -> tuple[dict[str, list[ImageRecord]], dict[str, Path], list[tuple[str, int, int]]]:
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
        self._raise(problems)

        names: list[str] = []
        for _, row in rows:
            names.append(row["crater_id"])
            names += [r for r in row.get("relevant_ids", "").split(";") if r.strip()]
        ids = CraterIdMap(names)
        self.crater_ids = ids

        missing, stats = [], []
        paths: dict[str, Path] = {}
        records: dict[str, list[ImageRecord]] = defaultdict(list)
        gallery_craters = {ids(r["crater_id"]) for _, r in rows if r["role"].lower() == "gallery"}
        no_relevant = []
        for line, row in rows:
            p = Path(row["path"]).expanduser()
            p = p if p.is_absolute() else self.root / p
            paths[row["image_id"]] = p
            if check_files:
                try:
                    st = p.stat()
                    stats.append((row["image_id"], st.st_size, st.st_mtime_ns))
                except OSError:
                    missing.append(f"line {line}: {row['path']} (looked for {p})")
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
            records[role].append(
                ImageRecord(row["image_id"], cid, row.get("view_type", ""), str(p), rel)
            )
        if missing:
            problems.append(
                f"{len(missing)} image file(s) do not exist (paths are relative to "
                f"{self.root}):" + listing(missing)
            )
        if not records["gallery"]:
            problems.append("there are no gallery rows (role=gallery); retrieval needs a gallery.")
        if no_relevant:
            problems.append(
                f"{len(no_relevant)} query row(s) have no relevant gallery image (none of their "
                "relevant_ids is the crater_id of a gallery row); add the gallery crops or fix "
                "relevant_ids:" + listing(no_relevant)
            )
        self._raise(problems)
        return dict(records), paths, stats

    def _raise(self, problems: list[str]) -> None:
        if problems:
            body = "\n".join(f"- {p}" for p in problems)
            raise DataError(f"Manifest {self.path} has problems:\n{body}")

    # ------------------------------------------------------------------ protocol

    @property
    def location(self) -> str:
        return f"manifest {self.path}"
