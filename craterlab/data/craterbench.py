"""The CraterBench-R release (Hugging Face dataset ``jfang/CraterBench-R``, CC-BY-4.0).

Layout (as published)::

    images.zip                  -> images/gallery/*.jpg (50,000), images/query/*.jpg (5,000)
    splits/test.json            {"gallery_images": [...], "query_images": [...]}
    splits/train.json           {"gallery_images": [...]}   (test relevance closure removed)
    metadata/query_relevance.json   raw co-visible crater ids + gallery-filtered relevance
    metadata/stats.json

Entries are ``{"image_id", "path" (relative), "crater_id", "view_type"}``. Crater ids are
strings in the release (``"02-1-002611"``); they become integers through
:class:`craterlab.data.base.CraterIdMap` (``dataset.crater_ids.to_name`` maps back).

With ``root: null`` the release lives in ``$CRATERLAB_DATA`` (default
``~/.cache/craterlab``)/CraterBench-R and is downloaded through ``huggingface_hub`` when absent
(progress bars, resumable; ``images.zip`` checked against the hub's sha256), then unzipped.
Offline, a DataError says what to download and where to put it. Small layout differences are
tolerated: ``images.zip`` not yet unpacked, a release nested one or two folders down, images
unpacked without the leading ``images/`` folder, key spellings such as ``queries``.

The same file checks as for manifests apply: with ``check_files`` (default) every image header
is read up front and all bad files are reported together (or left out and counted with
``skip_bad=true``); entry paths that leave the release folder are refused unless
``allow_outside_root=true``; gallery-filtered relevance ids that name no gallery crater are
counted in a warning (an error with ``strict=true``). The identity hashes the split and
relevance files and each image's path, size and mtime, with or without ``check_files``.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

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
from craterlab.errors import DataError
from craterlab.hashing import file_sha256, fingerprint
from craterlab.types import ImageRecord

log = logging.getLogger(__name__)

REPO_ID = "jfang/CraterBench-R"
SPLIT_FILES = {"test": "splits/test.json", "train": "splits/train.json"}
RELEVANCE_FILE = "metadata/query_relevance.json"
GALLERY_KEYS = ("gallery_images", "gallery")
QUERY_KEYS = ("query_images", "queries", "query")
# spellings of the per-query relevance fields we accept
FILTERED_KEYS = (
    "gallery_filtered_relevant_ids",
    "filtered_relevant_ids",
    "gallery_filtered",
    "filtered",
    "relevant_crater_ids",
    "relevant_ids",
    "relevant",
)
RAW_KEYS = (
    "raw_covisible_crater_ids",
    "raw_covisible_ids",
    "raw_relevant_ids",
    "covisible_crater_ids",
    "raw",
)


def default_cache() -> Path:
    return Path(os.environ.get("CRATERLAB_DATA", "~/.cache/craterlab")).expanduser()


def how_to_download(target: Path) -> str:
    return (
        f"Download it yourself and put it at {target}:\n"
        f"  huggingface-cli download {REPO_ID} --repo-type dataset --local-dir {target}\n"
        f"  (cd {target} && unzip images.zip)\n"
        f"or copy an existing copy there, then run with dataset.root={target}. "
        "(The zip is unpacked automatically if you leave it there.)"
    )


class CraterBenchR(FileDataset):
    """Reader of the CraterBench-R release layout (see the module docstring)."""

    identity_prefix = "craterbench_r"

    def __init__(
        self,
        root: str | None = None,
        download: bool = True,
        repo_id: str = REPO_ID,
        revision: str | None = None,
        check_files: bool = True,
        skip_bad: bool = False,
        strict: bool = False,
        allow_outside_root: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.name = "craterbench_r"
        self.skip_bad = skip_bad
        self.strict = strict
        self.allow_outside_root = allow_outside_root
        self.max_image_pixels = check_max_pixels(max_image_pixels)
        self.skipped: dict[str, str] = {}  # image_id -> why it was left out (skip_bad)
        if root:
            given = Path(root).expanduser()
            if not given.exists():
                raise DataError(
                    f"CraterBench-R root {given} does not exist (dataset.root={root!r}). Point "
                    "dataset.root at the folder holding splits/ and images/ (or images.zip), or "
                    "set dataset.root=null to download the release into the cache "
                    f"({default_cache() / 'CraterBench-R'}).\n" + how_to_download(given)
                )
        else:
            given = default_cache() / "CraterBench-R"
            if _find_release(given) is None:
                if not download:
                    raise DataError(
                        f"CraterBench-R is not in the cache ({given}) and dataset.download=false."
                        "\n" + how_to_download(given)
                    )
                fetch_release(given, repo_id=repo_id, revision=revision)
        release = _find_release(given)
        if release is None:
            found = sorted(p.name for p in given.iterdir())[:20] if given.is_dir() else []
            raise DataError(
                f"No CraterBench-R release under {given}: expected {SPLIT_FILES['test']} there "
                f"(or one or two folders down); found {', '.join(found) or 'nothing'}.\n"
                + how_to_download(given)
            )
        self.root = release
        ensure_unzipped(release)
        self._load(check_files)

    # ------------------------------------------------------------------ loading

    def _load(self, check_files: bool) -> None:
        test = _read_json(self.root / SPLIT_FILES["test"])
        gallery_raw = _entries(test, GALLERY_KEYS, self.root / SPLIT_FILES["test"])
        query_raw = _entries(test, QUERY_KEYS, self.root / SPLIT_FILES["test"])
        train_path = self.root / SPLIT_FILES["train"]
        train_json = _read_json(train_path) if train_path.is_file() else {}
        train_raw: list[dict[str, Any]] = []
        if train_json:
            train_raw = _entries(train_json, GALLERY_KEYS, train_path)
            train_raw += _entries(train_json, QUERY_KEYS, train_path, required=False)
        rel_path = self.root / RELEVANCE_FILE
        relevance = _relevance_table(_read_json(rel_path), rel_path) if rel_path.is_file() else {}

        names: list[object] = [e["crater_id"] for e in (*gallery_raw, *query_raw, *train_raw)]
        for raw, filtered in relevance.values():
            names += [*raw, *filtered]
        self.crater_ids = CraterIdMap(names)
        samples = [str(e["path"]) for e in gallery_raw[:1] + query_raw[:1]]
        self.image_base, self._strip = _image_base(self.root, samples)
        self._paths: dict[str, Path] = {}
        self.raw_covisible: dict[str, list[int]] = {}
        self._records = {
            "gallery": self._to_records(gallery_raw, "gallery", {}),
            "query": self._to_records(query_raw, "query", relevance),
            "train": self._to_records(train_raw, "train", {}),
        }
        self._check_paths()
        screen = screen_files(
            self._paths, check_images=check_files, max_pixels=self.max_image_pixels
        )
        if screen.bad:
            self._leave_out(screen.bad)
        self._check_relevance()
        if not check_files:
            log.info(
                "%s: dataset.check_files=false, images are not checked up front; cached features "
                "are matched to the images by path+size+mtime of each file",
                self.location,
            )
        stats: list[object] = list(screen.stats)
        if self.skipped:
            stats.append(sorted(self.skipped))
        digests = [
            file_sha256(p) for p in (self.root / f for f in SPLIT_FILES.values()) if p.is_file()
        ]
        if rel_path.is_file():
            digests.append(file_sha256(rel_path))
        self._identity = fingerprint("craterbench_r", digests, stats)

    def _to_records(
        self, entries: list[dict[str, Any]], split: str, relevance: dict[str, tuple[list, list]]
    ) -> list[ImageRecord]:
        out = []
        for e in entries:
            image_id = str(e["image_id"])
            cid = self.crater_ids(e["crater_id"])
            rel_path = Path(str(e["path"]))
            path = self.image_base / (Path(*rel_path.parts[1:]) if self._strip else rel_path)
            rel: frozenset[int] = frozenset()
            if split == "query":
                raw, filtered = _query_relevance(e, relevance)
                rel = (
                    frozenset(self.crater_ids(x) for x in filtered)
                    if filtered
                    else frozenset({cid})
                )
                self.raw_covisible[image_id] = sorted(self.crater_ids(x) for x in (raw or filtered))
            if image_id in self._paths and self._paths[image_id] != path:
                raise DataError(
                    f"Image id {image_id!r} appears twice with different paths in the "
                    f"CraterBench-R split files ({self._paths[image_id]} and {path})."
                )
            self._paths[image_id] = path
            out.append(ImageRecord(image_id, cid, str(e.get("view_type", "")), str(path), rel))
        return out

    def _labels(self) -> dict[str, str]:
        return {
            i: str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p)
            for i, p in self._paths.items()
        }

    def _check_paths(self) -> None:
        """Entry paths must stay inside the release folder (unless allow_outside_root)."""
        if self.allow_outside_root:
            return
        outside = [f"{i}: {p}" for i, p in self._paths.items() if outside_root(p, self.root)]
        if outside:
            raise DataError(
                f"{len(outside)} image path(s) in the CraterBench-R split files under "
                f"{self.root} point outside the release folder (../ or absolute paths):"
                f"{listing(outside)}\nRe-download the release, or set "
                "dataset.allow_outside_root=true if these split files are yours and meant so."
            )

    def _leave_out(self, bad: dict[str, str]) -> None:
        """Report bad images (all of them), or drop them with skip_bad and say how many."""
        where = f"CraterBench-R at {self.root}"
        missing = sum(p.startswith("does not exist") for p in bad.values())
        if not self.skip_bad:
            hint = (
                f"\n{missing} of them are missing: unpack images.zip in {self.root} "
                "(`unzip images.zip`) or re-download the release."
                if missing
                else ""
            )
            raise DataError(bad_files_message(where, bad, self._labels()) + hint)
        log_skipped(where, bad, self._labels())
        self.skipped = dict(bad)
        for split, recs in self._records.items():
            self._records[split] = [r for r in recs if r.image_id not in bad]
        self._paths = {k: v for k, v in self._paths.items() if k not in bad}

    def _check_relevance(self) -> None:
        """Queries need a relevant gallery image; relevance ids outside the gallery are
        counted (a warning, an error with strict)."""
        gallery_ids = {r.crater_id for r in self._records["gallery"]}
        queries = self._records["query"]
        empty = [r.image_id for r in queries if not r.relevant_ids & gallery_ids]
        if empty:
            skipped = f" ({len(self.skipped)} bad images were skipped)" if self.skipped else ""
            raise DataError(
                f"{len(empty)} CraterBench-R queries have no relevant gallery image{skipped} "
                f"(their relevant crater ids are not gallery crater ids): {listing(empty)}\nThe "
                f"split file {SPLIT_FILES['test']} and {RELEVANCE_FILE} do not match; "
                "re-download."
            )
        names = self.crater_ids.to_name
        unknown = [
            f"{r.image_id}: {';'.join(names[i] for i in sorted(r.relevant_ids - gallery_ids))}"
            for r in queries
            if r.relevant_ids - gallery_ids
        ]
        if not unknown:
            return
        message = (
            f"{len(unknown)} CraterBench-R queries list gallery-filtered relevant ids that name "
            "no gallery crater; those ids cannot be retrieved and count for nothing in the "
            f"metrics. {RELEVANCE_FILE} does not match the split file (re-download), "
            "dataset.strict=true makes this an error:" + listing(unknown)
        )
        if self.strict:
            raise DataError(message)
        log.warning("%s", message)

    # ------------------------------------------------------------------ protocol

    @property
    def location(self) -> str:
        return f"CraterBench-R at {self.root}"


# ---------------------------------------------------------------------- layout helpers


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"Expected file {path} is missing; re-download the release.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); re-download the release.") from None


def _entries(
    doc: Any, keys: tuple[str, ...], path: Path, required: bool = True
) -> list[dict[str, Any]]:
    """The list of image entries under one of ``keys``, each checked for its fields."""
    found = next((k for k in keys if isinstance(doc, dict) and k in doc), None)
    if found is None:
        if not required:
            return []
        have = ", ".join(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
        raise DataError(
            f"{path}: expected a key {keys[0]!r} (or {', '.join(map(repr, keys[1:]))}) holding "
            f"a list of image entries; found keys: {have}."
        )
    entries = doc[found]
    if not isinstance(entries, list):
        raise DataError(
            f"{path}: {found!r} should be a list of entries, got {type(entries).__name__}."
        )
    bad = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not all(k in e for k in ("image_id", "path", "crater_id")):
            have = ", ".join(e) if isinstance(e, dict) else type(e).__name__
            bad.append(f"{found}[{i}]: has {have}")
    if bad:
        raise DataError(
            f"{path}: entries need image_id, path and crater_id (view_type optional):"
            + listing(bad)
        )
    return entries


def _pick(entry: dict[str, Any], keys: tuple[str, ...]) -> list | None:
    for k in keys:
        if k in entry and entry[k] is not None:
            v = entry[k]
            if isinstance(v, str):
                return [s for s in v.replace(",", ";").split(";") if s.strip()]
            return list(v)
    return None


def _relevance_table(doc: Any, path: Path) -> dict[str, tuple[list, list]]:
    """key (query image id or crater id) -> (raw co-visible ids, gallery-filtered ids)."""
    if isinstance(doc, dict):
        for wrapper in ("queries", "query_relevance", "relevance"):
            if wrapper in doc and isinstance(doc[wrapper], dict | list):
                doc = doc[wrapper]
                break
    items: list[tuple[str, Any]] = []
    if isinstance(doc, dict):
        items = [(str(k), v) for k, v in doc.items() if not str(k).startswith("_")]
        items = [(k, v) for k, v in items if isinstance(v, dict | list)]
    elif isinstance(doc, list):
        for v in doc:
            key = next(
                (
                    v[k]
                    for k in (
                        "image_id",
                        "query_image_id",
                        "query_id",
                        "crater_id",
                        "query_crater_id",
                    )
                    if isinstance(v, dict) and k in v
                ),
                None,
            )
            if key is not None:
                items.append((str(key), v))
    table: dict[str, tuple[list, list]] = {}
    for key, v in items:
        if isinstance(v, list):
            table[key] = (list(v), list(v))
            continue
        filtered, raw = _pick(v, FILTERED_KEYS), _pick(v, RAW_KEYS)
        if filtered is None and raw is None:
            raise DataError(
                f"{path}: entry {key!r} has none of the expected relevance fields "
                f"({', '.join(FILTERED_KEYS[:3])}, ... or {RAW_KEYS[0]}); found "
                f"{', '.join(v) or 'no keys'}."
            )
        table[key] = (raw if raw is not None else list(filtered or []), filtered or list(raw or []))
    if not table:
        raise DataError(
            f"{path}: expected per-query relevance (a mapping from query image id or crater id "
            "to raw and gallery-filtered crater ids); found nothing usable."
        )
    return table


def _query_relevance(
    entry: dict[str, Any], table: dict[str, tuple[list, list]]
) -> tuple[list, list]:
    filtered = _pick(entry, FILTERED_KEYS)
    raw = _pick(entry, RAW_KEYS)
    if filtered is not None or raw is not None:
        return raw or filtered or [], filtered or raw or []
    for key in (entry["image_id"], entry.get("query_id"), entry["crater_id"]):
        if key is not None and str(key) in table:
            return table[str(key)]
    return [], []


def _find_release(root: Path) -> Path | None:
    """The folder holding splits/test.json: root itself or one or two levels down."""
    if not root.is_dir():
        return None
    if (root / SPLIT_FILES["test"]).is_file():
        return root
    for depth in ("*", "*/*"):
        for cand in sorted(root.glob(f"{depth}/{SPLIT_FILES['test']}")):
            return cand.parent.parent
    return None


def _image_base(root: Path, sample_paths: list[str]) -> tuple[Path, bool]:
    """Where the entries' relative paths start, and whether to drop their first folder.

    Tolerates a nested unpack (root/CraterBench-R/images/...) and images unpacked without
    their leading ``images/`` folder (root/gallery/x.jpg for images/gallery/x.jpg).
    """
    if not sample_paths:
        return root, False
    candidates = [root, *sorted(p for p in root.glob("*") if p.is_dir())]
    candidates += sorted(p for p in root.glob("*/*") if p.is_dir())
    for strip in (False, True):
        for base in candidates:
            rel = [Path(*Path(p).parts[1:]) if strip else Path(p) for p in sample_paths]
            if all(str(r) not in ("", ".") and (base / r).is_file() for r in rel):
                return base, strip
    return root, False  # _check_files reports what is missing


def ensure_unzipped(root: Path) -> None:
    """Unpack root/images.zip into root unless already done (resumable: skips complete files)."""
    archive = root / "images.zip"
    marker = root / ".images_unzipped"
    if not archive.is_file() or marker.is_file():
        return
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            from tqdm import tqdm

            for m in tqdm(
                members, desc=f"unzip {archive.name}", unit="file", disable=len(members) < 500
            ):
                target = root / m.filename
                if target.is_file() and target.stat().st_size == m.file_size:
                    continue
                zf.extract(m, root)
    except zipfile.BadZipFile as exc:
        raise DataError(
            f"{archive} is not a valid zip ({exc}); it is probably a partial download. Delete "
            "it and download again (huggingface-cli resumes), or unzip a good copy there."
        ) from None
    marker.write_text("ok\n")


def fetch_release(target: Path, repo_id: str = REPO_ID, revision: str | None = None) -> Path:
    """Download the release into ``target`` via huggingface_hub, verify, and unzip it."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline:
        raise DataError(
            "CraterBench-R is not available locally and HF_HUB_OFFLINE is set, so it cannot be "
            "downloaded.\n" + how_to_download(target)
        )
    try:
        from huggingface_hub import HfApi, snapshot_download

        target.mkdir(parents=True, exist_ok=True)
        print(f"Downloading {repo_id} (about 1.8 GB) into {target} ...", flush=True)
        snapshot_download(
            repo_id=repo_id, repo_type="dataset", revision=revision, local_dir=str(target)
        )
    except Exception as exc:  # network errors come in many types; all mean the same here
        raise DataError(
            f"Could not download {repo_id} ({type(exc).__name__}: {exc}).\n"
            + how_to_download(target)
        ) from None
    _verify_zip(HfApi(), repo_id, revision, target / "images.zip")
    ensure_unzipped(target)
    return target


def _verify_zip(api: Any, repo_id: str, revision: str | None, archive: Path) -> None:
    """Compare images.zip with the sha256 the hub records for it (LFS), when it gives one."""
    if not archive.is_file():
        return
    try:
        info = api.get_paths_info(repo_id, ["images.zip"], repo_type="dataset", revision=revision)
        lfs = getattr(info[0], "lfs", None) if info else None
        expected = getattr(lfs, "sha256", None) if lfs is not None else None
    except Exception:
        return  # no metadata available: nothing to check against
    if expected and file_sha256(archive) != expected:
        raise DataError(
            f"{archive} does not match the hub's sha256 ({expected}); the download is corrupt. "
            "Delete it and run again."
        )
