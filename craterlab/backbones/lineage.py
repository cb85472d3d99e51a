"""Weight lineage: where a backbone's weights came from, through any number of fine-tunings.

A lineage is a list of steps, origin first: ``pretrained`` (timm tag), ``random`` (requested
or the offline fallback, with its reason), ``checkpoint`` (a file of unknown history, with its
sha256) or ``hf-hub``; then one ``pretrain`` step per self-supervised pretraining (method, data,
start, epochs) and one ``finetune`` step per fine-tuning (loss, epochs), each with its
checkpoint path and sha256 and the MLflow run that produced it. Weights pretrained from random
init read "self-supervised on <data>, from random init": trained, so not marked untrained.
Every checkpoint ``finetune`` or ``pretrain`` writes gets a sidecar
``<checkpoint>.lineage.json``; a backbone that loads such a file reads it back
(:func:`describe_checkpoint`), so a model fine-tuned from untrained weights says so however
many times it is fine-tuned again: its status starts with ``random``, which is what the
results table, the NOTE line and the ``craterlab.untrained_weights`` tag key on.

``backbone.weights=run:<id>`` (or ``run:<id>/best``) names the checkpoint an MLflow run
recorded (:func:`resolve_run_weights`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from craterlab.errors import CraterlabError
from craterlab.hashing import file_sha256
from craterlab.results import CHECKPOINT_TAG, default_uri, is_untrained

SIDECAR_SUFFIX = ".lineage.json"
RUN_PREFIX = "run:"
CHECKPOINT_ARTIFACT_DIR = "checkpoints"

Lineage = list[dict[str, Any]]


def sidecar(checkpoint: str | os.PathLike[str]) -> Path:
    """The lineage file written beside a checkpoint."""
    return Path(str(checkpoint) + SIDECAR_SUFFIX)


def read_lineage(checkpoint: str | os.PathLike[str]) -> Lineage | None:
    """The lineage stored beside ``checkpoint``, or None for a file of unknown history."""
    path = sidecar(checkpoint)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return list(data["lineage"])


def write_lineage(checkpoint: str | os.PathLike[str], lineage: Lineage) -> None:
    """Store ``lineage`` beside ``checkpoint`` (atomically)."""
    path = sidecar(checkpoint)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"lineage": lineage, "untrained": is_untrained(lineage)}, indent=1))
    os.replace(tmp, path)


def start_text(lineage: Sequence[Mapping[str, Any]]) -> str:
    """What a pretraining started from, in words: 'random init', 'pretrained <tag>', the
    checkpoint, or the last pretraining/fine-tuning of the chain."""
    if not lineage:
        return "unknown weights"
    last = lineage[-1]
    kind = last.get("kind")
    if kind == "random":
        return "random init"
    if kind == "pretrained":
        return f"pretrained {last.get('tag')}"
    if kind in ("checkpoint", "hf-hub"):
        return str(last.get("source"))
    if kind == "pretrain":
        return f"self-supervised on {last.get('data')} (run {str(last.get('mlflow_run_id'))[:8]})"
    if kind == "finetune":
        return f"{last.get('loss')} fine-tuned (run {str(last.get('mlflow_run_id'))[:8]})"
    return str(kind)


def pretrain_step(
    checkpoint: str | os.PathLike[str],
    *,
    method: str,
    data: str,
    start: str,
    epochs: int,
    steps: int,
    run_id: str | None,
) -> dict[str, Any]:
    """The lineage step of one self-supervised pretraining that wrote ``checkpoint``."""
    return {
        "kind": "pretrain",
        "method": method,
        "data": data,
        "start": start,
        "epochs": epochs,
        "steps": steps,
        "checkpoint": str(Path(checkpoint).resolve()),
        "sha256": file_sha256(checkpoint),
        "mlflow_run_id": run_id,
    }


def pretrain_text(step: Mapping[str, Any]) -> str:
    """'self-supervised on <data>, from <start>' for a pretraining step."""
    return f"self-supervised on {step.get('data')}, from {step.get('start')}"


def origin_step(weights_status: str, weights_identity: Mapping[str, Any]) -> dict[str, Any]:
    """The first lineage step of weights a backbone loaded itself (not from a sidecar).

    ``weights_identity`` is ``backbone.identity()["weights"]``; ``weights_status`` its
    ``weights_status`` (which carries the fallback reason).
    """
    kind = str(weights_identity.get("weights", "unknown"))
    if kind == "random" or is_untrained(weights_status):
        return {"kind": "random", "status": weights_status, "seed": weights_identity.get("seed")}
    if kind == "pretrained":
        return {"kind": "pretrained", "tag": weights_identity.get("tag")}
    if kind == "checkpoint":
        source = str(weights_identity.get("source", ""))
        step = {"kind": "hf-hub" if source.startswith("hf-hub:") else "checkpoint"}
        return {**step, "source": source, "sha256": weights_identity.get("sha256")}
    return {"kind": kind, "status": weights_status}


def lineage_of(backbone: Any) -> Lineage:
    """A backbone's lineage: read from its checkpoint's sidecar, else its own origin."""
    known = getattr(backbone, "lineage", None)
    if known:
        return list(known)
    status = str(getattr(backbone, "weights_status", "unknown"))
    identity = backbone.identity() if callable(getattr(backbone, "identity", None)) else {}
    weights = identity.get("weights") if isinstance(identity, Mapping) else None
    return [origin_step(status, weights if isinstance(weights, Mapping) else {})]


def finetune_step(
    checkpoint: str | os.PathLike[str],
    *,
    loss: str,
    epochs: int,
    which: str,
    run_id: str | None,
    val_map: float | None = None,
) -> dict[str, Any]:
    """The lineage step of one fine-tuning that wrote ``checkpoint``."""
    step: dict[str, Any] = {
        "kind": "finetune",
        "loss": loss,
        "epochs": epochs,
        "which": which,
        "checkpoint": str(Path(checkpoint).resolve()),
        "sha256": file_sha256(checkpoint),
        "mlflow_run_id": run_id,
    }
    if val_map is not None:
        step["val_mAP"] = val_map
    return step


def status_of(lineage: Sequence[Mapping[str, Any]], source: str) -> str:
    """The ``weights_status`` of a checkpoint with this lineage, loaded from ``source``.

    Untrained origin: ``random + fine-tuned (...)``, so the table header reads ``[random +
    fine-tuned weights]`` and :func:`craterlab.results.is_untrained` (NOTE line, untrained
    tag) says so. Otherwise ``fine-tuned (...)``; a chain without a fine-tuning step keeps
    ``source``.
    """
    steps = [s for s in lineage if s.get("kind") == "finetune"]
    if lineage and lineage[-1].get("kind") == "pretrain":
        last_pre = lineage[-1]
        return (
            f"{pretrain_text(last_pre)} ({last_pre.get('method')}, {last_pre.get('epochs')} "
            f"epoch(s); {source})"
        )
    if not steps:
        return source
    last = steps[-1]
    what = f"{last['loss']}, {last['epochs']} epoch(s), {len(steps)} fine-tuning step(s)"
    origin = lineage[0]
    origin_text = origin.get("status") or origin.get("tag") or origin.get("source") or "?"
    if not str(origin_text).startswith(origin["kind"]):  # "random (fallback: ...)" says it
        origin_text = f"{origin['kind']} {origin_text}"
    pre = [s for s in lineage if s.get("kind") == "pretrain"]
    if pre:  # the weights the fine-tuning started from were self-supervised
        origin_text = pretrain_text(pre[-1])
    detail = f"{what}; {source}; origin: {origin_text}"
    if is_untrained(lineage):
        return f"random + fine-tuned ({detail})"
    return f"fine-tuned ({detail})"


def describe_checkpoint(path: str | os.PathLike[str], source: str) -> tuple[str, Lineage]:
    """The status and lineage of a checkpoint a backbone has just loaded.

    A file with a sidecar continues its recorded chain; any other file starts one.
    """
    lineage = read_lineage(path)
    if lineage is None:
        kind = "hf-hub" if source.startswith("hf-hub:") else "checkpoint"
        return source, [{"kind": kind, "source": source, "sha256": file_sha256(path)}]
    return status_of(lineage, source), lineage


def lineage_summary(lineage: Sequence[Mapping[str, Any]]) -> str:
    """One line per chain, origin first: ``random > supcon 1ep (run 1a2b3c4d, sha 9f8e7d6c)``.

    Short enough for an MLflow param; the full record is the checkpoint's sidecar.
    """
    parts = []
    for step in lineage:
        kind = step.get("kind")
        if kind == "finetune":
            run = (step.get("mlflow_run_id") or "no run")[:8]
            parts.append(
                f"{step['loss']} {step['epochs']}ep {step.get('which', 'last')} "
                f"(run {run}, sha {str(step.get('sha256'))[:8]})"
            )
        elif kind == "pretrain":
            run = (step.get("mlflow_run_id") or "no run")[:8]
            parts.append(
                f"{step.get('method')} {step.get('epochs')}ep on {step.get('data')} "
                f"(run {run}, sha {str(step.get('sha256'))[:8]})"
            )
        elif kind == "pretrained":
            parts.append(f"pretrained {step.get('tag')}")
        elif kind in ("checkpoint", "hf-hub"):
            parts.append(f"{step.get('source')} (sha {str(step.get('sha256'))[:8]})")
        else:
            parts.append(str(kind))
    return " > ".join(parts)


def lineage_params(lineage: Sequence[Mapping[str, Any]], status: str) -> dict[str, str]:
    """MLflow params that describe the weights a run actually used."""
    origin = lineage[0] if lineage else {"kind": "unknown"}
    steps = [s for s in lineage if s.get("kind") == "finetune"]
    trained = [s for s in lineage if s.get("kind") in ("finetune", "pretrain")]
    params = {
        "weights.used": status,
        "weights.untrained": str(is_untrained(lineage)).lower(),
        "weights.origin": str(origin.get("kind")),
        "weights.finetune_steps": str(len(steps)),
        "weights.pretrain_steps": str(sum(s.get("kind") == "pretrain" for s in lineage)),
        "weights.lineage": lineage_summary(lineage),
    }
    if trained:
        params["weights.checkpoint"] = str(trained[-1]["checkpoint"])
        params["weights.sha256"] = str(trained[-1]["sha256"])
    return params


# --------------------------------------------------------------------------- run:<id>


def is_run_reference(weights: str) -> bool:
    return weights.strip().startswith(RUN_PREFIX)


def resolve_run_weights(weights: str, tracking_uri: str | None = None) -> str:
    """``run:<id>[/last|/best]`` -> a local checkpoint path recorded by that MLflow run.

    The run records each checkpoint as tags (``craterlab.checkpoint.<which>`` = path,
    ``...sha256``) and, when it was uploaded, as the artifact ``checkpoints/<which>.pt``. The
    local file is used when it still has the recorded hash; otherwise the artifact is
    downloaded (with its lineage sidecar) to ``outputs/checkpoints/<id>/``.
    """
    spec = weights.strip()[len(RUN_PREFIX) :]
    run_id, _, which = spec.partition("/")
    which = which or "last"
    if not run_id or which not in ("last", "best"):
        raise CraterlabError(
            f"backbone.weights={weights!r} is not a run reference. Write run:<MLflow run id> "
            "(its last checkpoint) or run:<id>/best (its best validation checkpoint)."
        )
    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:
        raise CraterlabError(
            f"backbone.weights={weights!r}: no MLflow run {run_id!r} in {client.tracking_uri} "
            f"({str(exc).splitlines()[0][:200]}). Check the id in the MLflow UI, or point "
            "MLFLOW_TRACKING_URI at the store that holds it."
        ) from None
    tags = run.data.tags
    key = f"{CHECKPOINT_TAG}.{which}"
    path, sha = tags.get(key), tags.get(f"{key}.sha256")
    if path is None:
        recorded = sorted(
            k.split(".")[2] for k in tags if k.count(".") == 2 and k.startswith(CHECKPOINT_TAG)
        )
        raise CraterlabError(
            f"MLflow run {run_id} recorded no {which!r} checkpoint (it has: "
            f"{', '.join(recorded) or 'none; it was not a fine-tuning or pretraining run'}). "
            f"Use run:{run_id}{'/' + recorded[0] if recorded else ''} or another run."
        )
    if os.path.isfile(path) and (sha is None or file_sha256(path) == sha):
        return path
    if tags.get(f"{key}.artifact") == "true":
        dest = Path("outputs") / "checkpoints" / run_id
        dest.mkdir(parents=True, exist_ok=True)
        name = f"{CHECKPOINT_ARTIFACT_DIR}/{which}.pt"
        local = client.download_artifacts(run_id, name, str(dest))
        # A run without a sidecar artifact: the lineage starts at this file.
        with contextlib.suppress(Exception):
            client.download_artifacts(run_id, name + SIDECAR_SUFFIX, str(dest))
        if sha is None or file_sha256(local) == sha:
            return local
    raise CraterlabError(
        f"MLflow run {run_id} recorded its {which} checkpoint at {path} (sha256 {sha}), but that "
        "file is missing or changed and the run holds no uploaded copy. Restore the file, or "
        "train again with train.log_checkpoints=artifact (pretrain.log_checkpoints=artifact) so "
        "the run keeps a copy."
    )


def _client(tracking_uri: str | None) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(
        tracking_uri=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
    )


def record_checkpoints(
    tracker: Any,
    checkpoints: Mapping[str, str | os.PathLike[str] | None],
    *,
    mode: str,
    max_mb: float,
    staging: str | os.PathLike[str],
) -> dict[str, str]:
    """Record fine-tuning checkpoints in the tracker's run; returns the tags it set.

    Each checkpoint (``{"last": path, "best": path}``) is tagged with its path and sha256, so
    ``run:<id>`` finds it; with ``mode`` 'artifact' (or 'auto' and at most ``max_mb``) it is
    also uploaded as ``checkpoints/<which>.pt`` with its lineage sidecar. ``tracker`` is any
    object with ``set_tags`` / ``log_artifact`` (and ``not_logged``, to tell if uploads failed).
    """
    tags: dict[str, str] = {}
    stage = Path(staging)
    for which, path in checkpoints.items():
        if path is None:
            continue
        path = Path(path).resolve()
        key = f"{CHECKPOINT_TAG}.{which}"
        tags[key] = str(path)
        tags[f"{key}.sha256"] = file_sha256(path)
        size_mb = path.stat().st_size / 2**20
        if mode == "artifact" or (mode == "auto" and size_mb <= max_mb):
            stage.mkdir(parents=True, exist_ok=True)
            failures = len(getattr(tracker, "not_logged", []))
            for src, name in (
                (path, f"{which}.pt"),
                (sidecar(path), f"{which}.pt{SIDECAR_SUFFIX}"),
            ):
                if src.exists():
                    dst = stage / name
                    dst.unlink(missing_ok=True)
                    _link_or_copy(src, dst)
                    tracker.log_artifact(dst, CHECKPOINT_ARTIFACT_DIR)
            if len(getattr(tracker, "not_logged", [])) == failures:
                tags[f"{key}.artifact"] = "true"
    tracker.set_tags(tags)
    return tags


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        import shutil

        shutil.copyfile(src, dst)
