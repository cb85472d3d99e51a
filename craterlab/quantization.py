"""Quantized token stores: FP32, FP16, INT8 (per-token symmetric scalar) and product quantization.

A quantizer encodes the gallery's token sets (N, K, D) into a :class:`CodeStore`. The store's
``nbytes`` is exactly the size of its serialized per-image payload (``save`` writes one raw
``.bin`` file per array; a test checks the file sizes), and ``bytes_per_image`` is
``nbytes / N``. Per-gallery constants (the PQ codebook) are reported apart as
``overhead_bytes``. Study figures at K=32, D=384: FP32 49,152 B, FP16 24,576 B, INT8 12,416 B
(384 code bytes + a 4-byte scale per token), PQ-96 3,072 B, PQ-48 1,536 B per image.

Scores are computed from the codes: ``gather`` decodes only the gallery rows a matcher needs;
the INT8 store also scores directly on CPU (``li_rerank`` / ``li_score``: queries quantized the
same way, an int8 x int8 -> int32 matmul, the per-token gallery scale applied before the max),
which is the fast path stages use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np
import torch

from craterlab.errors import DataError
from craterlab.hookspecs import hookimpl
from craterlab.matching import (
    CPU_CACHE_BYTES,
    _finish,
    _tiles,
    gallery_bias,
    late_interaction_rerank,
    late_interaction_score,
    rerank_blocks,
    run_blocks,
    thread_buffer,
)
from craterlab.types import Tokens

# --------------------------------------------------------------------------- stores

_NP_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.int8: "int8",
    torch.uint8: "uint8",
}


class CodeStore:
    """Encoded gallery token sets: per-image arrays (``payload``) plus per-gallery constants.

    Subclasses define ``decode_rows`` (payload rows -> fp tokens). The mask of real tokens, when
    the tokens had one, is stored bit-packed (ceil(K/8) bytes per image) and counted in nbytes.
    """

    format: ClassVar[str] = ""
    formats: ClassVar[dict[str, type[CodeStore]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.format:
            CodeStore.formats[cls.format] = cls

    def __init__(
        self,
        payload: dict[str, torch.Tensor],
        k: int,
        dim: int,
        mask: torch.Tensor | None = None,
        overhead: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.payload = payload
        self.overhead = overhead or {}
        self.k = k
        self.dim = dim
        self.mask = mask
        self.n = next(iter(payload.values())).shape[0]

    # -- TokenStore protocol
    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        """Bytes of the per-image codes (and packed mask), equal to the serialized payload."""
        total = sum(t.numel() * t.element_size() for t in self.payload.values())
        if self.mask is not None:
            total += self.n * ((self.k + 7) // 8)
        return total

    @property
    def overhead_bytes(self) -> int:
        """Bytes of per-gallery constants (PQ codebook), not counted per image."""
        return sum(t.numel() * t.element_size() for t in self.overhead.values())

    def bytes_per_image(self) -> float:
        return self.nbytes / max(1, self.n)

    def bytes_per_token(self) -> float:
        return self.nbytes / max(1, self.n * self.k)

    def decode(self, index: slice | torch.Tensor | None = None) -> Tokens:
        """FP32 tokens reconstructed from the codes (all images, or the given indices)."""
        if index is None:
            index = torch.arange(self.n)
        elif isinstance(index, slice):
            index = torch.arange(self.n)[index]
        tok = self.gather(index)
        return Tokens(tok.vectors.float(), tok.mask)

    def gather(self, index: torch.Tensor) -> Tokens:
        """Tokens of the given rows, decoded in the store's compute dtype (fp16 stays fp16)."""
        index = index.to(self._device(), torch.long)
        rows = {name: t.index_select(0, index) for name, t in self.payload.items()}
        mask = None if self.mask is None else self.mask.index_select(0, index)
        return Tokens(self.decode_rows(rows), mask)

    def decode_rows(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def plain_tokens(self) -> Tokens | None:
        """The tokens themselves when the codes are plain floats (FP32/FP16), else None: a
        matcher then scores them in place, without a decoding copy."""
        return None

    def _device(self) -> torch.device:
        return next(iter(self.payload.values())).device

    def to(self, device: torch.device | str) -> CodeStore:
        """The same store with its tensors on ``device`` (a GPU keeps the codes resident)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.payload = {k: v.to(device) for k, v in self.payload.items()}
        new.overhead = {k: v.to(device) for k, v in self.overhead.items()}
        new.mask = None if self.mask is None else self.mask.to(device)
        return new

    # -- serialization
    def save(self, directory: str | os.PathLike[str]) -> int:
        """Write ``meta.json`` plus one raw ``.bin`` per array; returns the payload bytes."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, dict[str, Any]] = {}
        written = 0
        for group, tensors in (("payload", self.payload), ("overhead", self.overhead)):
            for name, t in tensors.items():
                arr = t.detach().cpu().contiguous().numpy()
                arr.tofile(path / f"{name}.bin")
                arrays[name] = {"group": group, "dtype": str(arr.dtype), "shape": list(arr.shape)}
                written += arr.nbytes if group == "payload" else 0
        if self.mask is not None:
            packed = np.packbits(self.mask.cpu().numpy().astype(bool), axis=1)
            packed.tofile(path / "mask.bin")
            arrays["mask"] = {"group": "mask", "dtype": "uint8", "shape": list(packed.shape)}
            written += packed.nbytes
        meta = {"format": self.format, "n": self.n, "k": self.k, "dim": self.dim, "arrays": arrays}
        meta.update(self._meta())
        (path / "meta.json").write_text(json.dumps(meta, indent=1))
        return written

    def _meta(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def load(directory: str | os.PathLike[str]) -> CodeStore:
        """A store saved by :meth:`save` (any format)."""
        path = Path(directory)
        meta_file = path / "meta.json"
        if not meta_file.exists():
            raise DataError(
                f"No token store at {path} (missing meta.json). Point to a directory written "
                "by CodeStore.save / GalleryIndex.save."
            )
        meta = json.loads(meta_file.read_text())
        cls = CodeStore.formats.get(meta["format"])
        if cls is None:
            raise DataError(
                f"Token store {path} has unknown format {meta['format']!r}; known formats: "
                f"{', '.join(CodeStore.formats)}. Is it from a newer craterlab?"
            )
        payload: dict[str, torch.Tensor] = {}
        overhead: dict[str, torch.Tensor] = {}
        mask = None
        for name, info in meta["arrays"].items():
            arr = np.fromfile(path / f"{name}.bin", dtype=info["dtype"]).reshape(info["shape"])
            if info["group"] == "mask":
                bits = np.unpackbits(arr, axis=1, count=meta["k"]).astype(bool)
                mask = torch.from_numpy(bits)
            else:
                (payload if info["group"] == "payload" else overhead)[name] = torch.from_numpy(arr)
        store = object.__new__(cls)
        CodeStore.__init__(store, payload, meta["k"], meta["dim"], mask, overhead)
        store._load_meta(meta)
        return store

    def _load_meta(self, meta: dict[str, Any]) -> None:
        pass


class Fp32Store(CodeStore):
    """Tokens as float32: 4 bytes per dimension."""

    format = "fp32"

    def decode_rows(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        return rows["codes"]

    def plain_tokens(self) -> Tokens | None:
        return Tokens(self.payload["codes"], self.mask)


class Fp16Store(Fp32Store):
    """Tokens as float16: 2 bytes per dimension (decoded to fp16; the matcher upcasts on CPU)."""

    format = "fp16"


class Int8Store(CodeStore):
    """Per-token symmetric int8: codes (N, K, D) int8 and one fp32 scale per token.

    ``direct``: score on CPU with integer matmuls (queries quantized the same way) instead of
    decoding; ``threads``: worker threads of the integer rerank and exhaustive scoring (each
    runs torch single-threaded; 1 = the calling thread with torch's own threading).
    """

    format = "int8"

    def __init__(self, *args: Any, direct: bool = True, threads: int = 2, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.direct = direct
        self.threads = threads
        self._setup()

    def _setup(self) -> None:
        codes = self.payload["codes"]
        self._flat = codes.reshape(self.n, self.k * self.dim)
        self._bias = gallery_bias(self.mask)

    def _meta(self) -> dict[str, Any]:
        return {"direct": self.direct, "threads": self.threads}

    def _load_meta(self, meta: dict[str, Any]) -> None:
        self.direct = bool(meta.get("direct", True))
        self.threads = int(meta.get("threads", 2))
        self._setup()

    def to(self, device: torch.device | str) -> CodeStore:
        new = super().to(device)
        assert isinstance(new, Int8Store)
        new._setup()
        return new

    def decode_rows(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        return rows["codes"].float() * rows["scales"].unsqueeze(-1)

    def _use_direct(self, device: torch.device | str | None) -> bool:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        # torch's int8 matmul is slower than fp16 on GPUs measured here: decode there instead.
        return self.direct and dev.type == "cpu" and self._device().type == "cpu"

    def li_rerank(
        self,
        queries: Tokens,
        candidates: torch.Tensor,
        device: torch.device | str | None = None,
        block_bytes: int = 3 * 2**20,
    ) -> torch.Tensor:
        """(Nq, S) late-interaction scores from the int8 codes (integer matmuls).

        Queries are quantized per token like the gallery. Per block (a few queries, or a slice
        of one query's candidates, so the gathered codes stay within ``block_bytes``): one
        ``index_select`` of the candidates' codes into a reused buffer, one int8 x int8 -> int32
        matmul per query (gallery tokens as rows), the gallery-token scale applied while
        converting to fp32, max over the gallery tokens; the query-token scale is applied after
        the max (it is constant along it), for all queries at once. Blocks run on ``threads``
        single-threaded workers (:func:`craterlab.matching.run_blocks`).
        """
        if not self._use_direct(device):
            return late_interaction_rerank(queries, candidates, gather=self.gather, device=device)
        nq, s = candidates.shape
        out = torch.full((nq, s), float("-inf"))
        if nq == 0 or s == 0:
            return out
        qct, qs = _quantize_queries(queries.vectors)  # (Nq, D, Kq) int8, (Nq, Kq)
        kq = qct.shape[2]
        k, d = self.k, self.dim
        cand = candidates.to(torch.long)
        idx_all = cand.clamp(min=0)
        scales, bias = self.payload["scales"], self._bias
        # Blocks keep the gathered codes and the similarity block cache-sized.
        nblocks, bounds = rerank_blocks(nq, s, k * d, block_bytes)
        mx = torch.empty(nq, s, kq)  # per-query-token maxima, finished for all queries at once

        def block(b: int) -> None:
            q0, q1, c0, c1 = bounds(b)
            m, c = q1 - q0, c1 - c0
            idx = idx_all[q0:q1, c0:c1].reshape(-1)
            g = thread_buffer("i8_g", (m * c, k * d), torch.int8)
            torch.index_select(self._flat, 0, idx, out=g)
            sim = thread_buffer("i8_sim", (m, c * k, kq), torch.int32)
            for i in range(m):
                torch._int_mm(g[i * c : (i + 1) * c].view(c * k, d), qct[q0 + i], out=sim[i])
            f = thread_buffer("i8_f", (m, c, k, kq), torch.float32)
            torch.mul(sim.view(m, c, k, kq), scales.index_select(0, idx).view(m, c, k, 1), out=f)
            if bias is not None:
                f.add_(bias.index_select(0, idx).view(m, c, k, 1))
            torch.amax(f, dim=2, out=mx[q0:q1, c0:c1])

        run_blocks(block, nblocks, self.threads)
        qmask = None if queries.mask is None else queries.mask.cpu().unsqueeze(1)
        out = _finish(mx.mul_(qs.unsqueeze(1)), qmask)
        return out.masked_fill_(cand < 0, float("-inf"))

    def li_score(
        self,
        queries: Tokens,
        device: torch.device | str | None = None,
        tile_bytes: int = 64 * 2**20,
    ) -> torch.Tensor:
        """(Nq, Ng) exhaustive late-interaction scores from the int8 codes, tiled gallery-major.

        Gallery tiles (contiguous code rows, no copy) are the rows of an integer matmul against
        a chunk of query tokens; each similarity block stays within the L2 cache (or
        ``tile_bytes`` if smaller). Tiles are split between ``threads`` workers.
        """
        if not self._use_direct(device):
            return late_interaction_score(
                queries,
                num_gallery=self.n,
                gather=self.gather,
                device=device,
                tile_bytes=tile_bytes,
            )
        qc, qs = self._queries(queries)
        nq, kq, d = qc.shape
        k, ng = self.k, self.n
        out = torch.empty(nq, ng)
        if nq == 0 or ng == 0:
            return out
        qmask = queries.mask
        q_chunk, g_tile = _tiles(nq, kq, k, min(tile_bytes, CPU_CACHE_BYTES))
        qt = qc.reshape(nq * kq, d).T  # (D, Nq*Kq)
        codes, scales, bias = self.payload["codes"], self.payload["scales"], self._bias

        def tile(t: int) -> None:
            g0, g1 = t * g_tile, min(ng, (t + 1) * g_tile)
            gt = g1 - g0
            gv = codes[g0:g1].view(gt * k, d)
            for q0 in range(0, nq, q_chunk):
                q1 = min(nq, q0 + q_chunk)
                cols = (q1 - q0) * kq
                sim = thread_buffer("i8s_sim", (gt * k, cols), torch.int32)
                torch._int_mm(gv, qt[:, q0 * kq : q1 * kq], out=sim)
                f = thread_buffer("i8s_f", (gt, k, cols), torch.float32)
                torch.mul(sim.view(gt, k, cols), scales[g0:g1].unsqueeze(-1), out=f)
                if bias is not None:
                    f.add_(bias[g0:g1].unsqueeze(-1))
                mx = f.amax(dim=1).view(gt, q1 - q0, kq).mul_(qs[q0:q1])
                out[q0:q1, g0:g1] = _finish(mx, None if qmask is None else qmask[q0:q1]).T

        run_blocks(tile, (ng + g_tile - 1) // g_tile, self.threads)
        return out

    def _queries(self, queries: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Query tokens quantized per token: codes (Nq, Kq, D) int8, scales (Nq, Kq) > 0.

        An all-zero query token has codes 0, so any positive scale is exact for it; a positive
        one keeps ``-inf`` (empty gallery item) from turning into NaN."""
        qc, qs = quantize_int8(queries.vectors.detach().float().cpu())
        return qc, qs.clamp(min=torch.finfo(torch.float32).tiny)


def _quantize_queries(x: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_int8` of query token sets (Nq, Kq, D), codes laid out (Nq, D, Kq) for
    the matmul, in chunks through a reused buffer (whole-batch temporaries cost page faults).

    Scales are clamped > 0: an all-zero token has codes 0, so any positive scale is exact for
    it, and a positive one keeps ``-inf`` (an empty gallery item) from becoming NaN."""
    x = x.detach().cpu()
    nq, kq, d = x.shape
    codes = torch.empty(nq, d, kq, dtype=torch.int8)
    scale = torch.empty(nq, kq)
    for c0 in range(0, nq, chunk):
        c1 = min(nq, c0 + chunk)
        xc = x[c0:c1].float()
        amax = xc.abs().amax(dim=-1) / 127.0  # (m, Kq)
        scale[c0:c1] = amax.clamp(min=torch.finfo(torch.float32).tiny)
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        tmp = thread_buffer("q_tmp", (c1 - c0, d, kq), torch.float32)
        torch.div(xc.transpose(1, 2), safe.unsqueeze(1), out=tmp)
        codes[c0:c1] = tmp.round_()  # |value| <= 127 by construction: no clamp needed
    return codes, scale


class PQStore(CodeStore):
    """Product-quantized tokens: m one-byte codes per token, decoded with the codebook."""

    format = "pq"

    def decode_rows(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        codes = rows["codes"].long()  # (n, K, m)
        book = self.overhead["codebook"]  # (m, 256, dsub)
        m, ksub, dsub = book.shape
        offsets = torch.arange(m, device=codes.device) * ksub
        flat = book.reshape(m * ksub, dsub)
        dec = flat.index_select(0, (codes + offsets).reshape(-1))
        return dec.view(*codes.shape[:-1], m * dsub)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector symmetric int8: codes = round(x / s), s = max|x| / 127 (0 vectors: s = 0)."""
    amax = x.abs().amax(dim=-1)
    scale = amax / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(x / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return codes, scale.float()


# --------------------------------------------------------------------------- quantizers


def _cpu_tokens(tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor | None]:
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


class Int8Quantizer:
    """Per-token symmetric int8 (1 byte per dimension + one fp32 scale per token).

    ``direct``: score the codes with integer matmuls on CPU (else decode to fp32 first).
    ``threads``: worker threads of the direct per-query rerank.
    """

    def __init__(self, direct: bool = True, threads: int = 2) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.direct = direct
        self.threads = threads

    def fit(self, tokens: Tokens) -> None:
        pass

    def encode(self, tokens: Tokens) -> Int8Store:
        v, mask = _cpu_tokens(tokens)
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
    """

    def __init__(self, m: int = 96, nbits: int = 8, max_train: int = 200_000, seed: int = 0):
        if m < 1:
            raise ValueError(f"m must be >= 1, got {m}")
        if nbits != 8:
            raise ValueError(f"only nbits=8 (one byte per sub-quantizer) is supported, got {nbits}")
        self.m = m
        self.nbits = nbits
        self.max_train = max_train
        self.seed = seed
        self.pq: Any = None
        self.dim: int | None = None

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
        pq = faiss.ProductQuantizer(d, self.m, self.nbits)
        pq.cp.seed = self.seed
        pq.train(np.ascontiguousarray(x.numpy(), dtype=np.float32))
        self.pq = pq
        self.dim = d

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


@hookimpl
def register_quantizers(register: Any) -> None:
    register("fp32", Fp32Quantizer, "FP32 tokens (no compression; 4 B per dimension)")
    register("fp16", Fp16Quantizer, "FP16 tokens (2 B per dimension)")
    register("int8", Int8Quantizer, "INT8 per-token symmetric scalar (1 B/dim + 4 B scale/token)")
    register("pq", PQQuantizer, "Product quantization via FAISS (m bytes per token)")
