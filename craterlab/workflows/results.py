"""Search results as rows (query, rank, gallery id, score, stage-1 score), to CSV and JSON.

``score`` is the late-interaction score that ranked the item (stage 2); ``stage1_score`` is
the exact inner product of the query's and the item's single vectors (the quantity stage 1
approximates), so it is comparable across Flat, IVF and HNSW indexes. ``lat, lon,
diameter_km`` place the hit's crater and ``query_lat, query_lon, query_diameter_km`` the
query's (crops ingested from a georeferenced mosaic); empty for crops without a map position.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from craterlab.types import Ranking
from craterlab.workflows.items import NO_PLACE, Item, Place

PLACE_FIELDS = ("lat", "lon", "diameter_km", "query_lat", "query_lon", "query_diameter_km")
FIELDS = ("query", "rank", "gallery_id", "score", "stage1_score", *PLACE_FIELDS)


@dataclass
class Hit:
    """One ranked gallery item of a query; the map fields are NaN when a crop has none."""

    query: str
    rank: int
    gallery_id: str
    score: float
    stage1_score: float
    row: int
    lat: float = math.nan
    lon: float = math.nan
    diameter_km: float = math.nan
    query_lat: float = math.nan
    query_lon: float = math.nan
    query_diameter_km: float = math.nan

    @property
    def place(self) -> Place:
        """The hit's crater on the map."""
        return Place(self.lat, self.lon, self.diameter_km)

    @property
    def query_place(self) -> Place:
        """The query's crater on the map."""
        return Place(self.query_lat, self.query_lon, self.query_diameter_km)

    def place_json(self) -> dict[str, float | None]:
        """The map fields for JSON (null where unknown), named as the CSV's columns."""
        values = [*self.place.values(), *self.query_place.values()]
        return dict(zip(PLACE_FIELDS, values, strict=True))


@dataclass
class SearchHits:
    """Ranked hits of every query, best first; ``skipped`` lists undecodable query crops."""

    hits: list[Hit]
    skipped: list[str] = field(default_factory=list)

    @classmethod
    def from_ranking(
        cls,
        query_ids: Sequence[str],
        gallery_ids: Sequence[Sequence[str]],
        ranking: Ranking,
        query_vectors: torch.Tensor,
        gallery_vectors: torch.Tensor,
        top: int,
        exclude_self: bool = False,
    ) -> SearchHits:
        rows = ranking.indices
        safe = rows.clamp(min=0)
        s1 = torch.einsum("qd,qkd->qk", query_vectors, gallery_vectors[safe])
        hits = []
        for q, qid in enumerate(query_ids):
            rank = 0
            for j in range(rows.shape[1]):
                r, gid = int(rows[q, j]), gallery_ids[q][j]
                if r < 0 or (exclude_self and gid == qid):
                    continue
                rank += 1
                if rank > top:
                    break
                hits.append(Hit(qid, rank, gid, float(ranking.scores[q, j]), float(s1[q, j]), r))
        return cls(hits)

    def place(
        self, queries: Sequence[Item] | None = None, gallery: Sequence[Item] | None = None
    ) -> SearchHits:
        """Fill each hit's map fields from the query and gallery items (by id; a gallery in
        index row order is read at the hit's row); items without a map position leave them
        NaN. Returns self."""
        by_query = {it.id: it.place for it in queries} if queries is not None else {}
        by_id: dict[str, Place] | None = None
        for h in self.hits:
            if h.query in by_query:
                h.query_lat, h.query_lon, h.query_diameter_km = by_query[h.query]
            if gallery is None:
                continue
            if 0 <= h.row < len(gallery) and gallery[h.row].id == h.gallery_id:
                place = gallery[h.row].place
            else:
                if by_id is None:
                    by_id = {it.id: it.place for it in gallery}
                place = by_id.get(h.gallery_id, NO_PLACE)
            h.lat, h.lon, h.diameter_km = place
        return self

    def by_query(self) -> dict[str, list[Hit]]:
        out: dict[str, list[Hit]] = {}
        for h in self.hits:
            out.setdefault(h.query, []).append(h)
        return out

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(FIELDS)
            for h in self.hits:
                w.writerow(
                    [
                        h.query,
                        h.rank,
                        h.gallery_id,
                        f"{h.score:.6f}",
                        f"{h.stage1_score:.6f}",
                        *h.place.cells(),
                        *h.query_place.cells(),
                    ]
                )
        return p

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        out = {
            q: [
                {
                    "rank": h.rank,
                    "gallery_id": h.gallery_id,
                    "score": h.score,
                    "stage1_score": h.stage1_score,
                    **h.place_json(),
                }
                for h in hits
            ]
            for q, hits in self.by_query().items()
        }
        p.write_text(json.dumps({"queries": out, "skipped": self.skipped}, indent=1))
        return p
