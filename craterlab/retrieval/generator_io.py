"""Saving and loading the multi-vector candidate generators with a gallery index.

A generator (MUVERA's FAISS index of encodings, or the token IVF's centroids and lists) is
built once per gallery; an :class:`~craterlab.retrieval.index.EncodedGallery` saves the ones it
holds under ``generators/<kind>/`` so that a loaded index searches at once instead of
re-encoding or re-clustering the whole gallery on its first search::

    generators/<kind>/generator.json   kind, identity (every setting that built it), ntotal
    generators/muvera/index.faiss      the FAISS index of the document encodings
    generators/muvera/draws.pt         the encoder's random hyperplanes, projection, sketch
    generators/token_ivf/*.npy         centroids, list ids, list offsets (+ per-token codes,
                                       + sketch projection, codes and scales with refine)

A loaded generator is marked ``persisted``: a search with other settings than its identity is
refused (:meth:`~craterlab.retrieval.generators.CandidateStage.generator`), since it cannot be
rebuilt from the saved index without the settings that built it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from craterlab.errors import DataError
from craterlab.retrieval.fde import FdeEncoder, FdeSettings
from craterlab.retrieval.generators import FdeGenerator
from craterlab.retrieval.token_ivf import TokenIvf, TokenIvfSettings
from craterlab.retrieval.token_sketch import TokenSketch

META = "generator.json"


def save_generator(gen: Any, kind: str, directory: Path) -> None:
    """Write one built generator of stage ``kind`` into ``directory`` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(gen, FdeGenerator):
        faiss.write_index(gen.faiss_index, str(directory / "index.faiss"))
        enc = gen.encoder
        draws = {"hyperplanes": enc.hyperplanes}
        if enc.projection is not None:
            draws["projection"] = enc.projection
        if enc.settings.final_dim:
            draws.update(sketch_index=enc.sketch_index, sketch_sign=enc.sketch_sign)
        torch.save(draws, directory / "draws.pt")
        extra: dict[str, Any] = {
            "train_size": gen.train_size,
            "chunk": gen.chunk,
            "dim": enc.dim,
            "fde": {k: getattr(enc.settings, k) for k in enc.settings.__dataclass_fields__},
        }
    elif isinstance(gen, TokenIvf):
        np.save(directory / "centroids.npy", gen.centroids.numpy())
        np.save(directory / "list_ids.npy", gen.list_ids.numpy())
        np.save(directory / "offsets.npy", gen.offsets)
        own_codes = gen.codes is not None and not gen.codes_shared
        if own_codes:
            np.save(directory / "codes.npy", gen.codes.numpy())
            if gen.mask is not None:
                np.save(directory / "mask.npy", gen.mask.numpy())
        if gen.cells is not None:
            np.save(directory / "cells.npy", gen.cells.numpy())
        if gen.sketch is not None:
            np.save(directory / "sketch_projection.npy", gen.sketch.projection.numpy())
            np.save(directory / "sketch_codes.npy", gen.sketch.codes.numpy())
            np.save(directory / "sketch_scales.npy", gen.sketch.scales.numpy())
        extra = {
            "settings": {k: getattr(gen.settings, k) for k in gen.settings.__dataclass_fields__},
            "codes_shared": gen.codes_shared,
            "own_codes": own_codes,
            "impact_ordered": gen.impact_ordered,
        }
    else:
        raise TypeError(f"cannot save a {type(gen).__name__} generator")
    meta = {"kind": kind, "identity": gen.identity(), "ntotal": gen.ntotal, **extra}
    (directory / META).write_text(json.dumps(meta, indent=1, default=str))


