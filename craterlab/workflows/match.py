"""Cross-observation matching: mutual best matches between the craters of two indexes.

Both indexes must hold the same representation (same encoder config and backbone). Candidate
pairs and their scores come from :mod:`craterlab.workflows.pairs` (stage-1 neighbours in both
directions, or the geometry pre-filter when the observations share a frame). Crater A and
crater B match when B is A's best-scoring crater and A is B's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from craterlab.errors import DataError
from craterlab.workflows.config import encoder_spec, spec_differences
from craterlab.workflows.geometry import GeometryFilter
from craterlab.workflows.options import finite, positive_int
from craterlab.workflows.pairs import (
    CraterPair,
    candidate_rows,
    crater_pairs,
    pair_scores,
    write_pairs_csv,
)

if TYPE_CHECKING:
    from craterlab.workflows.api import CraterIndex


@dataclass
class MatchResult:
    matches: list[CraterPair]
    craters_a: int
    craters_b: int

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        return write_pairs_csv(path, self.matches)


def check_compatible(a: CraterIndex, b: CraterIndex) -> None:
    """Two indexes are comparable only if one encoder made both."""
    diffs = spec_differences(encoder_spec(a.config), encoder_spec(b.config))
    if a.encoder_identity.get("backbone") != b.encoder_identity.get("backbone"):
        diffs.append("backbone identity (model, weights or transform) differs")
    if diffs:
        raise DataError(
            "The two indexes were encoded differently, so their scores are not comparable:\n  "
            + "\n  ".join(
                d.replace("(index)", "(A)").replace("(requested)", "(B)") for d in diffs[:10]
            )
            + "\nRebuild one of them with the other's overrides (python -m craterlab index "
            "info DIR shows them)."
        )


def match(
    a: CraterIndex,
    b: CraterIndex,
    *,
    neighbors: int = 10,
    geometry: GeometryFilter | None = None,
    min_score: float | None = None,
) -> MatchResult:
    """Mutual best crater matches between ``a`` and ``b`` (see the module docstring)."""
    positive_int("neighbors", neighbors)
    finite("min_score", min_score)
    a.require_items()
    b.require_items()
    check_compatible(a, b)
    flt = geometry or GeometryFilter()
    ia, ib = candidate_rows(a, b, neighbors, flt, same=False)
    if not flt.active:  # stage 1 from B's side too, so B's best match is among the candidates
        jb, ja = candidate_rows(b, a, neighbors, flt, same=False)
        both = np.unique(np.stack([np.r_[ia, ja], np.r_[ib, jb]], axis=1), axis=0)
        ia, ib = both[:, 0], both[:, 1]
    scores = pair_scores(a, b, ia, ib)
    pairs = crater_pairs(a, b, ia, ib, scores, same=False)
    best_a: dict[str, CraterPair] = {}
    best_b: dict[str, CraterPair] = {}
    for p in pairs:  # sorted by score, so the first seen is the best
        best_a.setdefault(p.crater_a, p)
        best_b.setdefault(p.crater_b, p)
    matches = [p for ca, p in best_a.items() if best_b[p.crater_b].crater_a == ca]
    if min_score is not None:
        matches = [p for p in matches if p.score >= min_score]
    n_a = len({it.crater for it in a.items})
    n_b = len({it.crater for it in b.items})
    return MatchResult(sorted(matches, key=lambda p: -p.score), n_a, n_b)
