"""Metric-learning losses for the fine-tuning baselines: SupCon, ArcFace, batch-hard triplet,
and a token-aware one: SupCon over late-interaction scores.

Each loss maps embeddings (B, D) and integer labels (B,) to a scalar (the
:class:`craterlab.types.Loss` protocol); the token-aware loss also takes the backbone's
features (``takes_features``), so it sees every patch token. Embeddings are L2-normalized
inside every loss, so passing already-normalized vectors is harmless. A batch with nothing to
learn from (no positive pair, no negative) gives a zero loss that is still attached to the
graph, so ``backward`` works.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _zero(embeddings: torch.Tensor) -> torch.Tensor:
    """A zero loss connected to ``embeddings`` (so ``backward()`` works and gives zero grads)."""
    return embeddings.sum() * 0.0


def _check(embeddings: torch.Tensor, labels: torch.Tensor) -> None:
    if embeddings.ndim != 2 or labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"a loss needs embeddings (B, D) and labels (B,); got {tuple(embeddings.shape)} "
            f"and {tuple(labels.shape)}"
        )


def supcon_from_scores(
    scores: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor | None:
    """SupCon (L_out) on a (B, B) similarity matrix: row i is anchor i, every other
    same-label column a positive, every column but i in the softmax. None when no anchor has
    a positive."""
    b = scores.shape[0]
    self_mask = torch.eye(b, dtype=torch.bool, device=scores.device)
    logits = (scores / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positives.sum(1)
    anchors = n_pos > 0
    if not anchors.any():
        return None
    # where() (not multiplication) keeps the -inf diagonal out of the sum.
    pos_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(1)
    return -(pos_log_prob[anchors] / n_pos[anchors]).mean()


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020, L_out): every same-label sample of an
    anchor is a positive; anchors without a positive in the batch are skipped."""

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check(embeddings, labels)
        z = F.normalize(embeddings.float(), dim=-1)
        loss = supcon_from_scores(z @ z.T, labels, self.temperature)
        return _zero(embeddings) if loss is None else loss


