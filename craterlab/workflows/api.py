"""``craterlab.CraterIndex``: build, search, update and save a crater index from Python.

The same verbs as the command line (``python -m craterlab index|search|dedup|match``)::

    import craterlab
    index = craterlab.CraterIndex.build("crops/manifest.csv", ["backbone=dino_s16", "k=32"])
    index.save("my-index")
    hits = craterlab.CraterIndex.load("my-index").search("queries/", top=10)
    hits.to_csv("hits.csv")
    index.add("new-crops/"); index.remove(["c0012_2x"]); index.save("my-index")

An index is a composition of the experiments' components: the config is composed from
``conf/`` with the given overrides, components are built by the registry, features go through
the feature cache, vectors and tokens are made by the experiment's pooling and token method,
and the stage-1 index and token store are a :class:`craterlab.retrieval.EncodedGallery`. The
saved directory records everything needed to encode queries the same way.

Layout of a saved index directory::

    workflow.json   craterlab version, overrides, resolved config, encoder identity
                    (backbone identity, weights status, untrained flag), items (id, source
                    path, crater, optional x/y/diameter), stage-1 settings
    gallery/        the EncodedGallery (ids, vectors, stage-1 index, token store)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import craterlab
from craterlab.data.base import DEFAULT_MAX_IMAGE_PIXELS, check_max_pixels
from craterlab.errors import ConfigError, DataError
from craterlab.results import is_untrained
from craterlab.retrieval.index import EncodedGallery
from craterlab.types import Tokens
from craterlab.workflows.config import (
    compose_config,
    encoder_spec,
    merge_overrides,
    plain,
    spec_differences,
)
from craterlab.workflows.encoder import Encoder
from craterlab.workflows.items import Item, ItemSet, check_decodable, check_unique, load_items
from craterlab.workflows.options import positive_int
from craterlab.workflows.results import SearchHits
from craterlab.workflows.storage import (
    check_index_target,
    check_space,
    check_workflow_meta,
    clear_partial,
    index_lock,
    index_path,
    is_space_error,
    local_cache,
    recover_interrupted,
    space_error,
)

log = logging.getLogger("craterlab")

WORKFLOW_FORMAT = 1
RUNTIME_KEYS = ("device", "batch_size", "num_workers", "cache")
"""Config knobs that may differ between building an index and using it."""


class CraterIndex:
    """A searchable, updatable crater index (see the module docstring)."""

    def __init__(
        self,
        gallery: EncodedGallery,
        items: Sequence[Item],
        config: dict[str, Any],
        overrides: Sequence[str],
        encoder_identity: dict[str, Any],
        version: str = craterlab.__version__,
    ) -> None:
        if [it.id for it in items] != list(gallery.ids):
            raise DataError("The items and the gallery index list different ids.")
        self.gallery = gallery
        self.items = list(items)
        self.config = config
        self.overrides = list(overrides)
        self.encoder_identity = encoder_identity
        self.version = version
        self.skipped: list[str] = []
        """Items left out by the last build/add because they could not be decoded."""
        self._encoder: Encoder | None = None
        self._loaded_from: Path | None = None
        self.built_with_cache: Any = None
        """The builder's cache settings (information only: the local cache is used)."""
        self._revision: str | None = None

    # ------------------------------------------------------------------ build

    @classmethod
    def build(
        cls,
        source: str | os.PathLike[str],
        overrides: Sequence[str] = (),
        *,
        stage1: str | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        skip_bad: bool = False,
        progress: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> CraterIndex:
        """Encode a folder of crops or a manifest into an index (not yet saved).

        ``overrides`` are experiment overrides (``backbone=...``, ``k=32``, ``quantizer=int8``);
        ``stage1`` a FAISS factory string (default: ``auto``, which picks by the number of
        items, see :func:`~craterlab.retrieval.vector_index.auto_index`: exact Flat below
        50,000, HNSW32 for fast single queries above, a 4-bit PQ scan from 1,000,000; a retrieval
        config whose two-stage index is not Flat is used as given). A crop over
        ``max_image_pixels`` (None: no limit) is refused, as by every reader.
        """
        overrides = list(overrides)
        config = plain(compose_config(overrides))
        spec, cfg_nprobe, cfg_ef = _stage1_settings(config)
        config["stage1"] = {
            "index": stage1 or ("auto" if spec == "Flat" else spec),
            "nprobe": nprobe if nprobe is not None else cfg_nprobe,
            "ef_search": ef_search if ef_search is not None else cfg_ef,
        }
        max_image_pixels = check_max_pixels(max_image_pixels)
        items = load_items(source, skip_bad, max_image_pixels)
        check_unique(items, str(source))
        items, skipped = check_decodable(items, skip_bad, progress, max_image_pixels)
        if not items:
            raise DataError(f"No decodable crops in {source}; nothing to index.")
        encoder = Encoder(config)
        _announce_weights(encoder)
        encoded = encoder.encode(ItemSet(items, "crops", max_image_pixels), progress=progress)
        quantizer = encoder.new_quantizer()
        quantizer.fit(encoded.tokens)
        store = quantizer.encode(encoded.tokens)
        gallery = EncodedGallery(
            [it.id for it in items],
            encoded.vectors,
            store,
            index=str(config["stage1"]["index"]),
            nprobe=config["stage1"]["nprobe"],
            ef_search=config["stage1"]["ef_search"],
            device=str(config.get("device", "auto")),
            metadata=built_by(config, encoder.weights_status, str(source)),
        )
        out = cls(gallery, items, config, overrides, encoder.identity())
        out._encoder = encoder
        out.skipped = skipped
        return out

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the index to ``directory``, swapped in atomically (:mod:`.storage`).

        An existing index there is replaced only with ``overwrite=True`` or when it is the
        index this object was loaded from (an update); any other non-empty folder or a file is
        refused. Saving over the folder it was loaded from fails when another process updated
        it meanwhile (use :meth:`updating`, which locks, to update safely).
        """
        final = index_path(directory)
        recover_interrupted(final)
        own = final == self._loaded_from
        check_index_target(final, overwrite=overwrite or own)
        if own and self._revision is not None and _revision(final) != self._revision:
            raise DataError(
                f"Index {final} changed on disk after it was loaded (another update "
                "landed); saving would lose that update. Load it again and repeat the "
                "change, or update it with `python -m craterlab index add|remove` / "
                "CraterIndex.updating(dir), which take a lock."
            )
        check_space(final.parent, self._bytes_needed(), f"index {final.name}")
        tmp = clear_partial(final)
        try:
            tmp.mkdir(parents=True)
            mode, options = search_stage(self.config)
            if mode != "two_stage" and self.items:  # saved, so a load searches at once
                self.gallery.prepare_generator(mode, options)
            self.gallery.save(tmp / "gallery")
            meta = {
                "format": WORKFLOW_FORMAT,
                "craterlab_version": self.version,
                "overrides": self.overrides,
                "config": self.config,
                "encoder": self.encoder_identity,
                "n": len(self.items),
                "items": [it.to_json() for it in self.items],
            }
            staged = tmp / "workflow.json.tmp"
            staged.write_text(json.dumps(meta, indent=1, default=str))
            os.replace(staged, tmp / "workflow.json")  # last, whole: marks .partial complete
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_space_error(exc):
                needed = self._bytes_needed()
                raise space_error(final.parent, needed, f"index {final.name}") from None
            raise DataError(
                f"Could not write index {final} ({exc.strerror or exc}: {exc.filename}). "
                "Nothing was changed; check that the folder is writable."
            ) from None
        if final.exists():
            old = final.with_name(final.name + ".old")
            if old.exists():
                shutil.rmtree(old)  # a save's own leftover (recover_interrupted checked it)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        self._loaded_from, self._revision = final, _revision(final)
        return final

    def _bytes_needed(self) -> int:
        """About what a save writes: vectors twice (ids + stage 1), the token store, items."""
        store = self.gallery.store
        payload = 0 if store is None else sum(v.nbytes for v in store.payload.values())
        return 2 * self.gallery.vectors.nbytes + payload + 400 * len(self.items) + 65536

    @classmethod
    @contextlib.contextmanager
    def updating(cls, directory: str | os.PathLike[str], **load_args: Any) -> Iterator[CraterIndex]:
        """Lock the index at ``directory``, load it, let the caller change it, save it.

        ``with CraterIndex.updating("idx") as index: index.add("new-crops/")``. A second update at
        the same time waits for the lock and then sees the first one's items.
        """
        path = index_path(directory)
        with index_lock(path):
            index = cls.load(path, **load_args)
            yield index
            index.save(path)

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], *, mmap: bool = False, verify: bool = True
    ) -> CraterIndex:
        """An index saved by :meth:`save`; checks its version and completeness.

        ``mmap=True`` maps the token store from disk instead of reading it into memory (a
        million-item gallery on one machine); ``verify=False`` skips the file checksums.
        """
        path = index_path(directory)
        recover_interrupted(path)
        meta_file = path / "workflow.json"
        if not path.is_dir():
            raise DataError(
                f"No index at {path}: the directory does not exist. Build one with "
                f"`python -m craterlab index SOURCE --out {path}`."
            )
        if not meta_file.is_file():
            raise DataError(
                f"{path} is not a craterlab index (it has no workflow.json). Pass the folder "
                "that `python -m craterlab index SOURCE --out DIR` wrote, or build an index "
                "into a new folder (index never writes into a folder holding other files)."
            )
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            raise DataError(
                f"Index {path} has a damaged workflow.json ({exc}); it was truncated or edited. "
                "Rebuild it with `python -m craterlab index SOURCE --out NEWDIR` (or "
                "--overwrite), or restore the file."
            ) from None
        if not isinstance(meta, dict):
            check_workflow_meta(path, meta)
        version = str(meta.get("craterlab_version"))
        if version != craterlab.__version__ or meta.get("format") != WORKFLOW_FORMAT:
            raise DataError(
                f"Index {path} was built by craterlab {version} (workflow format "
                f"{meta.get('format')}); this is craterlab {craterlab.__version__} (format "
                f"{WORKFLOW_FORMAT}), whose encoders may compute different features. Rebuild "
                "it with this version (`python -m craterlab index SOURCE --out DIR "
                f"{' '.join(map(str, meta.get('overrides') or []))}`), or use craterlab "
                f"{version}."
            )
        check_workflow_meta(path, meta)
        items = [Item.from_json(d) for d in meta["items"]]
        if len(items) != meta.get("n"):
            raise DataError(
                f"Index {path} lists {len(items)} items but records n={meta.get('n')}: it is "
                "truncated. Rebuild it."
            )
        gallery = EncodedGallery.load(path / "gallery", mmap=mmap, verify=verify)
        if list(gallery.ids) != [it.id for it in items]:
            raise DataError(
                f"Index {path}: gallery/ holds {len(gallery.ids)} ids that differ from the "
                f"{len(items)} items of workflow.json (a partial copy or an interrupted "
                "update). Rebuild it."
            )
        config = {**meta["config"], "cache": local_cache(meta["config"].get("cache"))}
        out = cls(gallery, items, config, meta["overrides"], meta["encoder"], version)
        out.built_with_cache = meta["config"].get("cache")
        out._loaded_from, out._revision = path, _revision(path)
        return out

    # ------------------------------------------------------------------ encoding

    def encoder(self, overrides: Sequence[str] = ()) -> Encoder:
        """The index's own encoder; ``overrides`` may change runtime knobs (device,
        batch_size, num_workers, cache) but nothing that changes the representation."""
        if overrides:
            requested = plain(compose_config(merge_overrides(self.overrides, overrides)))
            diffs = spec_differences(encoder_spec(self.config), encoder_spec(requested))
            if diffs:
                raise ConfigError(
                    "These overrides change how images are encoded, but queries must be "
                    "encoded exactly as the index was (its recorded config):\n  "
                    + "\n  ".join(diffs[:10])
                    + "\nDrop them (the index's encoder is used automatically), or build "
                    "another index with them (`python -m craterlab index SOURCE --out DIR "
                    f"{' '.join(overrides)}`)."
                )
            runtime = {k: requested[k] for k in RUNTIME_KEYS if k in requested}
            config = {**self.config, **runtime}
            self._encoder = None
        else:
            config = self.config
        if self._encoder is None:
            encoder = Encoder(config)
            self._check_same_backbone(encoder)
            self._encoder = encoder
        return self._encoder

    def _check_same_backbone(self, encoder: Encoder) -> None:
        recorded = self.encoder_identity.get("backbone")
        now = encoder.backbone.identity()
        if recorded != now:
            diffs = spec_differences(recorded or {}, now)
            raise DataError(
                "Queries would be encoded by another backbone than the index's: "
                + "; ".join(d.replace("(requested)", "(now)") for d in diffs[:5])
                + f". The index's weights were {self.encoder_identity.get('weights_status')!r}, "
                f"now they are {encoder.weights_status!r}. Make the same weights available "
                "(e.g. the pretrained weights in the Hugging Face cache, or the same "
                "checkpoint file), or rebuild the index with the weights you have."
            )

    def encode(
        self,
        source: str | os.PathLike[str] | Sequence[Item],
        *,
        skip_bad: bool = False,
        overrides: Sequence[str] = (),
        progress: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> tuple[list[Item], torch.Tensor, Tokens, list[str]]:
        """Items, vectors and tokens of crops, encoded with this index's encoder (a crop over
        ``max_image_pixels``, None for no limit, is refused)."""
        max_image_pixels = check_max_pixels(max_image_pixels)
        items = (
            list(source)
            if isinstance(source, Sequence) and not isinstance(source, str)
            else load_items(source, skip_bad, max_image_pixels)
        )
        check_unique(items, str(source) if not isinstance(source, Sequence) else "the items")
        items, skipped = check_decodable(items, skip_bad, progress, max_image_pixels)
        if not items:
            raise DataError("None of the crops can be decoded; nothing to encode.")
        encoder = self.encoder(overrides)
        encoded = encoder.encode(ItemSet(items, "crops", max_image_pixels), progress=progress)
        return items, encoded.vectors, encoded.tokens, skipped

    # ------------------------------------------------------------------ search

    def search(
        self,
        queries: str | os.PathLike[str] | Sequence[Item],
        *,
        top: int = 10,
        shortlist: int | None = None,
        overrides: Sequence[str] = (),
        skip_bad: bool = False,
        progress: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> SearchHits:
        """Top-``top`` gallery items per query crop, by two-stage search (a query crop over
        ``max_image_pixels``, None for no limit, is refused)."""
        self.require_items()  # before encoding the queries
        positive_int("top", top)
        positive_int("shortlist", shortlist)
        items, vectors, tokens, skipped = self.encode(
            queries,
            skip_bad=skip_bad,
            overrides=overrides,
            progress=progress,
            max_image_pixels=max_image_pixels,
        )
        hits = self.search_encoded([it.id for it in items], vectors, tokens, top, shortlist)
        hits.place(queries=items)
        hits.skipped = skipped
        return hits

    def search_encoded(
        self,
        query_ids: Sequence[str],
        vectors: torch.Tensor,
        tokens: Tokens,
        top: int = 10,
        shortlist: int | None = None,
        exclude_self: bool = False,
    ) -> SearchHits:
        """Two-stage search of already encoded queries (stage 1 top-S, late-interaction
        rerank); stage 1 is the index's retrieval config's (:func:`search_stage`: the pooled
        shortlist, or a multi-vector generator when built with ``retrieval=muvera`` /
        ``retrieval=token_ivf``). ``exclude_self`` drops a result whose id equals the
        query's. Hits carry their crater's map position; :meth:`SearchHits.place` fills the
        queries'."""
        self.require_items()
        positive_int("top", top)
        positive_int("shortlist", shortlist)
        n = len(self.gallery.ids)
        s = int(shortlist or self.config.get("shortlist", 100))
        depth = min(n, top + (1 if exclude_self else 0))
        mode, options = search_stage(self.config)
        result = self.gallery.search(
            vectors.float(),
            tokens,
            mode=mode,
            shortlist=max(s, depth),
            depth=depth,
            matcher=self.matcher(),
            options=options,
        )
        hits = SearchHits.from_ranking(
            list(query_ids),
            result.ids,
            result.ranking,
            vectors.float(),
            self.gallery.vectors,
            top,
            exclude_self,
        )
        return hits.place(gallery=self.items)

    def require_items(self) -> None:
        """Searching an empty index (every item removed) is an error, not a FAISS assert."""
        if not self.items:
            where = f" {self._loaded_from}" if self._loaded_from else ""
            raise DataError(
                f"The index{where} holds no items (they were all removed), so there is "
                "nothing to search or compare. Add crops with `python -m craterlab index add "
                "DIR SOURCE`, or build a new index."
            )

    def matcher(self) -> Any:
        """The index's matcher (late interaction by default), built from its config."""
        if self._encoder is not None:
            return self._encoder.matcher
        from craterlab.plugins import get_registry

        return get_registry().build("matcher", self.config["matcher"], seed=self.config["seed"])

    def stored(self, rows: torch.Tensor) -> tuple[torch.Tensor, Tokens]:
        """Vectors and (decoded) tokens of gallery rows, to use stored items as queries."""
        return self.gallery.vectors[rows], self.gallery.store.decode(rows)

    # ------------------------------------------------------------------ updates

    def add(
        self,
        source: str | os.PathLike[str] | Sequence[Item],
        *,
        skip_bad: bool = False,
        progress: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> int:
        """Encode and append crops; existing ids keep their rows (a crop over
        ``max_image_pixels``, None for no limit, is refused). Returns how many."""
        max_image_pixels = check_max_pixels(max_image_pixels)
        items = (
            list(source)
            if isinstance(source, Sequence) and not isinstance(source, str)
            else load_items(source, skip_bad, max_image_pixels)
        )
        known = set(self.gallery.ids)
        clash = [it.id for it in items if it.id in known]
        if clash:
            from craterlab.data.base import listing

            raise DataError(
                f"{len(clash)} id(s) to add are already in the index:"
                + listing(clash)
                + "\nIds are stable and unique: remove them first (index remove) to replace "
                "them, or give the new crops other ids."
            )
        items, vectors, tokens, skipped = self.encode(
            items, skip_bad=skip_bad, progress=progress, max_image_pixels=max_image_pixels
        )
        quantizer = self.encoder().new_quantizer()
        restore_quantizer(quantizer, self.gallery.store)
        self.gallery.add([it.id for it in items], vectors, quantizer.encode(tokens))
        self.items += items
        self.skipped = skipped
        return len(items)

    def remove(self, ids: Sequence[str]) -> str:
        """Delete items by id (unknown ids are an error); returns how stage 1 was updated."""
        ids = [str(i) for i in ids]
        row_of = {gid: i for i, gid in enumerate(self.gallery.ids)}
        unknown = [i for i in ids if i not in row_of]
        if unknown:
            from craterlab.data.base import listing

            raise DataError(
                f"{len(unknown)} id(s) to remove are not in the index:"
                + listing(unknown)
                + "\nCheck the ids (python -m craterlab index info DIR lists them)."
            )
        how = self.gallery.remove(ids)
        gone = set(ids)
        self.items = [it for it in self.items if it.id not in gone]
        return how

    # ------------------------------------------------------------------ info

    def __len__(self) -> int:
        return len(self.items)

    def describe(self) -> str:
        """A few lines on what the index holds and how it was built."""
        c = self.config
        tok = (
            c["aggregator"]["name"] if c["aggregator"]["name"] != "none" else c["selector"]["name"]
        )
        st = self.gallery.store
        lines = [
            f"{len(self)} items, craterlab {self.version}",
            f"backbone {c['backbone'].get('model') or c['backbone']['name']} "
            f"(weights: {self.encoder_identity.get('weights_status')})",
            f"pooling {c['pooling']['name']}, tokens {tok} k={c.get('k')}, quantizer "
            f"{c['quantizer']['name']} ({st.bytes_per_image():.0f} B/item)",
            f"stage 1 {c['stage1']['index']}, shortlist {c.get('shortlist')}",
            f"overrides: {' '.join(self.overrides) or '(none)'}",
        ]
        if self.encoder_identity.get("untrained"):
            lines.append("WARNING: untrained (random) backbone weights: scores are not meaningful.")
        return "\n".join(lines)


def _revision(path: Path) -> str | None:
    """A fingerprint of a saved index's workflow.json (changes with every save)."""
    try:
        return hashlib.sha256((path / "workflow.json").read_bytes()).hexdigest()
    except OSError:
        return None


def restore_quantizer(quantizer: Any, store: Any) -> None:
    """Give a fresh quantizer the state a trained one encoded ``store`` with (PQ codebook)."""
    book = getattr(store, "overhead", {}).get("codebook")
    if book is None:
        return
    import faiss

    m, ksub, dsub = book.shape
    pq = faiss.ProductQuantizer(m * dsub, m, int(np.log2(ksub)))
    faiss.copy_array_to_vector(np.ascontiguousarray(book.cpu().numpy().ravel()), pq.centroids)
    quantizer.pq = pq
    quantizer.dim = m * dsub


def built_by(config: dict[str, Any], weights: str, source: str) -> dict[str, Any]:
    """What the saved EncodedGallery records about its encoder (the keys a run records)."""
    tokens = config["aggregator"]["name"]
    if tokens == "none":
        tokens = config["selector"]["name"]
    return {
        "dataset": f"workflow:{source}",
        "backbone": str(config["backbone"].get("model") or config["backbone"]["name"]),
        "weights": weights,
        "pooling": str(config["pooling"]["name"]),
        "tokens": str(tokens),
        "k": int(config["k"]),
        "quantizer": str(config["quantizer"]["name"]),
    }


def _stage1_settings(config: dict[str, Any]) -> tuple[str, int | None, int | None]:
    """The stage-1 index of the config's two-stage (else first indexed) retrieval stage."""
    stages = (config.get("retrieval") or {}).get("stages") or {}
    ordered = sorted(stages.values(), key=lambda s: s.get("name") != "two_stage")
    for stage in ordered:
        if "index" in stage:
            return str(stage["index"]), stage.get("nprobe"), stage.get("ef_search")
    return "Flat", None, None


def _announce_weights(encoder: Encoder) -> None:
    status = encoder.weights_status
    if is_untrained(status):
        log.warning(
            "Backbone weights: %s. Scores of this index are NOT a pretrained model's.", status
        )
    else:
        log.info("Backbone weights: %s", status)


def search_stage(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The stage an index searches with: the first stage of its retrieval config that
    reranks a shortlist (``retrieval=all``: two_stage; ``retrieval=muvera``: muvera), with
    that stage's settings except its shortlist (the search's)."""
    stages = (config.get("retrieval") or {}).get("stages") or {}
    for cfg in stages.values():
        name = str(cfg.get("name", ""))
        if name not in ("single", "exhaustive", ""):
            options = {k: v for k, v in cfg.items() if k not in ("name", "shortlist")}
            if name == "two_stage":  # stage 1 is the index's own (saved) settings
                options = {}
            return name, options
    return "two_stage", {}
