"""Where backbone weights come from: the timm hub, a local checkpoint, a hub id, or a seed.

Offline machines are the normal case for this tool, so every path that could touch the network
first checks, quickly, whether it has to: weights already in the Hugging Face cache load from
disk without a request, and an unreachable hub fails in seconds (huggingface_hub would otherwise
retry for about a minute per file).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from craterlab.errors import CraterlabError

log = logging.getLogger(__name__)

# Files timm (and common checkpoint repos) put weights in, in the order they are tried.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
CHECKPOINT_HUB_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "checkpoint.pth",
    "checkpoint.pt",
    "model.pth",
)
STRIP_PREFIXES = ("module.", "backbone.", "_orig_mod.", "encoder.")
NESTED_KEYS = ("state_dict", "model", "module", "model_ema")
CONNECT_TIMEOUT_S = 3.0


class WeightsUnavailable(Exception):
    """Pretrained weights cannot be obtained (offline, not cached, not public)."""


def hub_offline() -> bool:
    """Whether the user asked huggingface_hub to stay offline (HF_HUB_OFFLINE and friends)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


_REACHABLE: dict[str, str | None] = {}


def reachability_problem(url: str) -> str | None:
    """None when ``url``'s host accepts a TCP connection within a few seconds, else why not.

    Cached per host for the process, so a sweep pays the check once.
    """
    parsed = urlparse(url)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if host in _REACHABLE:
        return _REACHABLE[host]
    problem: str | None = None
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        problem = f"cannot connect to {host}:{port} ({exc})"
    _REACHABLE[host] = problem
    return problem