def load_generator(directory: Path, store: Any) -> tuple[str, Any]:
    """(kind, generator) saved by :func:`save_generator`, marked ``persisted``; ``store`` is
    the gallery's token store (a token IVF over a residual store reads its codes)."""
    try:
        meta = json.loads((directory / META).read_text())
        kind = str(meta["kind"])
        if kind == "muvera":
            gen = _load_fde(directory, meta)
        elif kind == "token_ivf":
            gen = _load_ivf(directory, meta, store)
        else:
            raise KeyError(f"kind {kind!r}")
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise DataError(
            f"The saved candidate generator in {directory} cannot be read ({exc}): the index "
            "was truncated or edited. Rebuild the index (or delete that folder: the "
            "generator is then rebuilt on the first search)."
        ) from None
    if gen.ntotal != (len(store) if store is not None else -1):
        raise DataError(
            f"The saved {kind} generator in {directory} covers {gen.ntotal} images but the "
            f"gallery holds {len(store) if store is not None else 0}: it belongs to another "
            "gallery. Rebuild the index."
        )
    expected = meta["identity"]
    if kind == "token_ivf":  # an index saved before refine existed: refine 0, its default
        expected = {**{k: getattr(TokenIvfSettings(), k) for k in NEWER_IVF_FIELDS}, **expected}
    if gen.identity() != expected:
        raise DataError(
            f"The saved {kind} generator in {directory} reports {gen.identity()}, its "
            f"generator.json {expected}: the files disagree. Rebuild the index."
        )
    gen.persisted = True
    return kind, gen


NEWER_IVF_FIELDS = ("refine", "refine_dims", "max_postings", "coarse", "cell_probe")
"""Token IVF settings added after indexes were first saved (absent from older ones)."""


def _load_fde(directory: Path, meta: dict[str, Any]) -> FdeGenerator:
    enc = FdeEncoder(int(meta["dim"]), FdeSettings(**meta["fde"]))
    draws = torch.load(directory / "draws.pt")
    enc.hyperplanes = draws["hyperplanes"]
    if "projection" in draws:
        enc.projection = draws["projection"]
    if "sketch_index" in draws:
        enc.sketch_index, enc.sketch_sign = draws["sketch_index"], draws["sketch_sign"]
    ident = meta["identity"]
    gen = FdeGenerator(
        enc,
        str(ident["index"]),
        ident["nprobe"],
        ident["ef_search"],
        int(meta["train_size"]),
        int(meta["chunk"]),
    )
    gen.faiss_index = faiss.read_index(str(directory / "index.faiss"))
    gen.ntotal = int(gen.faiss_index.ntotal)
    return gen


def _load_ivf(directory: Path, meta: dict[str, Any], store: Any) -> TokenIvf:
    settings = TokenIvfSettings(**meta["settings"])
    centroids = torch.from_numpy(np.load(directory / "centroids.npy"))
    if meta["codes_shared"]:
        codes, mask = store.codes, getattr(store, "mask", None)
    elif meta["own_codes"]:
        codes = torch.from_numpy(np.load(directory / "codes.npy"))
        file = directory / "mask.npy"
        mask = torch.from_numpy(np.load(file)) if file.is_file() else None
    else:
        codes, mask = None, None
    list_ids = np.load(directory / "list_ids.npy")
    offsets = np.load(directory / "offsets.npy")
    file = directory / "cells.npy"
    cells = torch.from_numpy(np.load(file)) if file.is_file() else None
    sketch = None
    if settings.refine:  # memory-mapped: a big gallery's sketches are read where they lie
        sketch = TokenSketch(
            torch.from_numpy(np.load(directory / "sketch_projection.npy")),
            torch.from_numpy(np.load(directory / "sketch_codes.npy", mmap_mode="r+")),
            torch.from_numpy(np.load(directory / "sketch_scales.npy")),
            getattr(store, "mask", None),
        )
    return TokenIvf.from_lists(
        centroids, list_ids, offsets, int(meta["ntotal"]), settings, codes, mask,
        bool(meta["codes_shared"]), sketch, bool(meta.get("impact_ordered", False)), cells,
    )  # fmt: skip
