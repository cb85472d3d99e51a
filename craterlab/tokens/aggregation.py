"""Training-free instance-token aggregation (the study's method), batched over images.

For each image: pick K seed tokens, assign every non-seed patch token to seeds by cosine
similarity, and set z_k = l2norm(t_seed_k + weighted mean of the tokens assigned to seed k).
All tokens are L2-normalized first, so "cosine" is a dot product. An empty cluster (no token
assigned to it) keeps its seed: z_k = t_seed_k.

Seeds
- ``attention``: the K tokens with the highest CLS->patch attention, in descending order.
- ``fps``: farthest-point sampling in cosine space (distance 1 - cos), from the
  highest-attention token (or, without attention, the token most similar to the mean token);
  each next seed maximizes its minimum distance to the seeds chosen so far. Seeds are returned
  in the order chosen. One Gram matrix per batch; a loop over the K steps, batched over images.

Assignment weights w_ik of non-seed token i to seed k (seed tokens get no weight)
- ``hard``: w_ik = 1 for the most similar seed (ties: the lowest seed position), else 0.
- ``soft2`` / ``soft4``: over the m = min(2 or 4, K) most similar seeds,
  w_ik = softmax_k(cos(t_i, s_k) / temperature); 0 for the other seeds.
- ``dense``: attention-style weights over all K seeds, w_ik = softmax_k(cos(t_i, s_k) / temperature)
  (each token attends to every seed).
The weighted mean of seed k is sum_i w_ik t_i / sum_i w_ik (0 when sum_i w_ik = 0).
"""

from __future__ import annotations

from typing import Literal

import torch

from craterlab.tokens.common import (
    as_float,
    check_k_positive,
    check_k_tokens,
    l2norm,
    require_attention,
    top_k_indices,
)
from craterlab.types import Features, Tokens

SeedMethod = Literal["attention", "fps"]
AssignMethod = Literal["hard", "soft2", "soft4", "dense"]
ASSIGN_TOP_M = {"hard": 1, "soft2": 2, "soft4": 4}


def attention_seeds(attn: torch.Tensor, k: int) -> torch.Tensor:
    """(N, T) attention -> (N, K) indices of the top-K tokens, highest attention first."""
    return top_k_indices(attn, k)


def inverse_norms(tokens: torch.Tensor) -> torch.Tensor:
    """(N, T, D) -> (N, T) 1 / ||t|| (so unit tokens are ``tokens * inv[..., None]``).

    The token matrix itself is never normalized in place: scaling the (N, T, K) similarity and
    weight matrices instead saves two passes over the (N, T, D) tokens.
    """
    return torch.linalg.vector_norm(tokens, dim=-1).clamp_min(1e-12).reciprocal()


