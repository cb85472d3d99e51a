"""Quantizers: turn a gallery's token sets (N, K, D) into a token store (train, encode).

- ``fp32`` / ``fp16`` / ``bf16``: the tokens themselves, 4 / 2 / 2 bytes per dimension.
- ``int8``: symmetric scalar codes, one float32 scale per token (``scale=token``, the study's)
  or per image (``scale=image``: 4 bytes per image instead of 4 per token, and the matcher can
  take the max over an image's tokens on the integer similarities).
- ``pq``: FAISS product quantization, m one-byte codes per token. Training is the expensive
  step (20 to 37 s for a 50,000-image gallery), so a trained codebook is reused within a process
  and, with a ``cache_dir``, across the jobs of a sweep: it is keyed by a content hash of the
  training tokens and the settings (``pq-codebooks/<key>.npy`` under the feature cache dir).

:func:`quantize_int8` is the one INT8 quantizer: the store's codes and the queries scored
against them (:mod:`craterlab.retrieval.cpu_engine`) both come from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import torch

from craterlab.errors import DataError
from craterlab.retrieval.stores import Bf16Store, Fp16Store, Fp32Store, Int8Store, PQStore
from craterlab.types import Tokens

log = logging.getLogger("craterlab")

CODEBOOK_DIR = "pq-codebooks"
"""Folder of trained PQ codebooks under the cache dir."""

_CODEBOOKS: OrderedDict[str, np.ndarray] = OrderedDict()
_CODEBOOKS_KEPT = 4  # trained codebooks kept in memory (a sweep's jobs share a process)


def forget_codebooks() -> None:
    """Drop the PQ codebooks kept in memory (the disk copies under ``cache_dir`` stay)."""
    _CODEBOOKS.clear()


def quantize_int8(x: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector symmetric int8 over the last axis: codes = round(x / s), s = max|x| / 127
    (an all-zero vector has codes 0 and s = 0). ``x`` (..., D); returns codes (..., D) int8
    and scales (...) float32. Leading rows are processed ``chunk`` at a time, so a big batch
    needs no full-size float temporaries."""
    x = x.detach()
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    n = x.shape[0] if x.dim() > 1 else 1
    flat_x = x.reshape(n, *x.shape[1:]) if x.dim() > 1 else x.unsqueeze(0)
    flat_c = codes.view(flat_x.shape)
    flat_s = scales.view(flat_x.shape[:-1])
    for c0 in range(0, n, chunk):
        xc = flat_x[c0 : c0 + chunk].float()
        scale = xc.abs().amax(dim=-1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        flat_c[c0 : c0 + chunk] = torch.round(xc / safe.unsqueeze(-1)).clamp_(-127, 127)
        flat_s[c0 : c0 + chunk] = scale
    return codes, scales


def quantize_int8_per_image(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per token set: ``x`` (N, K, D) -> codes (N, K, D) int8,
    scales (N, 1) float32 (s = max|x| over the image's tokens / 127; 0 for an all-zero set)."""
    codes, scales = quantize_int8(x.reshape(len(x), -1))
    return codes.view(x.shape), scales.unsqueeze(-1)


def _cpu_tokens(tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float32 CPU tokens with padding zeroed, and the mask."""
    v = tokens.vectors.detach().float().cpu()
    if v.dim() != 3:
        raise DataError(f"Token sets must be (N, K, D); got shape {tuple(v.shape)}.")
    mask = None if tokens.mask is None else tokens.mask.detach().cpu().bool()
    if mask is not None:
        v = v * mask.unsqueeze(-1)
    return v.contiguous(), mask


class Fp32Quantizer:
    """No compression: float32 tokens (4 bytes per dimension)."""

    def fit(self, tokens: Tokens) -> None:
        pass

    def encode(self, tokens: Tokens) -> Fp32Store:
        v, mask = _cpu_tokens(tokens)
        return Fp32Store({"codes": v}, v.shape[1], v.shape[2], mask)


class Fp16Quantizer:
    """Half precision tokens (2 bytes per dimension)."""

    def fit(self, tokens: Tokens) -> None:
        pass

    def encode(self, tokens: Tokens) -> Fp16Store:
        v, mask = _cpu_tokens(tokens)
        return Fp16Store({"codes": v.half()}, v.shape[1], v.shape[2], mask)


class Bf16Quantizer:
    """bfloat16 tokens (2 bytes per dimension): the store the bf16 kernel reads in place."""

    def fit(self, tokens: Tokens) -> None:
        pass

    def encode(self, tokens: Tokens) -> Bf16Store:
        v, mask = _cpu_tokens(tokens)
        return Bf16Store({"codes": v.bfloat16()}, v.shape[1], v.shape[2], mask)


class Int8Quantizer:
    """Symmetric int8 (1 byte per dimension) with a float32 scale per token or per image.

    ``scale``: ``token`` (the study's: 4 bytes per token) or ``image`` (4 bytes per image).
    ``direct``: let matchers score the codes with integer matmuls on CPU (False: decode to
    float32 first). ``threads``: kept for older configs; the matcher's ``threads`` decides.
    """

    def __init__(
        self, direct: bool = True, threads: int = 2, scale: Literal["token", "image"] = "token"
    ) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if scale not in ("token", "image"):
            raise ValueError(f"scale must be 'token' or 'image', got {scale!r}")
        self.direct = direct
        self.threads = threads
        self.scale = scale

    def fit(self, tokens: Tokens) -> None:
        pass

    def encode(self, tokens: Tokens) -> Int8Store:
        v, mask = _cpu_tokens(tokens)
        if self.scale == "image":
            codes, scales = quantize_int8_per_image(v)
        else:
            codes, scales = quantize_int8(v)
        return Int8Store(
            {"codes": codes, "scales": scales},
            v.shape[1],
            v.shape[2],
            mask,
            direct=self.direct,
            threads=self.threads,
        )


class PQQuantizer:
    """Product quantization (FAISS): m sub-quantizers of 2**nbits centroids, trained on the
    gallery tokens; m bytes per token at nbits=8.

    ``max_train``: at most this many tokens (sampled with ``seed``) train the codebooks.
    ``cache_dir``: where trained codebooks are kept for reuse (``<cache_dir>/pq-codebooks``);
    the run passes the feature cache dir. None keeps them in this process only.
    """

    def __init__(
        self,
        m: int = 96,
        nbits: int = 8,
        max_train: int = 200_000,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        if m < 1:
            raise ValueError(f"m must be >= 1, got {m}")
        if nbits != 8:
            raise ValueError(f"only nbits=8 (one byte per sub-quantizer) is supported, got {nbits}")
        self.m = m
        self.nbits = nbits
        self.max_train = max_train
        self.seed = seed
        self.cache_dir = cache_dir
        self.pq: Any = None
        self.dim: int | None = None
        self.codebook_source = ""
        """How the last ``fit`` got its codebook: 'trained', 'memory' or 'disk'."""

    def fit(self, tokens: Tokens) -> None:
        v, mask = _cpu_tokens(tokens)
        d = v.shape[-1]
        if d % self.m:
            raise DataError(
                f"PQ with m={self.m} needs a token dimension divisible by m; got dim={d}. "
                f"Choose m among the divisors of {d} (e.g. quantizer.m={_divisor_near(d, self.m)})."
            )
        x = v.reshape(-1, d) if mask is None else v[mask]
        ksub = 2**self.nbits
        if x.shape[0] < ksub:
            raise DataError(
                f"PQ training needs at least {ksub} gallery tokens (2**nbits centroids per "
                f"sub-quantizer); got {x.shape[0]}. Use a larger gallery or quantizer=int8."
            )
        if x.shape[0] > self.max_train:
            g = torch.Generator().manual_seed(self.seed)
            x = x[torch.randperm(x.shape[0], generator=g)[: self.max_train]]
        train = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        key = self._key(train)
        pq = faiss.ProductQuantizer(d, self.m, self.nbits)
        centroids, self.codebook_source = self._cached(key, pq.centroids.size())
        if centroids is None:
            centroids = self._train(pq, train)
            self.codebook_source = "trained"
            self._remember(key, centroids)
        else:
            faiss.copy_array_to_vector(centroids, pq.centroids)
            log.info("PQ m=%d: codebook reused (%s, key %s)", self.m, self.codebook_source, key)
        self.pq = pq
        self.dim = d

    def _train(self, pq: Any, train: np.ndarray) -> np.ndarray:
        n, ksub = train.shape[0], 2**self.nbits
        recommended = ksub * 39  # FAISS's min_points_per_centroid default
        pq.cp.seed = self.seed
        # FAISS prints its "please provide at least N training points" warning once per
        # sub-quantizer (m lines); the threshold only gates that warning, so raise it here once.
        pq.cp.min_points_per_centroid = 1
        if n < recommended:
            log.warning(
                "PQ m=%d: training %d sub-quantizers of %d centroids on %d tokens; FAISS "
                "recommends at least %d (codebooks from few tokens compress less well).",
                self.m,
                self.m,
                ksub,
                n,
                recommended,
            )
        pq.train(train)
        return faiss.vector_to_array(pq.centroids).copy()

    def _key(self, train: np.ndarray) -> str:
        h = hashlib.sha256()
        settings = {"m": self.m, "nbits": self.nbits, "seed": self.seed, "shape": train.shape}
        h.update(json.dumps(settings, sort_keys=True).encode())
        h.update(b"\0faiss " + faiss.__version__.encode() + b"\0")
        h.update(memoryview(train).cast("B"))
        return h.hexdigest()[:24]

    def _cached(self, key: str, size: int) -> tuple[np.ndarray | None, str]:
        if key in _CODEBOOKS:
            _CODEBOOKS.move_to_end(key)
            return _CODEBOOKS[key], "memory"
        if self.cache_dir is None:
            return None, ""
        file = Path(self.cache_dir) / CODEBOOK_DIR / f"{key}.npy"
        try:
            arr = np.load(file, allow_pickle=False)
        except (OSError, ValueError):
            return None, ""  # absent or unreadable: train again (and overwrite it)
        if arr.dtype != np.float32 or arr.size != size:
            log.warning("PQ codebook %s has the wrong size; training a new one.", file)
            return None, ""
        _CODEBOOKS[key] = arr.ravel()
        return _CODEBOOKS[key], "disk"

    def _remember(self, key: str, centroids: np.ndarray) -> None:
        _CODEBOOKS[key] = centroids
        while len(_CODEBOOKS) > _CODEBOOKS_KEPT:
            _CODEBOOKS.popitem(last=False)
        if self.cache_dir is None:
            return
        folder = Path(self.cache_dir) / CODEBOOK_DIR
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{key}.{os.getpid()}.tmp.npy"
            np.save(tmp, centroids, allow_pickle=False)
            os.replace(tmp, folder / f"{key}.npy")
        except OSError as exc:  # a read-only cache: the codebook is still used, just not kept
            log.warning("PQ codebook not cached in %s (%s).", folder, exc)

    def encode(self, tokens: Tokens) -> PQStore:
        v, mask = _cpu_tokens(tokens)
        if self.pq is None:
            self.fit(tokens)
        n, k, d = v.shape
        if d != self.dim:
            raise DataError(f"PQ was trained on dim {self.dim}; these tokens have dim {d}.")
        codes = self.pq.compute_codes(np.ascontiguousarray(v.reshape(-1, d).numpy()))
        codes_t = torch.from_numpy(codes.reshape(n, k, self.m).copy())
        book = faiss.vector_to_array(self.pq.centroids).reshape(self.m, 2**self.nbits, -1)
        return PQStore({"codes": codes_t}, k, d, mask, {"codebook": torch.from_numpy(book.copy())})


def _divisor_near(d: int, m: int) -> int:
    divisors = [x for x in range(1, d + 1) if d % x == 0]
    return min(divisors, key=lambda x: abs(x - m))
