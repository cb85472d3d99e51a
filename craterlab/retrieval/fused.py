"""The fused CPU rerank kernel: gather, matmul, scale, max and mean in one pass per candidate.

The blocked engine (:func:`craterlab.retrieval.cpu_engine.rerank`) runs a rerank as separate
torch ops per block (gather, matmul, bias, max, scale, mean), each a pass over memory and a
dispatch. The C kernel in ``fused_maxsim.c`` does all of it per candidate in registers: the
query's tokens are quantized and packed once by C (:func:`pack_queries`) so they stay in L1, each
candidate's rows are read once where they lie in the store (no gather copy), its 8 x 32 blocks
of dot products run on AVX-512 VNNI (int8 codes) or AVX-512 BF16, and only one float per
(query, candidate) is written.

It is compiled on first use with the system C compiler (``cc``; ``$CC`` overrides) into a
per-user cache (``$CRATERLAB_KERNEL_CACHE``, default ``~/.cache/craterlab/kernels``), keyed by
the source's hash, and called through ctypes (which releases the GIL, so the engine's worker
threads run it in parallel). Where it cannot run, :func:`available` is False and the engine
uses its blocked torch path, with one log line saying why: no C compiler, a CPU without
AVX-512 VNNI (int8) or AVX-512 BF16 (bf16), or ``CRATERLAB_FUSED=0``. Tests compare both with
the reference :mod:`craterlab.retrieval.late_interaction` on random and adversarial inputs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from craterlab.devices import cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused_maxsim.c")
SOURCE_BYTES = SOURCE.read_bytes()
"""The kernel source as imported: what :func:`library` compiles (see :func:`build`)."""
FLAGS = ("-O3", "-fPIC", "-shared", "-fno-strict-aliasing", "-mavx512f", "-mavx512bw",
         "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512bf16")  # fmt: skip
NEEDS = {
    "int8": frozenset({"avx512f", "avx512bw", "avx512_vnni"}),
    "bf16": frozenset({"avx512f", "avx512bw", "avx512_bf16"}),
}
"""CPU flags each kernel family needs (``/proc/cpuinfo`` names)."""
FAMILY = {"int8": "int8", "int8_image": "int8", "bf16": "bf16"}
"""Engine kernel name -> fused family (the fp32 kernel has no fused version)."""


class Args(ctypes.Structure):
    _fields_ = [
        ("g", ctypes.c_void_p),
        ("gscale", ctypes.c_void_p),
        ("scale_stride", ctypes.c_int64),
        ("gmask", ctypes.c_void_p),
        ("K", ctypes.c_int64),
        ("D", ctypes.c_int64),
        ("qpack", ctypes.c_void_p),
        ("qcorr", ctypes.c_void_p),
        ("qweight", ctypes.c_void_p),
        ("nreal", ctypes.c_void_p),
        ("KQP", ctypes.c_int64),
        ("cand", ctypes.c_void_p),
        ("S", ctypes.c_int64),
        ("out", ctypes.c_void_p),
    ]


def cache_dir() -> Path:
    if env := os.environ.get("CRATERLAB_KERNEL_CACHE"):
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "craterlab" / "kernels"


def build(
    directory: Path | None = None,
    source_file: Path = SOURCE,
    flags: tuple[str, ...] = FLAGS,
    source: bytes | None = None,
) -> Path:
    """Compile C source (``source``, else ``source_file``'s bytes, default
    ``fused_maxsim.c``; once per source version and flags) and return the shared library.

    Callers pass the source they read at import, so the library always matches the Python
    bindings loaded with it, even if the file on disk changed since (a package upgraded
    under a running process). The bytes compiled are written beside the library first."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc, gcc or $CC) on PATH")
    if source is None:
        source = source_file.read_bytes()
    digest = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
    out_dir = directory or cache_dir()
    lib = out_dir / f"{source_file.stem}-{digest}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(f"{lib.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    code = tmp.with_suffix(".c")
    code.write_bytes(source)
    try:
        done = subprocess.run(
            [compiler, *flags, str(code), "-o", str(tmp), "-lm"],
            capture_output=True,
            text=True,
        )
    finally:
        code.unlink(missing_ok=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-600:]}")
    os.replace(tmp, lib)  # atomic: a racing build writes the same bytes
    return lib


