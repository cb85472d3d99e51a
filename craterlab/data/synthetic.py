"""The embedded synthetic crater benchmark, following the CraterBench-R protocol.

Identities are catalogued craters (D in [1, 4) world units) of the procedural surface in
:mod:`craterlab.data.surface`. Nothing is rendered up front: an image is a pure function of
(seed, image id), rendered when ``load_image`` asks for it, so the full-scale benchmark
(25,000 identities, 50,000 gallery crops, 1,000 query craters x 5 views) needs only its
catalogue (a few arrays) in memory.

- Gallery: every identity at 2x and 3x its diameter, centred, canonical sun (azimuth 270,
  elevation 30), light sensor noise. view_type ``2x`` / ``3x``; ids ``g<crater>_2x``.
- Queries: ``views_per_query`` views of each held-out query crater: window 1.8-3.5 D, centre
  shifted up to 0.25 D, sun azimuth +-75 deg and elevation 15-60 deg, gain, gamma, sensor
  noise and blur. ids ``q<crater>_<view>``.
- Relevance I(q): catalogued craters co-visible in the view (centre within 0.25 x window of the
  view centre, diameter within a factor 2 of the query crater's), always including the query
  crater; ``relevant_ids`` keeps those in the gallery (``raw_covisible`` has them all).
- Train: identities that are neither query craters nor relevant to any query, each with its
  two gallery crops and ``train_views`` extra query-like views (ids ``t<crater>_<view>``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from craterlab.data.render_cache import RenderCache
from craterlab.data.surface import CH_PICK, CH_VIEW, CraterField, Photometry, render, seed_of
from craterlab.errors import DataError
from craterlab.hashing import stable_hash
from craterlab.types import ImageRecord

GENERATOR_VERSION = 2

SIZES: dict[str, tuple[int, int]] = {
    "tiny": (24, 6),
    "small": (150, 30),
    "medium": (2_500, 200),
    "full": (25_000, 1_000),
}
"""size -> (identities, query craters); the full size is the real benchmark's scale."""

CATALOG_CLASSES = (0, 1)  # catalogued craters: D in [1, 4) world units
CANONICAL = Photometry(sun_azimuth=270.0, sun_elevation=30.0, noise=0.01)
COVISIBLE_RADIUS = 0.25  # x view width
SIZE_RATIO = 2.0
SPLITS = ("gallery", "query", "train")


@dataclass(frozen=True)
class View:
    """Where and how one image looks at the surface."""

    crater: int
    centre: tuple[float, float]
    width: float
    photometry: Photometry
    noise_seed: int