class LateInteractionContrastiveLoss(nn.Module):
    """Token-aware contrastive loss: SupCon over late-interaction scores (Eq. 1).

    Every view in the batch is a token set (``tokens``: K instance tokens with attention
    seeds, the top-K tokens by attention, or all patch tokens; L2-normalized). Its score
    against every other view is ``s(q, g) = mean_i max_j <q_i, g_j>`` (query tokens against
    gallery tokens, the retrieval score itself), and SupCon at ``temperature`` pulls the
    same-identity views' scores up against the rest of the batch. Input: the backbone's
    ``Features`` (``takes_features``), a (B, K, D) tensor of token sets, or (B, D) embeddings
    (one token each: the loss is then plain SupCon on cosines).
    """

    takes_features = True

    def __init__(self, temperature: float = 0.05, tokens: str = "instance", k: int = 32) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if tokens not in ("instance", "attention", "all"):
            raise ValueError(f"tokens must be 'instance', 'attention' or 'all', got {tokens!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.temperature, self.tokens, self.k = temperature, tokens, k

    def token_sets(self, features: Any) -> torch.Tensor:
        """(B, K, D) unit token sets of a batch's features (K capped at the token count)."""
        from craterlab.tokens.aggregation import InstanceAggregator
        from craterlab.tokens.selection import AttentionSelector

        n_tokens = features.tokens.shape[1]
        k = min(self.k, n_tokens)
        if self.tokens == "all" or k == n_tokens:
            return F.normalize(features.tokens.float(), dim=-1)
        if self.tokens == "instance":
            return InstanceAggregator(k=k)(features).vectors
        return AttentionSelector(k=k)(features).vectors

    def forward(self, inputs: Any, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor) and inputs.ndim == 2:
            _check(inputs, labels)
            z = F.normalize(inputs.float(), dim=-1).unsqueeze(1)
        elif isinstance(inputs, torch.Tensor):
            z = F.normalize(inputs.float(), dim=-1)
        else:
            z = self.token_sets(inputs)
        if z.ndim != 3 or z.shape[0] != labels.shape[0]:
            raise ValueError(
                f"late_interaction loss needs token sets (B, K, D) and labels (B,); got "
                f"{tuple(z.shape)} and {tuple(labels.shape)}"
            )
        from craterlab.retrieval.late_interaction import late_interaction
        from craterlab.types import Tokens

        t = Tokens(z)
        loss = supcon_from_scores(late_interaction(t, t), labels, self.temperature)
        return z.sum() * 0.0 if loss is None else loss


class ArcFaceLoss(nn.Module):
    """ArcFace (Deng et al. 2019): softmax over s * cos(theta), with the target angle widened by
    an additive margin m, against learnable L2-normalized class centres.

    The class weights need the number of classes and the embedding dimension. Both are usually
    unknown when the config is written (they depend on the training split and the backbone), so
    they are bound from the data: ``finetune`` calls :meth:`bind` before building the optimizer;
    a standalone call binds lazily from the first batch (``labels.max() + 1`` classes). Setting
    ``num_classes`` in the config fixes it (it must cover every training identity).
    """

    def __init__(
        self,
        scale: float = 64.0,
        margin: float = 0.5,
        num_classes: int | None = None,
        dim: int | None = None,
    ) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if not 0 <= margin < math.pi / 2:
            raise ValueError(f"margin must be in [0, pi/2) radians, got {margin}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.scale = scale
        self.margin = margin
        self.num_classes = num_classes
        self.weight: nn.Parameter | None = None
        if num_classes is not None and dim is not None:
            self.bind(num_classes, dim)

    @property
    def bound(self) -> bool:
        return self.weight is not None

    def bind(self, num_classes: int, dim: int, device: torch.device | str | None = None) -> None:
        """Create the (num_classes, dim) class weights (Xavier-uniform, like insightface)."""
        if self.num_classes is not None and num_classes > self.num_classes:
            raise ValueError(
                f"arcface num_classes={self.num_classes} but the training split has "
                f"{num_classes} identities; remove num_classes to take it from the data"
            )
        n = self.num_classes or num_classes
        weight = torch.empty(n, dim, device=device)
        nn.init.xavier_uniform_(weight)
        self.weight = nn.Parameter(weight)
        self.num_classes = n

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check(embeddings, labels)
        if self.weight is None:
            self.bind(int(labels.max()) + 1, embeddings.shape[1], embeddings.device)
        assert self.weight is not None
        if int(labels.max()) >= self.weight.shape[0] or int(labels.min()) < 0:
            raise ValueError(
                f"arcface has {self.weight.shape[0]} classes but got labels in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        eps = 1e-7
        cos = F.normalize(embeddings.float(), dim=-1) @ F.normalize(self.weight.float(), dim=-1).T
        cos = cos.clamp(-1 + eps, 1 - eps)
        sin = (1.0 - cos * cos).sqrt()
        cos_m = cos * math.cos(self.margin) - sin * math.sin(self.margin)  # cos(theta + m)
        # Past theta + m = pi, cos(theta + m) would rise again; use the insightface fallback
        # cos(theta) - m sin(m) there so the target logit keeps decreasing with theta.
        cos_m = torch.where(
            cos > math.cos(math.pi - self.margin), cos_m, cos - self.margin * math.sin(self.margin)
        )
        target = F.one_hot(labels, self.weight.shape[0]).bool()
        logits = self.scale * torch.where(target, cos_m, cos)
        return F.cross_entropy(logits, labels)


class BatchHardTripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al. 2017) on L2-normalized embeddings: for each
    anchor, its farthest positive and nearest negative in the batch,
    ``relu(d(a, p) - d(a, n) + margin)`` (or ``softplus(d(a, p) - d(a, n))`` with
    ``soft=True``), averaged over anchors that have both."""

    def __init__(self, margin: float = 0.2, soft: bool = False) -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = margin
        self.soft = soft

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check(embeddings, labels)
        z = F.normalize(embeddings.float(), dim=-1)
        # ||a - b||^2 = 2 - 2<a, b> for unit vectors; clamp keeps sqrt's gradient finite at 0.
        dist = (2.0 - 2.0 * (z @ z.T)).clamp_min(1e-12).sqrt()
        b = z.shape[0]
        same = labels[:, None] == labels[None, :]
        positives = same & ~torch.eye(b, dtype=torch.bool, device=z.device)
        negatives = ~same
        valid = positives.any(1) & negatives.any(1)
        if not valid.any():
            return _zero(embeddings)
        hardest_pos = dist.masked_fill(~positives, float("-inf")).amax(1)
        hardest_neg = dist.masked_fill(~negatives, float("inf")).amin(1)
        gap = (hardest_pos - hardest_neg)[valid]
        per_anchor = F.softplus(gap) if self.soft else F.relu(gap + self.margin)
        return per_anchor.mean()