def split_repo(hub_id: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev')."""
    repo, _, rev = hub_id.partition("@")
    return repo, rev or None


def cached_hub_file(repo_id: str, filenames: tuple[str, ...], revision: str | None) -> str | None:
    """The local path of the first of ``filenames`` already in the HF cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        path = try_to_load_from_cache(repo_id, name, revision=revision)
        if isinstance(path, str) and os.path.exists(path):
            return path
    return None


def download_hub_file(repo_id: str, filenames: tuple[str, ...], revision: str | None) -> str:
    """A weights file of a hub repo: from the cache if there, else downloaded (bounded wait)."""
    cached = cached_hub_file(repo_id, filenames, revision)
    if cached:
        return cached
    if hub_offline():
        raise WeightsUnavailable(
            f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        )
    problem = reachability_problem(hub_endpoint())
    if problem:
        raise WeightsUnavailable(f"{repo_id} is not cached and the hub is unreachable: {problem}")
    from huggingface_hub import hf_hub_download

    errors = []
    for name in filenames:
        try:
            return hf_hub_download(repo_id, name, revision=revision)
        except Exception as exc:  # missing file in the repo: try the next name
            errors.append(f"{name}: {type(exc).__name__}")
    raise WeightsUnavailable(f"no weights file found in {repo_id} ({'; '.join(errors)})")


def pretrained_source(pretrained_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A ``pretrained_cfg_overlay`` that makes timm load its hub weights without a request.

    Raises WeightsUnavailable when the weights are neither cached nor reachable in seconds.
    """
    hf_hub_id = pretrained_cfg.get("hf_hub_id") or ""
    url = pretrained_cfg.get("url") or ""
    if hf_hub_id:
        repo, rev = split_repo(hf_hub_id)
        path = cached_hub_file(repo, HUB_WEIGHT_FILES, rev)
        if path:
            return {"file": path}
        path = download_hub_file(repo, HUB_WEIGHT_FILES, rev)
        return {"file": path}
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if cached.exists():
            return {"file": str(cached)}
        if hub_offline():
            raise WeightsUnavailable(f"{url} is not cached and HF_HUB_OFFLINE is set")
        problem = reachability_problem(url)
        if problem:
            raise WeightsUnavailable(f"{url} is not cached and unreachable: {problem}")
        return {}
    raise WeightsUnavailable("the model has no public pretrained weights")


# --------------------------------------------------------------------------- checkpoints


SAFETENSORS_SECTION = "Converting a trusted checkpoint to safetensors"
# Globals that exist to run commands or code: named in the refusal as a warning.
DANGEROUS_GLOBALS = (
    "os.",
    "posix.",
    "nt.",
    "subprocess.",
    "builtins.eval",
    "builtins.exec",
    "builtins.compile",
    "builtins.__import__",
    "runpy.",
    "shutil.",
    "pty.",
    "importlib.",
)


def safe_checkpoint_globals() -> list[Any]:
    """The only non-tensor types a checkpoint may contain: plain data of training scripts.

    DINO, iBOT, MAE and timm training checkpoints pickle their ``argparse.Namespace`` of
    arguments (strings, numbers, tuples, sometimes ``pathlib`` paths) and occasionally numpy
    scalars or arrays next to the tensors. Building any of these runs no code of the file's
    choosing; every other global (``os.system``, a training framework's classes) is refused.
    """
    import argparse
    import pathlib

    out: list[Any] = [argparse.Namespace]
    for cls in (pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.PosixPath):
        out.append(cls)
        for module in ("pathlib", "pathlib._local"):  # 3.13 moved the classes
            if module != cls.__module__:
                out.append((cls, f"{module}.{cls.__qualname__}"))
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch
        return out
    core = getattr(np, "_core", None) or np.core
    out += [np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 vs 2 names
        out += [
            (core.multiarray._reconstruct, f"{module}._reconstruct"),
            (core.multiarray.scalar, f"{module}.scalar"),
        ]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return out


def conversion_hint(path: str) -> str:
    """The few lines that re-save a trusted checkpoint's tensors as safetensors."""
    target = str(Path(path).with_suffix(".safetensors"))
    return (
        "If you trust the file (you trained it, or it comes from its authors), re-save its "
        "tensors as safetensors once and use that file instead (docs/data-and-weights.md, "
        f"'{SAFETENSORS_SECTION}'):\n"
        f'  python -c "import torch, safetensors.torch as st; '
        f"c = torch.load({path!r}, map_location='cpu', weights_only=False); "
        "sd = c.get('teacher', c.get('state_dict', c.get('model', c))); "
        "st.save_file({k: v.contiguous().clone() for k, v in sd.items() "
        f'if torch.is_tensor(v)}}, {target!r})"\n'
        f"then pass backbone.weights={target}."
    )


def _sniff(path: str) -> str:
    """'empty', 'zip' (torch.save), 'safetensors' or 'pickle' from the first bytes of a file."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        return "empty"
    if head.startswith(b"PK"):
        return "zip"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30:
        return "safetensors"
    return "pickle"


def _corrupt(path: str, what: str, exc: BaseException) -> CraterlabError:
    text = str(exc).strip()
    detail = text.splitlines()[0].split(". ")[0][:160] if text else type(exc).__name__
    return CraterlabError(
        f"Checkpoint {path} cannot be read as a {what} ({detail}). The file is probably "
        "truncated or corrupt (an interrupted download or copy): download or copy it again, "
        "or point backbone.weights at another checkpoint."
    )


def _unsafe_globals(path: str, exc: BaseException) -> list[str]:
    """The globals a torch checkpoint would import, minus the allowed ones (no code runs)."""
    allowed = set()
    for entry in safe_checkpoint_globals():
        obj, name = entry if isinstance(entry, tuple) else (entry, None)
        allowed.add(name or f"{obj.__module__}.{obj.__qualname__}")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy format: fall back to the name torch's error gives
        names = re.findall(r"Unsupported global: GLOBAL ([\w.]+ ?[\w.]*)", str(exc))
        names = [n.replace(" ", ".") for n in names]
    return sorted({n for n in names if n not in allowed})


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file as a dict: safetensors, or a torch file loaded weights-only.

    Nothing in the file is ever run: torch pickles are read with ``weights_only=True`` and
    only the plain types of :func:`safe_checkpoint_globals`; a file that needs anything else is
    refused with the few lines that convert a trusted checkpoint to safetensors. An empty,
    truncated or corrupt file raises CraterlabError naming it.
    """
    path = str(path)
    try:
        kind = _sniff(path)
    except OSError as exc:
        raise CraterlabError(
            f"Checkpoint {path} cannot be opened ({exc.strerror or exc}). Check the path and its "
            "permissions (backbone.weights=/path/to/checkpoint)."
        ) from None
    if kind == "empty":
        raise CraterlabError(
            f"Checkpoint {path} is empty (0 bytes): an interrupted download or copy. Download or "
            "copy it again, or point backbone.weights at another checkpoint."
        )
    if path.endswith(".safetensors") or kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(path))
        except Exception as exc:
            raise _corrupt(path, "safetensors file", exc) from None
    try:
        with torch.serialization.safe_globals(safe_checkpoint_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path, exc)
        if not unsafe:
            raise _corrupt(path, "torch checkpoint", exc) from None
        danger = [n for n in unsafe if n.startswith(DANGEROUS_GLOBALS)]
        beware = (
            f"Beware: {', '.join(danger[:3])} runs commands or code, which no model checkpoint "
            "needs; do not use or convert this file unless you know why it does that. "
            if danger
            else ""
        )
        raise CraterlabError(
            f"Checkpoint {path} was refused: besides tensors it pickles Python objects "
            f"({', '.join(unsafe[:5])}) whose loading could run code hidden in the file, and "
            "craterlab only loads tensors and plain data. " + beware + conversion_hint(path)
        ) from None
    except Exception as exc:  # EOFError, zip errors, bad magic numbers: a damaged file
        raise _corrupt(path, "torch checkpoint", exc) from None
    if not isinstance(checkpoint, Mapping):
        raise CraterlabError(
            f"Checkpoint {path} holds a {type(checkpoint).__name__}, not a mapping of names to "
            "tensors (a state dict or a training checkpoint with one). Save the model's "
            "state_dict() instead."
        )
    return dict(checkpoint)


def extract_state_dict(
    checkpoint: Mapping[str, Any], key: str = "teacher", source: str = ""
) -> dict[str, Any]:
    """The backbone's tensors from a DINO-style checkpoint.

    Picks ``key`` (teacher by default, else student) or a nested state_dict/model entry, and
    strips ``module.`` / ``backbone.`` / ``_orig_mod.`` prefixes.
    """
    sd: Any = checkpoint
    for _ in range(3):
        if not isinstance(sd, Mapping):
            break
        if any(isinstance(v, torch.Tensor) for v in sd.values()):
            break
        for candidate in (key, "teacher", "student", *NESTED_KEYS):
            if candidate in sd and isinstance(sd[candidate], Mapping):
                sd = sd[candidate]
                break
        else:
            break
    if not isinstance(sd, Mapping):
        raise CraterlabError(
            f"The checkpoint{' ' + source if source else ''} holds no state dict (a mapping "
            "of names to tensors)."
        )
    out: dict[str, Any] = {}
    for name, value in sd.items():
        if not isinstance(value, torch.Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for prefix in STRIP_PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix) :]
                    changed = True
        out[name] = value
    if not out:
        raise CraterlabError(
            f"The checkpoint{' ' + source if source else ''} holds no tensors: it is not a "
            "model checkpoint (or the tensors sit under a key other than teacher, student, "
            "state_dict or model)."
        )
    return out