class SyntheticCraters:
    """Procedural CraterBench-R-like benchmark; deterministic from ``seed`` (see module doc)."""

    def __init__(
        self,
        size: Literal["tiny", "small", "medium", "full"] = "small",
        n_identities: int | None = None,
        n_query_craters: int | None = None,
        views_per_query: int = 5,
        train_views: int = 2,
        image_size: int = 224,
        crater_density: float = 0.6,
        seed: int = 0,
    ) -> None:
        if size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
        n_id, n_q = SIZES[size]
        self.n_identities = int(n_identities if n_identities is not None else n_id)
        self.n_query_craters = int(n_query_craters if n_query_craters is not None else n_q)
        if self.n_identities < 2:
            raise ValueError(f"n_identities must be at least 2, got {self.n_identities}")
        if not 1 <= self.n_query_craters <= self.n_identities:
            raise ValueError(
                f"n_query_craters must be between 1 and n_identities ({self.n_identities}), "
                f"got {self.n_query_craters}"
            )
        if views_per_query < 1 or train_views < 0:
            raise ValueError("views_per_query must be >= 1 and train_views >= 0")
        if not 16 <= image_size <= 2048:
            raise ValueError(f"image_size must be between 16 and 2048, got {image_size}")
        if not 0.05 <= crater_density <= 5.0:
            raise ValueError(f"crater_density must be in [0.05, 5], got {crater_density}")
        self.size = size
        self.views_per_query = int(views_per_query)
        self.train_views = int(train_views)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.field = CraterField(lam=float(crater_density))
        self.name = f"synthetic-{size}"
        self._build_catalog()
        self._records: dict[str, list[ImageRecord]] = {}
        self._render_dir: Path | None = None
        self._render_caches: dict[str, RenderCache] = {}
        self._slots: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------------ catalogue

    def _build_catalog(self) -> None:
        """World catalogue of craters with D in [1, 4) in a square region, and the identities."""
        density = sum(
            self.field.lam / (self.field.cell_factor * 2.0**j) ** 2 for j in CATALOG_CLASSES
        )
        side = math.sqrt(1.3 * self.n_identities / density)
        while True:
            parts = [
                self.field.craters_of_class(self.seed, j, 0.0, 0.0, side, side)
                for j in CATALOG_CLASSES
            ]
            cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            inside = (cat["x"] < side) & (cat["y"] < side) & (cat["x"] >= 0) & (cat["y"] >= 0)
            cat = {k: v[inside] for k, v in cat.items()}
            if cat["x"].size >= self.n_identities:
                break
            side *= 1.2
        # Deterministic order: identities are a seeded random subset, listed first.
        rng = np.random.default_rng(seed_of(self.seed, CH_PICK, 0))
        order = rng.permutation(cat["x"].size)
        self.catalog = {k: v[order] for k, v in cat.items()}
        self.region = side
        ids = np.arange(self.n_identities)
        rng_q = np.random.default_rng(seed_of(self.seed, CH_PICK, 1))
        self.query_craters = np.sort(rng_q.choice(ids, self.n_query_craters, replace=False))
        # Spatial buckets over the catalogue for co-visibility look-ups.
        self._bucket = 8.0
        keys = np.floor(self.catalog["x"] / self._bucket).astype(np.int64) * 1_000_003 + np.floor(
            self.catalog["y"] / self._bucket
        ).astype(np.int64)
        self._bucket_keys = keys
        self._bucket_order = np.argsort(keys, kind="stable")
        self._bucket_sorted = keys[self._bucket_order]

    def crater(self, crater_id: int) -> tuple[float, float, float]:
        """(x, y, diameter) of a catalogued crater."""
        return (
            float(self.catalog["x"][crater_id]),
            float(self.catalog["y"][crater_id]),
            float(self.catalog["d"][crater_id]),
        )

    def _near(self, x: float, y: float, radius: float) -> np.ndarray:
        """Catalogue indices with centre within ``radius`` of (x, y)."""
        bx0, bx1 = math.floor((x - radius) / self._bucket), math.floor((x + radius) / self._bucket)
        by0, by1 = math.floor((y - radius) / self._bucket), math.floor((y + radius) / self._bucket)
        found = []
        for bx in range(bx0, bx1 + 1):
            for by in range(by0, by1 + 1):
                key = bx * 1_000_003 + by
                lo = np.searchsorted(self._bucket_sorted, key, side="left")
                hi = np.searchsorted(self._bucket_sorted, key, side="right")
                found.append(self._bucket_order[lo:hi])
        cand = np.concatenate(found) if found else np.zeros(0, np.int64)
        dist = np.hypot(self.catalog["x"][cand] - x, self.catalog["y"][cand] - y)
        return np.sort(cand[dist <= radius])

    # ------------------------------------------------------------------ views

    def gallery_view(self, crater_id: int, factor: int) -> View:
        x, y, d = self.crater(crater_id)
        return View(
            crater_id,
            (x, y),
            factor * d,
            CANONICAL,
            seed_of(self.seed, CH_VIEW, 0, crater_id, factor),
        )

    def perturbed_view(self, crater_id: int, view: int, stream: int) -> View:
        """A query-like view: new placement, scale, sun and sensor (stream 1: query, 2: train)."""
        x, y, d = self.crater(crater_id)
        rng = np.random.default_rng(seed_of(self.seed, CH_VIEW, stream, crater_id, view))
        width = d * rng.uniform(1.8, 3.5)
        dx, dy = rng.uniform(-0.25, 0.25, size=2) * d
        photometry = Photometry(
            sun_azimuth=float((CANONICAL.sun_azimuth + rng.uniform(-75, 75)) % 360),
            sun_elevation=float(rng.uniform(15, 60)),
            gain=float(rng.uniform(0.75, 1.3)),
            gamma=float(rng.uniform(0.75, 1.35)),
            noise=float(rng.uniform(0.01, 0.05)),
            blur=float(rng.uniform(0.0, 1.5)),
        )
        return View(
            crater_id, (x + dx, y + dy), float(width), photometry, int(rng.integers(1 << 62))
        )

    def covisible(self, view: View) -> np.ndarray:
        """Catalogue ids co-visible in a view: near its centre and of comparable size."""
        d = self.catalog["d"][view.crater]
        near = self._near(view.centre[0], view.centre[1], COVISIBLE_RADIUS * view.width)
        ratio = self.catalog["d"][near] / d
        ids = near[(ratio <= SIZE_RATIO) & (ratio >= 1 / SIZE_RATIO)]
        return np.union1d(ids, [view.crater]).astype(np.int64)

    def view_of(self, image_id: str) -> View:
        """The view an image id denotes (ids are ``g<c>_2x``, ``q<c>_<v>``, ``t<c>_<v>``)."""
        try:
            kind, rest = image_id[0], image_id[1:]
            crater_s, suffix = rest.split("_", 1)
            crater_id = int(crater_s)
            if not 0 <= crater_id < self.n_identities:
                raise ValueError
            if kind == "g" and suffix in ("2x", "3x"):
                return self.gallery_view(crater_id, int(suffix[0]))
            if kind in ("q", "t"):
                return self.perturbed_view(crater_id, int(suffix), 1 if kind == "q" else 2)
            raise ValueError
        except (ValueError, IndexError):
            raise DataError(
                f"Image id {image_id!r} does not belong to the synthetic dataset {self.name!r} "
                f"({self.n_identities} identities). Use records() of this dataset instance."
            ) from None

    # ------------------------------------------------------------------ protocol

    def records(self, split: str) -> Sequence[ImageRecord]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if split not in self._records:
            self._records[split] = getattr(self, f"_make_{split}")()
        return self._records[split]

    def _make_gallery(self) -> list[ImageRecord]:
        return [
            ImageRecord(f"g{c:05d}_{f}x", c, f"{f}x")
            for c in range(self.n_identities)
            for f in (2, 3)
        ]

    def _make_query(self) -> list[ImageRecord]:
        out = []
        for c in self.query_craters.tolist():
            for v in range(self.views_per_query):
                raw = self.covisible(self.perturbed_view(c, v, 1))
                rel = frozenset(int(i) for i in raw if i < self.n_identities)
                out.append(ImageRecord(f"q{c:05d}_{v}", c, "query", relevant_ids=rel))
        return out

    @cached_property
    def raw_covisible(self) -> dict[str, list[int]]:
        """Query image id -> all co-visible catalogued crater ids (also those not in gallery)."""
        return {
            f"q{c:05d}_{v}": self.covisible(self.perturbed_view(c, v, 1)).tolist()
            for c in self.query_craters.tolist()
            for v in range(self.views_per_query)
        }

    def train_identities(self) -> np.ndarray:
        """Identities disjoint from the query craters and from every query's relevance set."""
        held = set(self.query_craters.tolist())
        for rec in self.records("query"):
            held |= rec.relevant_ids
        return np.array([c for c in range(self.n_identities) if c not in held], dtype=np.int64)

    def _make_train(self) -> list[ImageRecord]:
        out = []
        for c in self.train_identities().tolist():
            out += [ImageRecord(f"g{c:05d}_{f}x", c, f"{f}x") for f in (2, 3)]
            out += [ImageRecord(f"t{c:05d}_{v}", c, "train") for v in range(self.train_views)]
        return out

    def with_train_views(self, train_views: int) -> SyntheticCraters:
        """The same benchmark with ``train_views`` query-like views (sun azimuth and
        elevation, placement, gain, gamma, blur, noise) per train identity (multi-view
        fine-tuning); gallery and queries are unchanged."""
        if train_views < 0:
            raise ValueError(f"train_views must be >= 0, got {train_views}")
        return SyntheticCraters(
            self.size,
            n_identities=self.n_identities,
            n_query_craters=self.n_query_craters,
            views_per_query=self.views_per_query,
            train_views=train_views,
            image_size=self.image_size,
            crater_density=self.field.lam,
            seed=self.seed,
        )

    def place_of(self, record: ImageRecord) -> int:
        """The place an image shows, for paired-view pretraining (``pretrain.pair_views=
        place``): the catalogue crater its view is aimed at. Every rendering of a place (gallery
        crops, query-like views under other suns) shares it; here a place is an identity."""
        return self.view_of(record.image_id).crater

    def place_xy(self, record: ImageRecord) -> tuple[float, float]:
        """The view's centre on the surface (world units), for ``pair_views=coordinates``."""
        return self.view_of(record.image_id).centre

    def load_image(self, record: ImageRecord) -> Image.Image:
        view = self.view_of(record.image_id)

        def draw() -> np.ndarray:
            return render(
                self.seed,
                self.field,
                view.centre,
                view.width,
                self.image_size,
                view.photometry,
                view.noise_seed,
            )

        slot = self._slot(record.image_id) if self._render_dir is not None else None
        gray = draw() if slot is None else self._render_cache(slot[0]).get(slot[1], draw)
        return Image.fromarray(gray, mode="L").convert("RGB")

    def cache_renders(self, directory: str | Path) -> None:
        """Keep rendered images under ``directory`` (one :class:`RenderCache` per split), so
        each image is rendered once per machine; feature extraction turns this on next to the
        feature cache."""
        self._render_dir = Path(directory)
        self._render_caches = {}

    def _render_cache(self, split: str) -> RenderCache:
        if split not in self._render_caches:
            assert self._render_dir is not None
            n = len(self.records(split))
            shape = (self.image_size, self.image_size)
            self._render_caches[split] = RenderCache(self._render_dir / split, n, shape)
        return self._render_caches[split]

    def _slot(self, image_id: str) -> tuple[str, int] | None:
        """(split, row) of an image in the render cache: gallery crops in the gallery split,
        query and train views where their split lists them."""
        split = {"g": "gallery", "q": "query", "t": "train"}.get(image_id[:1])
        if split is None:
            return None
        if split not in self._slots:
            self._slots[split] = {r.image_id: i for i, r in enumerate(self.records(split))}
        i = self._slots[split].get(image_id)
        return None if i is None else (split, i)

    def params(self) -> dict[str, object]:
        return {
            "generator_version": GENERATOR_VERSION,
            "n_identities": self.n_identities,
            "n_query_craters": self.n_query_craters,
            "views_per_query": self.views_per_query,
            "train_views": self.train_views,
            "image_size": self.image_size,
            "crater_density": self.field.lam,
            "seed": self.seed,
        }

    def identity(self) -> str:
        return f"synthetic-v{GENERATOR_VERSION}-{stable_hash(self.params())}"

    def __repr__(self) -> str:
        return (
            f"SyntheticCraters(size={self.size!r}, identities={self.n_identities}, "
            f"query_craters={self.n_query_craters}x{self.views_per_query}, seed={self.seed})"
        )
