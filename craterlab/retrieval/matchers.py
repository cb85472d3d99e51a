"""Matchers: late interaction over token sets, cosine over single vectors.

A matcher scores queries against a token store by choosing a kernel from the store's own
description of its rows (:meth:`~craterlab.retrieval.stores.CodeStore.scoring_operand`) and the
device (:meth:`LateInteraction.plan`); the store only holds data and decodes its rows.

=========================  ==========  ======================================================
store                      device      late interaction runs
=========================  ==========  ======================================================
fp32, fp16                 CPU         :mod:`.cpu_engine`, ``kernel`` fp32 (default) or bf16
bf16                       CPU         :mod:`.cpu_engine`, ``kernel`` bf16 (default) or fp32
int8 (``direct``)          CPU         :mod:`.cpu_engine` int8 (per-token scales) or
                                       int8_image (per-image scales, max in int32)
int8 (not direct), pq,     CPU         :mod:`.gather_engine`, rows decoded to fp32 on demand
residual
any                        CUDA        :mod:`.gather_engine`, fp16, codes resident on the GPU
=========================  ==========  ======================================================
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch

from craterlab.devices import resolve_device
from craterlab.errors import ConfigError
from craterlab.retrieval import cpu_engine, gather_engine
from craterlab.retrieval.cpu_engine import KERNELS, GalleryCodes, Kernel
from craterlab.retrieval.stores import OperandStore, ScoringOperand
from craterlab.types import Tokens, TokenStore

KernelName = Literal["auto", "fp32", "bf16", "int8"]

FLOAT_ROWS = (torch.float32, torch.float16, torch.bfloat16)
"""Dtypes of plain gallery tokens the CPU engine reads in place."""


@dataclass(frozen=True)
class Plan:
    """How a (store, device) pair is scored: a CPU-engine ``kernel`` over ``codes`` with
    ``workers`` threads, or (``kernel`` None) the gather engine over ``gather``."""

    kernel: Kernel | None
    codes: GalleryCodes | None = None
    gather: gather_engine.GatherFn | None = None
    num_gallery: int = 0
    workers: int = 0


class LateInteraction:
    """Late interaction (1/Kq) sum_i max_j <q_i, g_j>, masks respected.

    ``device``: where the matmuls run ("auto" = CUDA when available; fp16 there).
    ``tile_mb``: memory bound of one exhaustive tile / rerank chunk in MiB.
    ``threads``: worker threads of the CPU engine (0: torch's intra-op thread count; for INT8
    stores, the store's ``threads``).
    ``kernel``: the CPU kernel for float stores, ``fp32`` or ``bf16``; ``int8`` insists on
    integer scoring (an INT8 store); ``auto`` is bf16 for BF16 stores, fp32 for the other
    float stores and integer matmuls for INT8 stores.
    """

    def __init__(
        self,
        device: str = "auto",
        tile_mb: int = 64,
        threads: int = 0,
        kernel: KernelName = "auto",
    ) -> None:
        if tile_mb < 1:
            raise ValueError(f"tile_mb must be >= 1 (MiB), got {tile_mb}")
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's thread count), got {threads}")
        if kernel not in ("auto", "fp32", "bf16", "int8"):
            raise ValueError(f"kernel must be auto, fp32, bf16 or int8, got {kernel!r}")
        self.device = resolve_device(device)
        self.tile_bytes = tile_mb * 2**20
        self.threads = threads
        self.kernel = kernel
        self._codes: weakref.WeakKeyDictionary[Any, GalleryCodes] = weakref.WeakKeyDictionary()

    # -- kernel choice
    def plan(self, store: TokenStore | Tokens) -> Plan:
        """The kernel and gallery operand for ``store`` (or plain tokens) on this device."""
        if self.device.type == "cpu":
            plan = self._cpu_plan(store)
            if plan is not None:
                return plan
        if self.kernel == "int8":
            raise ConfigError(
                "matcher.kernel=int8 scores INT8 codes on CPU; this gallery is "
                f"{_describe(store)} on {self.device}. Use quantizer=int8 with device=cpu, "
                "or matcher.kernel=auto."
            )
        if isinstance(store, Tokens):
            return Plan(None, gather=gather_engine.tokens_gather(store), num_gallery=len(store))
        gather = store.gather if isinstance(store, OperandStore) else _decode_gather(store)
        return Plan(None, gather=gather, num_gallery=len(store))

    def _cpu_plan(self, store: TokenStore | Tokens) -> Plan | None:
        if isinstance(store, Tokens):
            v = store.vectors
            if self.kernel == "int8" or v.device.type != "cpu" or v.dim() != 3:
                return None
            if v.dtype not in FLOAT_ROWS:
                return None
            name = "bf16" if self.kernel == "bf16" else "fp32"
            return Plan(KERNELS[name], GalleryCodes(v, None, store.mask), workers=self.threads)
        if not isinstance(store, OperandStore):
            return None
        op = store.scoring_operand()
        if op.rows is None or op.rows.device.type != "cpu":
            return None
        if op.kind == "float" and self.kernel != "int8":
            name = op.auto if self.kernel == "auto" else self.kernel
        elif op.kind in ("int8", "int8_image") and (
            self.kernel == "int8" or (self.kernel == "auto" and op.auto != "decode")
        ):
            name = op.kind
        else:
            return None
        return Plan(
            KERNELS[name], self._gallery_codes(store, op), workers=self.threads or op.threads
        )

    def _gallery_codes(self, store: Any, op: ScoringOperand) -> GalleryCodes:
        codes = self._codes.get(store)
        if codes is None or codes.rows is not op.rows:
            assert op.rows is not None
            codes = GalleryCodes(op.rows, op.scales, op.mask)
            self._codes[store] = codes
        return codes

    # -- Matcher protocol (plain tokens)
    def score(self, queries: Tokens, gallery: Tokens) -> torch.Tensor:
        return self._score(queries, self.plan(gallery))

    def rerank(self, queries: Tokens, gallery: Tokens, candidates: torch.Tensor) -> torch.Tensor:
        return self._rerank(queries, self.plan(gallery), candidates)

    # -- StoreMatcher protocol (scored from the codes)
    def score_store(self, queries: Tokens, store: TokenStore) -> torch.Tensor:
        return self._score(queries, self.plan(store))

    def rerank_store(
        self, queries: Tokens, store: TokenStore, candidates: torch.Tensor
    ) -> torch.Tensor:
        return self._rerank(queries, self.plan(store), candidates)

    def _score(self, queries: Tokens, plan: Plan) -> torch.Tensor:
        if plan.kernel is not None and plan.codes is not None:
            cache = min(self.tile_bytes, cpu_engine.CPU_CACHE_BYTES)
            return cpu_engine.score(plan.kernel, queries, plan.codes, plan.workers, cache)
        assert plan.gather is not None
        return gather_engine.score(
            queries, plan.num_gallery, plan.gather, self.device, self.tile_bytes
        )

    def _rerank(self, queries: Tokens, plan: Plan, candidates: torch.Tensor) -> torch.Tensor:
        if plan.kernel is not None and plan.codes is not None:
            block = min(self.tile_bytes // 2, plan.kernel.rerank_block_bytes)
            return cpu_engine.rerank(
                plan.kernel, queries, plan.codes, candidates, plan.workers, block
            )
        assert plan.gather is not None
        return gather_engine.rerank(
            queries, candidates, plan.gather, self.device, self.tile_bytes // 2
        )


def _decode_gather(store: TokenStore) -> gather_engine.GatherFn:
    """Gather for a third-party store: its ``decode`` of the requested rows."""

    def gather(index: torch.Tensor) -> Tokens:
        return store.decode(index.cpu())

    return gather


def _describe(store: TokenStore | Tokens) -> str:
    if isinstance(store, OperandStore):
        return f"a {getattr(store, 'format', type(store).__name__)} store"
    return "plain tokens" if isinstance(store, Tokens) else type(store).__name__


class Cosine:
    """Cosine similarity of single vectors.

    Token sets with K=1 are their single vector; for K>1 the real tokens are mean-pooled and
    L2-normalized first (the "pooled instance tokens" baseline), so any token set works.
    """

    def __init__(self, device: str = "auto") -> None:
        self.device = resolve_device(device)

    def vectors(self, tokens: Tokens) -> torch.Tensor:
        """(N, D) unit vectors: the single token, or the normalized masked mean."""
        v = tokens.vectors.to(self.device, torch.float32)
        if tokens.mask is None:
            pooled = v.mean(dim=1)
        else:
            m = tokens.mask.to(self.device).unsqueeze(-1).to(v.dtype)
            pooled = (v * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def score(self, queries: Tokens, gallery: Tokens) -> torch.Tensor:
        return (self.vectors(queries) @ self.vectors(gallery).T).cpu()

    def rerank(self, queries: Tokens, gallery: Tokens, candidates: torch.Tensor) -> torch.Tensor:
        q = self.vectors(queries)
        g = self.vectors(gallery)
        cand = candidates.to(self.device, torch.long)
        out = torch.einsum("qd,qsd->qs", q, g[cand.clamp(min=0)])
        return out.masked_fill(cand < 0, float("-inf")).cpu()

    def score_store(self, queries: Tokens, store: TokenStore) -> torch.Tensor:
        return self.score(queries, store.decode())

    def rerank_store(
        self, queries: Tokens, store: TokenStore, candidates: torch.Tensor
    ) -> torch.Tensor:
        return self.rerank(queries, store.decode(), candidates)