@dataclass
class LoadReport:
    """What loading a checkpoint did: loaded, dropped (head) and unexpected keys."""

    loaded: int
    dropped: list[str]
    unexpected: list[str]


def load_checkpoint_into(
    model: torch.nn.Module, path: str | Path, *, key: str = "teacher", label: str = ""
) -> LoadReport:
    """Load a (DINO-style) checkpoint into a timm model; refuse one that doesn't fit.

    Missing keys or shape mismatches raise CraterlabError naming them; projection-head keys
    (``head.*``) are dropped; other unexpected keys are reported with a warning.
    """
    sd = extract_state_dict(read_checkpoint(path), key, source=str(path))
    own = model.state_dict()
    kernel = "patch_embed.proj.weight"
    if kernel in sd and kernel in own and tuple(sd[kernel].shape) != tuple(own[kernel].shape):
        # timm's filter would resample the patch kernel: a different model, not a fit.
        raise CraterlabError(
            f"Checkpoint {path} does not fit {label or type(model).__name__}: shape mismatch in "
            f"{kernel}: checkpoint {tuple(sd[kernel].shape)} vs model {tuple(own[kernel].shape)} "
            "(another patch size or width). Pick the backbone config that matches the checkpoint."
        )
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:  # resamples position embeddings, converts layouts
            sd = filter_fn(sd, model)
        except Exception as exc:  # a filter for another layout: load the dict as it is
            log.debug("checkpoint_filter_fn failed (%s); loading keys unchanged", exc)
    dropped = sorted(
        k for k in sd if k not in own and k.split(".")[0] in ("head", "fc", "dino_head")
    )
    sd = {k: v for k, v in sd.items() if k not in dropped}
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    what = label or type(model).__name__
    if mismatched or missing:
        raise CraterlabError(
            f"Checkpoint {path} does not fit {what}: "
            + (
                f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:5])}); "
                if missing
                else ""
            )
            + (f"shape mismatch in {'; '.join(mismatched[:5])}; " if mismatched else "")
            + (
                f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:5])}). "
                if unexpected
                else ""
            )
            + "Check that the checkpoint was trained with this architecture (model size, patch "
            "size), or pick the backbone config that matches it."
        )
    model.load_state_dict(sd, strict=False)
    if unexpected:
        log.warning(
            "Checkpoint %s: %d unexpected key(s) ignored: %s",
            path,
            len(unexpected),
            ", ".join(unexpected[:10]),
        )
    log.info(
        "Loaded %d tensors from %s into %s (dropped %d head keys)",
        len(sd),
        path,
        what,
        len(dropped),
    )
    return LoadReport(len(sd) - len(unexpected), dropped, unexpected)
