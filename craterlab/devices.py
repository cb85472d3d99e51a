"""Device selection shared by every component: 'auto' means CUDA when present, else CPU."""

from __future__ import annotations

import torch

from craterlab.errors import ConfigError


def resolve_device(device: torch.device | str) -> torch.device:
    """'auto', 'cpu', 'cuda' or 'cuda:N' -> a torch device; CUDA without one is a clear error.

    Raises :class:`ConfigError` (a ``ValueError``), so factories that call it at build time
    report the problem like any other config value.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}."
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device} was requested but no CUDA device is available. "
            "Use device=cpu or device=auto."
        )
    return resolved