def _why_not(family: str) -> str | None:
    if os.environ.get("CRATERLAB_FUSED", "1") == "0":
        return "CRATERLAB_FUSED=0"
    missing = NEEDS[family] - cpu_flags()
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))}"
    return None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (logged once) when it cannot be built."""
    try:
        lib = ctypes.CDLL(str(build(source=SOURCE_BYTES)))
    except (OSError, RuntimeError) as exc:
        log.warning("fused rerank kernel unavailable (%s); using the blocked torch path", exc)
        return None
    for name in ("craterlab_rerank_i8", "craterlab_rerank_bf16"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.POINTER(Args), ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_int64]  # fmt: skip
        fn.restype = None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.craterlab_pack_queries.argtypes = [ptr, ptr, i64, i64, i64, i64, ctypes.c_int,
                                           ptr, ptr, ptr]  # fmt: skip
    lib.craterlab_pack_queries.restype = None
    return lib


@functools.cache
def available(kernel: str) -> bool:
    """Whether the fused kernel runs the engine kernel ``kernel`` here (logs why not once)."""
    family = FAMILY.get(kernel)
    if family is None:
        return False
    if (reason := _why_not(family)) is not None:
        log.info("fused %s rerank off (%s); using the blocked torch path", family, reason)
        return False
    return library() is not None


# --------------------------------------------------------------------------- query operands


def pack_queries(queries: torch.Tensor, mask: torch.Tensor | None, family: str):  # type: ignore[no-untyped-def]
    """Float query tokens (Nq, Kq, D) -> (qpack, qweight (Nq, KQP), nreal (Nq,), KQP): the
    kernel's query operand, made by one C call (``craterlab_pack_queries``): int8 codes
    quantized per token exactly as :func:`~craterlab.retrieval.quantizers.quantize_int8`
    does, stored + 128 as (Nq, D/4, KQP, 4) bytes (VNNI multiplies unsigned by signed bytes;
    the kernel subtracts 128 x the gallery row sums), or bf16 as (Nq, D/2, KQP, 2). KQP is Kq
    rounded up to 16; each token's weight in the mean is its scale / real token count (0 for
    padding and masked tokens)."""
    lib = library()
    assert lib is not None
    q = queries.detach().cpu().to(torch.float32).contiguous()
    nq, kq, d = q.shape
    kqp = -(-kq // 16) * 16
    bf16 = family == "bf16"
    qpack = torch.empty(nq, d * kqp * (2 if bf16 else 1), dtype=torch.uint8)
    qweight = torch.empty(nq, kqp, dtype=torch.float32)
    nreal = torch.empty(nq, dtype=torch.int64)
    m = None if mask is None else mask.detach().cpu().to(torch.bool).contiguous()
    lib.craterlab_pack_queries(
        q.data_ptr(), 0 if m is None else m.data_ptr(), nq, kq, d, kqp, int(bf16),
        qpack.data_ptr(), qweight.data_ptr(), nreal.data_ptr(),
    )  # fmt: skip
    return qpack, qweight, nreal, kqp


# --------------------------------------------------------------------------- the call


def supports(kernel: str, rows: torch.Tensor, scales: torch.Tensor | None) -> bool:
    """Whether the fused kernel takes this gallery: contiguous CPU rows in the kernel's dtype
    and a dimension the packing divides (D % 4 for int8, D % 2 for bf16)."""
    if not available(kernel) or rows.device.type != "cpu" or not rows.is_contiguous():
        return False
    if FAMILY[kernel] == "int8":
        return rows.dtype == torch.int8 and rows.shape[2] % 4 == 0 and scales is not None
    return rows.dtype == torch.bfloat16 and rows.shape[2] % 2 == 0


def blocks(nq: int, s: int, workers: int) -> list[tuple[int, int, int, int]]:
    """(a0, a1, s0, s1) work items: about 4 per worker (so a worker slowed by another process
    hands its share to the others), whole queries when there are enough, else candidate
    slices of at least 16."""
    want = max(1, 4 * workers) if workers > 1 else 1
    if nq >= want:
        step = -(-nq // want)
        return [(a, min(nq, a + step), 0, s) for a in range(0, nq, step)]
    per_query = max(1, min(-(-want // max(nq, 1)), s // 16))
    step = -(-s // per_query)
    return [(a, a + 1, c, min(s, c + step)) for a in range(nq) for c in range(0, s, step)]


def rerank(
    kernel: str,
    queries: torch.Tensor,
    qmask: torch.Tensor | None,
    rows: torch.Tensor,
    gscales: torch.Tensor | None,
    gmask: torch.Tensor | None,
    candidates: torch.Tensor,
    run: Callable[[Callable[[int], None], int], None],
    workers: int,
) -> torch.Tensor:
    """(Nq, S) scores from the fused kernel. ``queries``: float tokens (Nq, Kq, D) (quantized
    per token for the int8 kernels, rounded to bf16 for bf16, as the blocked path does);
    ``rows`` (N, K, D) the store's codes with ``gscales`` (N, 1) or (N, K); ``run(fn,
    nblocks)`` runs the work items (the engine's thread pool)."""
    lib = library()
    assert lib is not None
    family = FAMILY[kernel]
    qpack, qweight, nreal, kqp = pack_queries(queries, qmask, family)
    fn = lib.craterlab_rerank_i8 if family == "int8" else lib.craterlab_rerank_bf16
    nq, s = candidates.shape
    n, k, d = rows.shape
    cand = candidates.to(torch.int64).contiguous()
    if int(cand.max()) >= n:
        raise IndexError(f"candidate index out of range for a gallery of {n} items")
    out = torch.empty(nq, s, dtype=torch.float32)
    gs = None if gscales is None else gscales.to(torch.float32).contiguous()
    gm = None if gmask is None else gmask.to(torch.bool).contiguous()
    args = Args(
        rows.data_ptr(),
        0 if gs is None else gs.data_ptr(),
        1 if gs is None or gs.shape[-1] == 1 else k,
        0 if gm is None else gm.data_ptr(),
        k,
        d,
        qpack.data_ptr(),
        0,
        qweight.data_ptr(),
        nreal.data_ptr(),
        kqp,
        cand.data_ptr(),
        s,
        out.data_ptr(),
    )
    ref = ctypes.byref(args)
    items = blocks(nq, s, workers)

    def block(b: int) -> None:
        a0, a1, s0, s1 = items[b]
        fn(ref, a0, a1, s0, s1)

    run(block, len(items))
    # keep every operand alive until the kernel has returned
    del qpack, qweight, nreal, cand, gs, gm
    return out
