"""A run's gallery and queries as MLflow dataset inputs (the UI's Dataset column and filter).

Each split is one input: name (the dataset, and a manifest's file name), digest (from the
dataset's identity, the same key the feature cache uses, so two runs on different images
differ), source (the manifest or root folder as a local source, or the generator's settings
for a synthetic set), profile (images and crater identities in the split) and the split as
the input's ``mlflow.data.context`` tag.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SPLITS = ("gallery", "query")
CONTEXT_TAG = "mlflow.data.context"
PATH_KEYS = ("path", "root", "manifest")


def dataset_name(config: Mapping[str, Any]) -> str:
    """``synthetic``, ``craterbench_r``, ``manifest:my_crops.csv``."""
    name = str(config.get("name", "dataset"))
    where = next((config[k] for k in PATH_KEYS if config.get(k)), None)
    return f"{name}:{Path(str(where)).name}" if where and name == "manifest" else name


def dataset_source(config: Mapping[str, Any]) -> tuple[str, str]:
    """(source type, source JSON): a local path, else the generator's settings ("code")."""
    where = next((config[k] for k in PATH_KEYS if config.get(k)), None)
    if where:
        return "local", json.dumps({"uri": str(Path(str(where)).expanduser().resolve())})
    settings = {k: str(v) for k, v in sorted(config.items()) if not isinstance(v, Mapping)}
    return "code", json.dumps({"tags": {"craterlab.dataset": settings.get("name", ""), **settings}})


def digest(identity: str, split: str) -> str:
    """A short, stable digest of the split's images (MLflow shows it beside the name)."""
    return hashlib.sha256(f"{identity}|{split}".encode()).hexdigest()[:12]


def dataset_inputs(dataset: Any, config: Mapping[str, Any]) -> list[Any]:
    """``mlflow.entities.DatasetInput`` for the gallery and the queries of ``dataset``."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    name = dataset_name(config)
    source_type, source = dataset_source(config)
    identity = str(dataset.identity())
    out = []
    for split in SPLITS:
        records = list(dataset.records(split))
        if not records:
            continue
        profile = {
            "images": len(records),
            "craters": len({r.crater_id for r in records}),
            "split": split,
        }
        entity = Dataset(
            name=name,
            digest=digest(identity, split),
            source_type=source_type,
            source=source,
            profile=json.dumps(profile),
        )
        out.append(DatasetInput(entity, tags=[InputTag(CONTEXT_TAG, split)]))
    return out
