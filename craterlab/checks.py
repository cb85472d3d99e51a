"""Sanity checks that stop a run before it reports a wrong answer.

- Run settings (``seed``, ``depth``, ``batch_size``, ``num_workers``) are checked before any
  work, on a cache hit as on a miss (``depth`` by :func:`craterlab.metrics.resolve_depth`).
- Features, pooled vectors, tokens and scores must be finite: one NaN in a checkpoint spreads
  to every image, and its rankings (ordered by NaN) still produce plausible-looking metrics.
  A non-finite value stops the run, naming the stage and how many images it affects.
- Degenerate features (every image identical) are legal numbers but rank at random: warned.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from craterlab.errors import ConfigError, CraterlabError
from craterlab.metrics import resolve_depth
from craterlab.types import Features, Ranking, Tokens

log = logging.getLogger("craterlab")

CHUNK = 4096  # images per check (bounded memory on memory-mapped token arrays)

BROKEN_NUMBERS_CAUSE = (
    "This happens with broken weights (a checkpoint holding NaN, a diverged fine-tune) or an "
    "overflow in reduced precision. Check backbone.weights and try backbone.precision=fp32."
)
BROKEN_NUMBERS_FIX = (
    f"{BROKEN_NUMBERS_CAUSE} Extraction never caches such features; an entry written by an "
    "older craterlab can be removed with python -m craterlab cache clear PATTERN."
)


# --------------------------------------------------------------------------- run settings


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_run_settings(cfg: Any) -> None:
    """``seed`` an integer, ``depth`` valid, ``batch_size`` positive, ``num_workers`` >= 0."""
    if "depth" in cfg:
        resolve_depth(cfg["depth"], 1)  # raises ConfigError naming the valid values
    rules = {
        "seed": (None, "an integer (e.g. seed=0)"),
        "batch_size": (1, "a positive integer: images per backbone batch (e.g. batch_size=32)"),
        "num_workers": (0, "0 (decode in the main process) or a positive number of workers"),
    }
    for key, (minimum, meaning) in rules.items():
        if key not in cfg:
            continue
        value = cfg[key]
        number = _integer(value)
        if number is None or (minimum is not None and number < minimum):
            raise ConfigError(
                f"{key}={value!r} is not valid: {key} must be {meaning}. "
                f"Fix it on the command line or in your config ({key}=VALUE)."
            )


# --------------------------------------------------------------------------- finite numbers


def nonfinite_rows(*tensors: torch.Tensor | None, mask: torch.Tensor | None = None) -> int:
    """How many rows (images) hold a NaN or inf in any of ``tensors`` (masked-out ignored)."""
    present = [t for t in tensors if t is not None and t.numel()]
    if not present:
        return 0
    n = len(present[0])
    per_row = max(t[0].numel() for t in present)
    step = max(1, min(CHUNK, (1 << 24) // per_row))  # ~16M values per check
    bad = 0
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        row_bad = torch.zeros(hi - lo, dtype=torch.bool)
        for t in present:
            ok = torch.isfinite(t[lo:hi])
            if mask is not None and t.dim() == 3 and t.shape[:2] == mask.shape:
                ok |= ~mask[lo:hi].to(ok.device).unsqueeze(-1)
            row_bad |= ~ok.reshape(hi - lo, -1).all(dim=1).cpu()
        bad += int(row_bad.sum())
    return bad


def all_identical(rows: torch.Tensor) -> bool:
    """Whether every row of ``rows`` (N, ...) equals the first (N > 1)."""
    if len(rows) < 2:
        return False
    first = rows[:1].float()
    return all(
        torch.equal(rows[lo : lo + CHUNK].float(), first.expand_as(rows[lo : lo + CHUNK]))
        for lo in range(0, len(rows), CHUNK)
    )


def _stop(stage: str, split: str, bad: int, total: int) -> CraterlabError:
    return CraterlabError(
        f"Non-finite values (NaN or inf) after {stage}: {bad} of {total} {split} images are "
        f"affected, so every ranking and metric of this run would be meaningless. "
        f"{BROKEN_NUMBERS_FIX}"
    )


def _warn_degenerate(stage: str, split: str, total: int) -> None:
    log.warning(
        "Degenerate features after %s: all %d %s images have identical values, so retrieval "
        "ranks them arbitrarily. Check the backbone weights and the images.",
        stage,
        total,
        split,
    )


def check_features(features: Features, split: str) -> None:
    """Backbone output (cls, tokens, attention) of one split: finite, and not all identical."""
    bad = nonfinite_rows(features.cls, features.tokens, features.attn)
    if bad:
        raise _stop("feature extraction (backbone output)", split, bad, len(features))
    if all_identical(features.cls):
        _warn_degenerate("feature extraction", split, len(features))


def check_batch_before_caching(features: Features, split: str, first: int, total: int) -> None:
    """One extracted batch (images ``first``.. of ``total``) must be finite before the feature
    cache stores it: a broken model stops the run and leaves no NaN behind in the cache."""
    bad = nonfinite_rows(features.cls, features.tokens, features.attn)
    if bad:
        last = first + len(features)
        raise CraterlabError(
            f"Non-finite values (NaN or inf) after feature extraction (backbone output): {bad} "
            f"of the {len(features)} {split} images {first + 1}-{last} (of {total}) are "
            "affected, so every ranking and metric of this run would be meaningless. Nothing "
            f"of this batch was written to the feature cache. {BROKEN_NUMBERS_CAUSE}"
        )


def check_vectors(vectors: torch.Tensor, split: str, stage: str = "pooling") -> None:
    """Global vectors (N, D): finite, and not all identical."""
    bad = nonfinite_rows(vectors)
    if bad:
        raise _stop(stage, split, bad, len(vectors))
    if all_identical(vectors):
        _warn_degenerate(stage, split, len(vectors))


def check_tokens(tokens: Tokens, split: str, stage: str = "token selection") -> None:
    """Token sets (N, K, D): real tokens finite (padding ignored)."""
    bad = nonfinite_rows(tokens.vectors, mask=tokens.mask)
    if bad:
        raise _stop(stage, split, bad, len(tokens.vectors))


def check_scores(ranking: Ranking, mode: str) -> None:
    """Ranked scores: no NaN or +inf (-inf marks 'no candidate' and is allowed)."""
    scores = ranking.scores
    if not scores.numel():
        return
    broken = torch.isnan(scores) | torch.isposinf(scores)
    bad = int(broken.reshape(len(scores), -1).any(dim=1).sum())
    if bad:
        raise CraterlabError(
            f"Non-finite scores (NaN or +inf) in retrieval mode {mode!r}: {bad} of "
            f"{len(scores)} query images are affected, so its metrics would be meaningless. "
            f"{BROKEN_NUMBERS_FIX}"
        )
