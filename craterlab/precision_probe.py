"""Whether bf16 autocast runs a backbone faster than fp32 on this CPU: measured, cached per machine.

``precision=auto`` on a CPU asks :func:`bf16_pays`. A CPU without bf16 instructions
(:data:`BF16_FLAGS`: AVX-512 BF16, AMX or Arm's BF16) answers fp32 at once. Otherwise a short
probe (:func:`measure`, about 0.2 s of CPU) times one transformer block's worth of matmuls (a
ViT-S/16 MLP and its QKV projection on 4 images' tokens) in fp32 and under bf16 autocast,
interleaved and repeated, on one thread and in that thread's CPU time, keeping the fastest of
each: what it compares is the arithmetic rate of a core, which a busy neighbour on a shared
machine does not change (wall-clock times under a load of 9 on 2 cores measured bf16 at 1.02x
fp32 where the CPU time measured 2x). bf16 is chosen where it is at least
:data:`MIN_SPEEDUP` times faster. The verdict is written to a small JSON file
(:func:`cache_path`; ``CRATERLAB_PROBE_CACHE`` overrides it) keyed by this machine's CPU
model, flags, thread count and torch version, so the probe runs once per machine, and it is
logged every time a process first uses it.

On a 2-core AVX-512 BF16 CPU without AMX the probe measured bf16 about 2x fp32 (ViT-S/16
inference measured 1.95x), where the old rule ("bf16 only with AMX") ran fp32.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""CPU flags (``/proc/cpuinfo``) of native bf16 arithmetic: x86 AVX-512 BF16, AMX, Arm BF16."""

MIN_SPEEDUP = 1.15
"""bf16 is chosen where the probe runs it at least this many times faster than fp32."""

PROBE_VERSION = 2
"""Bump when the probe's workload changes (re-measures every machine)."""

TOKENS, DIM, HIDDEN, REPEATS = 4 * 197, 384, 1536, 5


@dataclass(frozen=True)
class ProbeResult:
    """One probe's verdict: the fastest fp32 and bf16 times (ms) and the choice they gave."""

    choice: str
    fp32_ms: float
    bf16_ms: float
    machine: str

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.bf16_ms if self.bf16_ms > 0 else 0.0

    def describe(self) -> str:
        return (
            f"{self.choice} (probe: bf16 {self.speedup:.2f}x fp32, "
            f"{self.fp32_ms:.1f} vs {self.bf16_ms:.1f} ms; bf16 needs >= {MIN_SPEEDUP}x)"
        )


def has_bf16(flags: frozenset[str]) -> bool:
    """Whether the CPU has native bf16 arithmetic (else bf16 is emulated and never pays)."""
    return bool(flags & BF16_FLAGS)


def machine_key(flags: frozenset[str]) -> str:
    """What the probe's verdict depends on: CPU model, flags, threads, torch version."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    raw = json.dumps(
        [PROBE_VERSION, model, sorted(flags), torch.get_num_threads(), torch.__version__]
    )
    return (
        f"{model} | {torch.get_num_threads()} threads | "
        + hashlib.sha256(raw.encode()).hexdigest()[:12]
    )


def cache_path() -> Path:
    """Where verdicts are kept: ``$CRATERLAB_PROBE_CACHE`` or the user's cache directory."""
    if env := os.environ.get("CRATERLAB_PROBE_CACHE"):
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "craterlab" / "precision-probe.json"


def _workload(x: torch.Tensor, w: tuple[torch.Tensor, ...]) -> torch.Tensor:
    qkv, fc1, fc2 = w
    h = torch.nn.functional.linear(x, qkv)
    y = torch.nn.functional.linear(
        torch.nn.functional.gelu(torch.nn.functional.linear(x, fc1)), fc2
    )
    return h[:, :1] + y[:, :1]


def measure(repeats: int = REPEATS) -> tuple[float, float]:
    """(fp32 ms, bf16 ms): the least CPU time of ``repeats`` interleaved one-thread runs of one
    block's matmuls."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, DIM, generator=g)
    w = (
        torch.randn(3 * DIM, DIM, generator=g) * DIM**-0.5,
        torch.randn(HIDDEN, DIM, generator=g) * DIM**-0.5,
        torch.randn(DIM, HIDDEN, generator=g) * HIDDEN**-0.5,
    )
    best = {"fp32": float("inf"), "bf16": float("inf")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this thread's CPU time is then the whole computation's
    try:
        with torch.inference_mode():
            for i in range(repeats + 1):  # the first round warms up (oneDNN primitives)
                for name in ("fp32", "bf16"):
                    t0 = time.thread_time()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                        _workload(x, w)
                    if i:
                        best[name] = min(best[name], (time.thread_time() - t0) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return best["fp32"], best["bf16"]


def _read(path: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: Path, data: dict[str, dict[str, object]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: measure again next time, still correct
        log.debug("could not cache the precision probe in %s: %s", path, exc)


def probe(flags: frozenset[str]) -> ProbeResult:
    """This machine's verdict: from the per-machine cache, else measured now and cached."""
    key = machine_key(flags)
    path = cache_path()
    data = _read(path)
    if isinstance(entry := data.get(key), dict):
        try:
            result = ProbeResult(**entry)  # type: ignore[arg-type]
        except TypeError:
            pass
        else:
            log.info("precision=auto -> %s, cached in %s", result.describe(), path)
            return result
    fp32_ms, bf16_ms = measure()
    choice = "bf16" if fp32_ms >= MIN_SPEEDUP * bf16_ms else "fp32"
    result = ProbeResult(choice, round(fp32_ms, 3), round(bf16_ms, 3), key)
    data[key] = asdict(result)
    _write(path, data)
    log.info("precision=auto -> %s, measured now and cached in %s", result.describe(), path)
    return result


@functools.cache
def _cached_probe(flags: frozenset[str]) -> ProbeResult:
    return probe(flags)


def bf16_pays(flags: frozenset[str]) -> ProbeResult | None:
    """The probe's verdict for a CPU with these flags (once per process); None without bf16."""
    return _cached_probe(flags) if has_bf16(flags) else None
