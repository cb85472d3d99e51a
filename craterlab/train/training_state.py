"""What the training loops (fine-tuning and self-supervised pretraining) share to be resumable:
atomic checkpoint writes, CPU copies of module state, and per-epoch seeds that make a resumed
epoch draw exactly what an uninterrupted one would."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from craterlab.errors import ConfigError, DataError


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a kill never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``module``'s state dict (safe to save while training goes on)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def epoch_seed(seed: int, epoch: int, salt: int) -> int:
    """The seed of one epoch: a function of the run's seed and the epoch only, so a resumed run
    repeats the uninterrupted run's draws; ``salt`` keeps different loops' streams apart."""
    return (seed * 1_000_003 + epoch * 7_919 + salt) % (2**63)


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG ``torch.random.fork_rng`` must save (none on CPU)."""
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def read_state(
    out: Path,
    file: str,
    what: str,
    version: int,
    fix: str,
    *,
    key: str,
    epochs: int,
    mismatch: str,
    epochs_option: str,
    elsewhere: str,
) -> dict[str, Any] | None:
    """The resumable state ``out/file`` of a ``what`` run ("fine-tuning", "pretraining"), or
    None when there is none.

    Refused, each in one paragraph: an unreadable file; a state of another format ``version``
    (the message ends with ``fix``); a state of another run (its ``run_key`` is not ``key``:
    ``"{out} " + mismatch``); a run already trained for more than ``epochs`` (raise
    ``epochs_option`` or use another ``elsewhere``)."""
    path = out / file
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(
            f"Cannot read the {what} state {path} ({exc}). Delete it to start over."
        ) from exc
    if state.get("version") != version:
        raise ConfigError(
            f"{out} holds a {what} state of another format (version {state.get('version')}, "
            f"this craterlab writes {version}). {fix}"
        )
    if state.get("run_key") != key:
        raise ConfigError(f"{out} {mismatch}")
    if state["epoch"] > epochs:
        raise ConfigError(
            f"{out} holds a run already trained for {state['epoch']} epochs, more than "
            f"{epochs_option}={epochs}. Raise {epochs_option} or use another {elsewhere}."
        )
    return state
