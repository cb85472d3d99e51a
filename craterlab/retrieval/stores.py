"""Token stores: a gallery's encoded token sets, as data (decode, save, load, bytes).

A store never scores anything, but it owns its rows and says how they can be scored: ``take``
and ``concat`` make a store of other rows (an index's ``remove`` / ``add``), and
``scoring_operand()`` describes what a late-interaction engine may multiply in place (float
tokens, int8 codes with their scales) or that its rows must be decoded through ``gather``; the
matcher (:mod:`craterlab.retrieval.matchers`) asks it instead of reading payloads. Where a
store's bytes come from:

- ``payload``: per-image arrays (row i belongs to gallery image i). ``nbytes`` is exactly their
  serialized size, plus the bit-packed mask of real tokens (ceil(K/8) bytes per image) when the
  tokens have one; ``bytes_per_image`` is ``nbytes / N``. A test checks it against the files.
- ``overhead``: per-gallery constants (the PQ codebook), reported apart as ``overhead_bytes``.

Study figures at K=32, D=384: FP32 49,152 B, FP16 24,576 B, INT8 12,416 B (384 code bytes +
a 4-byte scale per token), PQ-96 3,072 B, PQ-48 1,536 B per image. BF16 stores 24,576 B and
INT8 with one scale per image (``scale=image``) 12,292 B.

``save(dir)`` writes ``meta.json`` plus one raw ``.bin`` file per array; ``CodeStore.load``
reads any format back.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from craterlab.errors import DataError
from craterlab.safepaths import safe_name
from craterlab.types import Tokens

OperandKind = Literal["float", "int8", "int8_image", "decode"]


@dataclass(frozen=True)
class ScoringOperand:
    """How a store's rows can be scored by late interaction.

    ``kind``: ``float`` (``rows`` are float tokens, any float kernel reads them), ``int8`` /
    ``int8_image`` (``rows`` are int8 codes with ``scales`` per token / per image), or
    ``decode`` (no operand in place: rows go through the store's ``gather``).
    ``auto``: the kernel a matcher with ``kernel=auto`` uses (``fp32``, ``bf16``, ``int8``,
    ``int8_image``, or ``decode``). ``threads``: the store's own worker-thread setting (0: none).
    """

    kind: OperandKind
    rows: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    auto: str = "decode"
    threads: int = 0


@runtime_checkable
class OperandStore(Protocol):
    """A token store that describes its scoring operand and gathers (decodes) its own rows;
    a matcher asks it how to score instead of checking its class."""

    def scoring_operand(self) -> ScoringOperand: ...

    def gather(self, index: torch.Tensor) -> Tokens: ...


class CodeStore:
    """Encoded gallery token sets: per-image arrays (``payload``) plus per-gallery constants.

    Subclasses define ``decode_rows`` (payload rows -> float tokens). ``mask`` (N, K) marks the
    real tokens, or is None when every token is real.
    """

    format: ClassVar[str] = ""
    formats: ClassVar[dict[str, type[CodeStore]]] = {}
    required: ClassVar[dict[str, tuple[str, ...]]] = {"payload": ("codes",)}
    """Arrays (by group) that ``decode_rows`` reads; a saved store without one is damaged."""

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
        """Tokens of the given rows, decoded in the store's own float dtype (fp16 stays fp16),
        on the store's device."""
        index = index.to(self.device, torch.long)
        rows = {name: t.index_select(0, index) for name, t in self.payload.items()}
        mask = None if self.mask is None else self.mask.index_select(0, index)
        return Tokens(self.decode_rows(rows), mask)

    def decode_rows(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def scoring_operand(self) -> ScoringOperand:
        """What a late-interaction engine may read in place (default: decode through gather)."""
        return ScoringOperand("decode", mask=self.mask)

    # -- rows: a store makes stores of other rows itself
    def take(self, rows: torch.Tensor) -> CodeStore:
        """A store holding only ``rows`` (1-D indices) of this one, in that order; per-gallery
        constants (a codebook) are shared."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        payload = {k: v.index_select(0, rows.to(v.device)) for k, v in self.payload.items()}
        mask = None if self.mask is None else self.mask.index_select(0, rows.to(self.mask.device))
        return self._with_rows(payload, mask)

    def concat(self, other: CodeStore) -> CodeStore:
        """A store holding this store's rows followed by ``other``'s. ``other`` must have the
        same format, K, D, settings and per-gallery constants (encoded by the same trained
        quantizer), else a :class:`DataError`: rows coded against another codebook would
        decode to other vectors."""
        problem = self._incompatible(other)
        if problem:
            raise DataError(
                f"Cannot append a {getattr(other, 'format', type(other).__name__)} store "
                f"(K={getattr(other, 'k', '?')}, D={getattr(other, 'dim', '?')}) to a "
                f"{self.format} store (K={self.k}, D={self.dim}): {problem}. Encode the new "
                "items with the index's own (trained) quantizer."
            )
        payload = {
            k: torch.cat([v, other.payload[k].to(v.device)]) for k, v in self.payload.items()
        }
        mask = None
        if self.mask is not None or other.mask is not None:
            mask = torch.cat([self._full_mask(), other._full_mask().to(self.device)])
        return self._with_rows(payload, mask)

    def _incompatible(self, other: Any) -> str:
        if type(other) is not type(self):
            return "the formats differ"
        if (self.k, self.dim) != (other.k, other.dim):
            return "K or D differ"
        if self.settings() != other.settings():
            return f"the settings differ ({self.settings()} vs {other.settings()})"
        if set(self.overhead) != set(other.overhead) or not all(
            torch.equal(v.cpu(), other.overhead[k].cpu()) for k, v in self.overhead.items()
        ):
            return "they were encoded with different codebooks"
        return ""

    def _full_mask(self) -> torch.Tensor:
        if self.mask is not None:
            return self.mask
        return torch.ones(self.n, self.k, dtype=torch.bool, device=self.device)

    def _with_rows(self, payload: dict[str, torch.Tensor], mask: torch.Tensor | None) -> CodeStore:
        new = copy.copy(self)  # same format, settings and per-gallery constants
        new.payload = payload
        new.mask = mask
        new.n = next(iter(payload.values())).shape[0]
        return new

    @property
    def device(self) -> torch.device:
        return next(iter(self.payload.values())).device

    def to(self, device: torch.device | str) -> CodeStore:
        """The same store with its tensors on ``device`` (a GPU keeps the codes resident)."""
        new = self._with_rows(
            {k: v.to(device) for k, v in self.payload.items()},
            None if self.mask is None else self.mask.to(device),
        )
        new.overhead = {k: v.to(device) for k, v in self.overhead.items()}
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
                t = t.detach().cpu().contiguous()
                bf16 = t.dtype == torch.bfloat16  # numpy has no bfloat16: write its 16 bits
                arr = (t.view(torch.int16) if bf16 else t).numpy()
                arr.tofile(path / f"{name}.bin")
                dtype = "bfloat16" if bf16 else str(arr.dtype)
                arrays[name] = {"group": group, "dtype": dtype, "shape": list(arr.shape)}
                written += arr.nbytes if group == "payload" else 0
        if self.mask is not None:
            packed = np.packbits(self.mask.cpu().numpy().astype(bool), axis=1)
            packed.tofile(path / "mask.bin")
            arrays["mask"] = {"group": "mask", "dtype": "uint8", "shape": list(packed.shape)}
            written += packed.nbytes
        meta = {"format": self.format, "n": self.n, "k": self.k, "dim": self.dim, "arrays": arrays}
        meta.update(self.settings())
        (path / "meta.json").write_text(json.dumps(meta, indent=1))
        return written

    def settings(self) -> dict[str, Any]:
        """Format options saved in ``meta.json`` beside the arrays (none by default)."""
        return {}

    def restore_settings(self, meta: dict[str, Any]) -> None:
        """Read back what :meth:`settings` saved."""

    @staticmethod
    def load(directory: str | os.PathLike[str], *, mmap: bool = False) -> CodeStore:
        """A store saved by :meth:`save` (any format); a missing or short array file is a
        :class:`DataError` naming it.

        ``mmap=True`` maps the arrays from disk (copy-on-write) instead of reading them into
        memory, so a store larger than RAM (a million INT8 or PQ token sets) is paged in only
        where queries touch it.
        """
        path = Path(directory)
        meta = read_meta_file(
            path,
            "token store",
            missing="Point to a directory written by CodeStore.save / EncodedGallery.save.",
            damaged="Re-save the index.",
        )
        cls = CodeStore.formats.get(meta.get("format"))
        if cls is None:
            raise DataError(
                f"Token store {path} has unknown format {meta.get('format')!r}; known formats: "
                f"{', '.join(CodeStore.formats)}. Is it from a newer craterlab?"
            )
        _check_store_meta(path, meta, cls)
        payload: dict[str, torch.Tensor] = {}
        overhead: dict[str, torch.Tensor] = {}
        mask = None
        for name, info in meta["arrays"].items():
            bf16 = info["dtype"] == "bfloat16"
            dtype = "int16" if bf16 else info["dtype"]
            arr = _read_array(path / f"{name}.bin", dtype, info["shape"], mmap=mmap)
            if info["group"] == "mask":
                bits = np.unpackbits(arr, axis=1, count=meta["k"]).astype(bool)
                mask = torch.from_numpy(bits)
            else:
                t = torch.from_numpy(arr)
                t = t.view(torch.bfloat16) if bf16 else t
                (payload if info["group"] == "payload" else overhead)[name] = t
        store = object.__new__(cls)
        CodeStore.__init__(store, payload, meta["k"], meta["dim"], mask, overhead)
        store.restore_settings(meta)
        return store


STORE_DTYPES = ("float32", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64")


def _check_store_meta(path: Path, meta: dict[str, Any], cls: type[CodeStore]) -> None:
    """Every array name is a plain file name, every shape a list of counts, every dtype known,
    and the arrays the format decodes from are there; else the store is named as damaged."""
    file = path / "meta.json"
    problems: list[str] = []
    for key in ("n", "k", "dim"):
        v = meta.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (key != "n" and v == 0):
            problems.append(f"{key}={v!r} (a count)")
    arrays = meta.get("arrays")
    if not isinstance(arrays, dict):
        problems.append(f"arrays={arrays!r} (a mapping of name to group, dtype, shape)")
        arrays = {}
    for name, info in arrays.items():
        safe_name(name, f"Token store metadata {file}")
        ok = (
            isinstance(info, dict)
            and info.get("group") in ("payload", "overhead", "mask")
            and info.get("dtype") in STORE_DTYPES
            and isinstance(info.get("shape"), list)
            and all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"]
            )
        )
        if not ok:
            problems.append(f"array {name!r}: {info!r} (group, a known dtype, a shape of counts)")
    for group, names in cls.required.items():
        for name in names:
            if not (
                name in arrays
                and isinstance(arrays[name], dict)
                and arrays[name].get("group") == group
            ):
                problems.append(
                    f"the {group} array {name!r} that a {cls.format} store needs is missing"
                )
    if problems:
        raise DataError(
            f"Token store {path} has damaged metadata ({file}): {'; '.join(problems)}. The file "
            "was damaged or edited by hand. Re-save the index from its source."
        )


def read_meta_file(path: Path, what: str, *, missing: str, damaged: str) -> dict[str, Any]:
    """``path/meta.json`` as a dict; a missing, unparsable or non-object file is a
    :class:`DataError` naming ``what``, the file and the fix (``missing`` / ``damaged``)."""
    file = path / "meta.json"
    if not file.is_file():
        raise DataError(f"No {what} at {path} (missing meta.json). {missing}")
    try:
        meta = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        meta, problem = None, f"is not valid JSON ({exc})"
    else:
        problem = "is not a JSON object"
    if not isinstance(meta, dict):
        raise DataError(
            f"{what.capitalize()} metadata {file} {problem}: the file is damaged. {damaged}"
        )
    return meta


def _read_array(file: Path, dtype: str, shape: list[int], mmap: bool = False) -> np.ndarray:
    if not file.is_file():
        raise DataError(f"Token store file {file} is missing. Re-save the index.")
    want = int(np.prod(shape)) * np.dtype(dtype).itemsize
    got = file.stat().st_size
    if got != want:
        raise DataError(
            f"Token store file {file} has {got} bytes, its metadata says {want} "
            f"({dtype} {tuple(shape)}): it is truncated or from another store. Re-save the index."
        )
    if mmap and want > 0:  # mode "c": writable view for torch, nothing written back to disk
        return np.memmap(file, dtype=dtype, mode="c", shape=tuple(shape))
    return np.fromfile(file, dtype=dtype).reshape(shape)


class Fp32Store(CodeStore):
    """Tokens as float32: 4 bytes per dimension (``payload['codes']`` (N, K, D))."""

    format = "fp32"
    kernel: ClassVar[str] = "fp32"
    """The CPU kernel that scores these rows under ``kernel=auto``."""

    def decode_rows(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        return rows["codes"]

    def scoring_operand(self) -> ScoringOperand:
        return ScoringOperand("float", self.payload["codes"], None, self.mask, self.kernel)


class Fp16Store(Fp32Store):
    """Tokens as float16: 2 bytes per dimension (decoded to fp16; matchers upcast)."""

    format = "fp16"


class Bf16Store(Fp32Store):
    """Tokens as bfloat16: 2 bytes per dimension, float32's range with 8 significant bits;
    the operand of the bf16 kernel (AMX matrix units) with no conversion per block."""

    format = "bf16"
    kernel = "bf16"


class Int8Store(CodeStore):
    """Symmetric int8 codes (N, K, D) with float32 scales: one per token (N, K), or one per
    image (N, 1) when quantized with ``scale='image'``.

    ``direct`` records how the quantizer was configured to be scored: True lets a matcher
    score the codes with integer matmuls on CPU, False asks it to decode them to float32
    first. (``threads`` is kept for configs written before matchers had their own ``threads``.)
    """

    format = "int8"
    required: ClassVar[dict[str, tuple[str, ...]]] = {"payload": ("codes", "scales")}

    def __init__(self, *args: Any, direct: bool = True, threads: int = 2, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.direct = direct
        self.threads = threads

    @property
    def per_image_scale(self) -> bool:
        """Whether one scale covers every token of an image (``scale='image'``)."""
        return self.payload["scales"].shape[1] == 1

    def settings(self) -> dict[str, Any]:
        return {"direct": self.direct, "threads": self.threads}

    def restore_settings(self, meta: dict[str, Any]) -> None:
        self.direct = bool(meta.get("direct", True))
        self.threads = int(meta.get("threads", 2))

    def decode_rows(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        return rows["codes"].float() * rows["scales"].unsqueeze(-1)

    def scoring_operand(self) -> ScoringOperand:
        kind = "int8_image" if self.per_image_scale else "int8"
        auto = kind if self.direct else "decode"
        scales = self.payload["scales"]
        return ScoringOperand(kind, self.payload["codes"], scales, self.mask, auto, self.threads)


class PQStore(CodeStore):
    """Product-quantized tokens: m one-byte codes per token (N, K, m), decoded with the
    codebook (m, 256, D/m) kept in ``overhead``."""

    format = "pq"
    required: ClassVar[dict[str, tuple[str, ...]]] = {
        "payload": ("codes",),
        "overhead": ("codebook",),
    }

    def decode_rows(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        codes = rows["codes"].long()  # (n, K, m)
        book = self.overhead["codebook"]  # (m, 256, dsub)
        m, ksub, dsub = book.shape
        offsets = torch.arange(m, device=codes.device) * ksub
        flat = book.reshape(m * ksub, dsub)
        dec = flat.index_select(0, (codes + offsets).reshape(-1))
        return dec.view(*codes.shape[:-1], m * dsub)
