"""A saved index as an MLflow model: ``python -m craterlab index log DIR`` and its pyfunc.

:func:`log_index` logs an index directory (written by ``craterlab index``) as an MLflow
``pyfunc`` model in a run, with its input/output signature and the craterlab version as its
requirement, and registers it in the model registry when given a name. Anything that speaks
MLflow can then use it: ``mlflow.pyfunc.load_model("runs:/<id>/index").predict(df)`` in
Python, or ``mlflow models serve -m runs:/<id>/index --env-manager local`` over REST.

``predict`` takes a table of query crops, one row each: ``path`` (an image file the model's
process can read) or ``image`` (the encoded bytes of a PNG/JPEG/TIFF; base64 in REST JSON), and
an optional ``id`` (default: the file's stem, or ``query<row>``). It returns the ranked hits,
one row per (query, rank): ``query, rank, gallery_id, crater, score, stage1_score``, exactly
what ``craterlab search`` writes. ``params``: ``top`` (hits per query, default 10) and
``shortlist`` (stage-1 shortlist S, default the index's).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import craterlab
from craterlab.errors import DataError

ARTIFACT = "index"
"""The model's artifact name: ``runs:/<run id>/index``, and the index folder inside it."""
OUTPUT_COLUMNS = ("query", "rank", "gallery_id", "crater", "score", "stage1_score")


def signature() -> ModelSignature:
    """Input (path | image, optional id), output (one row per hit) and params (top, shortlist)."""
    inputs = Schema(
        [
            ColSpec("string", "path", required=False),
            ColSpec("binary", "image", required=False),
            ColSpec("string", "id", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "query"),
            ColSpec("long", "rank"),
            ColSpec("string", "gallery_id"),
            ColSpec("string", "crater"),
            ColSpec("double", "score"),
            ColSpec("double", "stage1_score"),
        ]
    )
    params = ParamSchema([ParamSpec("top", "long", 10), ParamSpec("shortlist", "long", 0)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _query_items(frame: Any, workdir: Path) -> list[Any]:
    """Rows of ``frame`` -> workflow items; ``image`` bytes are written to ``workdir``."""
    from craterlab.workflows.items import Item

    columns = set(frame.columns)
    if not columns & {"path", "image"}:
        raise DataError(
            f"The index model needs a column 'path' (image files) or 'image' (encoded image "
            f"bytes) per query crop; got columns {sorted(columns)}."
        )
    items = []
    for row, record in enumerate(frame.to_dict("records")):
        path, data = record.get("path"), record.get("image")
        given = record.get("id")
        if isinstance(data, str):  # a REST client that sent base64 without a schema
            import base64

            data = base64.b64decode(data)
        if isinstance(data, bytes | bytearray) and data:
            path = workdir / f"query{row:06d}"
            path.write_bytes(bytes(data))
        elif not isinstance(path, str) or not path:
            raise DataError(
                f"Query row {row} has neither a 'path' nor 'image' bytes; give one per row."
            )
        qid = str(given) if isinstance(given, str) and given else None
        qid = qid or (Path(path).stem if record.get("path") else f"query{row}")
        items.append(Item(qid, str(path), qid))
    return items


class IndexModel(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper around :class:`craterlab.workflows.api.CraterIndex` (see module doc)."""

    def load_context(self, context: Any) -> None:
        from craterlab.workflows.api import CraterIndex

        self.index = CraterIndex.load(context.artifacts[ARTIFACT])
        self.crater = {it.id: it.crater for it in self.index.items}

    # model_input is left unannotated: MLflow reads a hint there as a schema of its own
    def predict(
        self,
        context: Any,
        model_input,  # a DataFrame (or what pandas makes one of)
        params: Mapping[str, Any] | None = None,
    ) -> Any:
        """Ranked hits of each query row (see the module docstring)."""
        import pandas as pd

        params = dict(params or {})
        top = int(params.get("top") or 10)
        shortlist = int(params.get("shortlist") or 0) or None
        with tempfile.TemporaryDirectory(prefix="craterlab-queries-") as tmp:
            items = _query_items(pd.DataFrame(model_input), Path(tmp))
            hits = self.index.search(items, top=top, shortlist=shortlist, progress=False)
        rows = [
            (
                h.query,
                h.rank,
                h.gallery_id,
                self.crater.get(h.gallery_id, ""),
                h.score,
                h.stage1_score,
            )
            for h in hits.hits
        ]
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS)).astype(
            {"rank": "int64", "score": "float64", "stage1_score": "float64"}
        )


def requirements() -> list[str]:
    """The model's pip requirements: the craterlab version that wrote (and can read) it."""
    return [f"craterlab=={craterlab.__version__}"]


def log_index(
    index_dir: str | os.PathLike[str],
    *,
    tracking_uri: str | None = None,
    experiment: str = "craterlab-indexes",
    run_name: str | None = None,
    registered_name: str | None = None,
) -> tuple[str, str]:
    """Log ``index_dir`` as a pyfunc model in a new run; returns (run id, model URI).

    ``registered_name`` also registers it in the model registry (a new version of that name).
    The index is loaded first, so a damaged or foreign index is refused before anything is
    logged.
    """
    from craterlab.workflows.api import CraterIndex

    index = CraterIndex.load(index_dir)
    uri = tracking_uri or _default_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    meta = index.gallery.metadata if isinstance(index.gallery.metadata, dict) else {}
    with mlflow.start_run(run_name=run_name or f"index {Path(index_dir).name}") as run:
        mlflow.log_params({f"index.{k}": v for k, v in meta.items() if k != "dataset"})
        mlflow.log_params({"index.items": len(index), "index.overrides": " ".join(index.overrides)})
        mlflow.pyfunc.log_model(
            name=ARTIFACT,
            python_model=IndexModel(),
            artifacts={ARTIFACT: str(Path(index_dir).resolve())},
            signature=signature(),
            pip_requirements=requirements(),
            registered_model_name=registered_name,
        )
    return run.info.run_id, f"runs:/{run.info.run_id}/{ARTIFACT}"


def _default_uri() -> str:
    from craterlab.results import default_uri

    return os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