def cosine_gram(tokens: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """(N, T, T) cosine similarities of every token pair of each image (one bmm per batch)."""
    gram = torch.bmm(tokens, tokens.transpose(1, 2))
    return gram.mul_(inv.unsqueeze(2)).mul_(inv.unsqueeze(1))


def fps_start(tokens: torch.Tensor, inv: torch.Tensor, attn: torch.Tensor | None) -> torch.Tensor:
    """The deterministic first FPS seed (N,): highest attention, else nearest to the mean token.

    "Mean token" is the mean of the unit tokens; nearest is by cosine.
    """
    if attn is not None:
        return attn.argmax(dim=1)
    mean = torch.einsum("nt,ntd->nd", inv, tokens)
    return (torch.einsum("ntd,nd->nt", tokens, mean) * inv).argmax(dim=1)


def fps_seeds(gram: torch.Tensor, k: int, start: torch.Tensor) -> torch.Tensor:
    """Farthest-point sampling in cosine space: (N, T, T) cosines, (N,) first seed -> (N, K).

    Each next seed is the token whose largest cosine to the chosen seeds is smallest (its
    minimum distance 1 - cos to them is largest); ties go to the lowest token index.
    """
    n = gram.shape[0]
    rows = torch.arange(n, device=gram.device)
    seeds = torch.empty(n, k, dtype=torch.long, device=gram.device)
    current = start
    seeds[:, 0] = current
    closest = gram[rows, current].clone()  # (N, T) largest cosine to any seed so far
    closest[rows, current] = float("inf")
    for step in range(1, k):
        current = closest.argmin(dim=1)
        seeds[:, step] = current
        torch.maximum(closest, gram[rows, current], out=closest)
        closest[rows, current] = float("inf")
    return seeds


def assignment_weights(sim: torch.Tensor, assign: str, temperature: float) -> torch.Tensor:
    """(N, T, K) cosines of tokens to seeds -> (N, T, K) assignment weights (see module doc)."""
    k = sim.shape[-1]
    if assign == "dense":
        return torch.softmax(sim / temperature, dim=-1)
    if assign == "hard":
        return torch.zeros_like(sim).scatter_(-1, sim.argmax(dim=-1, keepdim=True), 1.0)
    m = min(ASSIGN_TOP_M[assign], k)
    values, index = torch.topk(sim, m, dim=-1)
    return torch.zeros_like(sim).scatter_(-1, index, torch.softmax(values / temperature, -1))


class InstanceAggregator:
    """Instance tokens: K seeds, cosine assignment of the other tokens, seed + weighted mean."""

    def __init__(
        self,
        k: int = 32,
        seeds: SeedMethod = "attention",
        assign: AssignMethod = "hard",
        temperature: float = 0.05,
    ) -> None:
        self.k = check_k_positive(k)
        if seeds not in ("attention", "fps"):
            raise ValueError(f"seeds must be 'attention' or 'fps', got {seeds!r}.")
        if assign not in ("hard", "soft2", "soft4", "dense"):
            raise ValueError(f"assign must be hard, soft2, soft4 or dense, got {assign!r}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}. Try 0.05.")
        self.seeds = seeds
        self.assign = assign
        self.temperature = float(temperature)

    def seed_indices(self, features: Features) -> torch.Tensor:
        """(N, K) seed token indices, in seed order."""
        tokens = as_float(features.tokens)
        return self._seeds(features, tokens, inverse_norms(tokens))[0]

    def _seeds(
        self, features: Features, tokens: torch.Tensor, inv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        check_k_tokens(self.k, tokens.shape[1], f"aggregator 'instance' (seeds={self.seeds})")
        if self.seeds == "attention":
            attn = require_attention(features, "Instance aggregation with seeds=attention")
            return attention_seeds(attn, self.k), None
        attn = None if features.attn is None else as_float(features.attn)
        gram = cosine_gram(tokens, inv)
        return fps_seeds(gram, self.k, fps_start(tokens, inv, attn)), gram

    def __call__(self, features: Features) -> Tokens:
        tokens = as_float(features.tokens)
        n, t, _ = tokens.shape
        inv = inverse_norms(tokens)
        seeds, gram = self._seeds(features, tokens, inv)
        rows = torch.arange(n, device=tokens.device).unsqueeze(1)
        seed_vectors = tokens[rows, seeds] * inv[rows, seeds].unsqueeze(-1)  # unit (N, K, D)
        if gram is not None:  # reuse the Gram matrix: cosines of every token to every seed
            sim = torch.gather(gram, 2, seeds.unsqueeze(1).expand(-1, t, -1))
        else:
            sim = torch.bmm(tokens, seed_vectors.transpose(1, 2)).mul_(inv.unsqueeze(-1))
        weights = assignment_weights(sim, self.assign, self.temperature)
        weights[rows, seeds] = 0.0  # seeds are not assigned to anything
        mass = weights.sum(dim=1)  # (N, K)
        # sum_i w_ik * t_i / ||t_i||: fold the token normalization into the weights.
        sums = torch.bmm((weights * inv.unsqueeze(-1)).transpose(1, 2), tokens)
        mean = sums / torch.where(mass > 0, mass, torch.ones_like(mass)).unsqueeze(-1)
        return Tokens(l2norm(seed_vectors + mean))


def no_aggregator() -> None:
    """Use the selector's tokens unchanged (aggregator=none)."""
    return None
