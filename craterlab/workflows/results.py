"""Search results as rows (query, rank, gallery id, score, stage-1 score), to CSV and JSON.

``score`` is the late-interaction score that ranked the item (stage 2); ``stage1_score`` is
the exact inner product of the query's and the item's single vectors (the quantity stage 1
approximates), so it is comparable across Flat, IVF and HNSW indexes.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from craterlab.types import Ranking

FIELDS = ("query", "rank", "gallery_id", "score", "stage1_score")


@dataclass
class Hit:
    query: str
    rank: int
    gallery_id: str
    score: float
    stage1_score: float
    row: int


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
                    [h.query, h.rank, h.gallery_id, f"{h.score:.6f}", f"{h.stage1_score:.6f}"]
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
                }
                for h in hits
            ]
            for q, hits in self.by_query().items()
        }
        p.write_text(json.dumps({"queries": out, "skipped": self.skipped}, indent=1))
        return p
