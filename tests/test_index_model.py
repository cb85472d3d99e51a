"""A saved index as an MLflow pyfunc model: predict equals ``Index.search``; logged, registered,
and served over REST by ``mlflow models serve``, it answers as ``craterlab search`` does."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import free_port, wait_for, workflow_tiny

from craterlab.errors import DataError
from craterlab.workflows.api import CraterIndex as Index
from craterlab.workflows.demo import render_observation
from craterlab.workflows.ingest import ingest_catalog
from craterlab.workflows.mlflow_model import (
    ARTIFACT,
    OUTPUT_COLUMNS,
    IndexModel,
    requirements,
    signature,
)

TINY = workflow_tiny()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved index of one small synthetic tile, and a folder of 3 of its crops as queries."""
    root = tmp_path_factory.mktemp("index-model")
    obs = render_observation(root / "a", size=128, width=16.0)
    crops = ingest_catalog(obs.image, obs.catalog, root / "A", origin=obs.origin, progress=False)
    index = Index.build(crops.manifest, TINY, progress=False)
    index.save(root / "idx")
    queries = root / "queries"
    queries.mkdir()
    for it in index.items[:3]:
        shutil.copy(it.path, queries / Path(it.path).name)
    return root / "idx", queries, index


def hits_of(frame: pd.DataFrame) -> dict[str, list[tuple[str, float]]]:
    out: dict[str, list[tuple[str, float]]] = {}
    for row in frame.sort_values(["query", "rank"]).itertuples():
        out.setdefault(str(row.query), []).append((row.gallery_id, round(float(row.score), 5)))
    return out


def test_predict_equals_index_search_for_paths_and_image_bytes(saved) -> None:
    directory, queries, _ = saved
    model = IndexModel()
    model.load_context(SimpleNamespace(artifacts={ARTIFACT: str(directory)}))
    files = sorted(queries.iterdir())
    by_path = model.predict(None, pd.DataFrame({"path": [str(f) for f in files]}), {"top": 4})
    by_bytes = model.predict(
        None,
        pd.DataFrame({"image": [f.read_bytes() for f in files], "id": [f.stem for f in files]}),
        {"top": 4},
    )
    assert list(by_path.columns) == list(OUTPUT_COLUMNS)
    reference = Index.load(directory).search(queries, top=4, progress=False)
    want: dict[str, list[tuple[str, float]]] = {}
    for h in reference.hits:
        want.setdefault(h.query, []).append((h.gallery_id, round(h.score, 5)))
    assert hits_of(by_path) == want == hits_of(by_bytes)
    assert len(by_path) == 4 * len(files)
    # each crop of the gallery finds itself first, with the crater the index records for it
    first = by_path[by_path["rank"] == 1]
    assert list(first["gallery_id"]) == list(first["query"])
    crater = {it.id: it.crater for it in Index.load(directory).items}
    assert all(
        crater[g] == c for g, c in zip(by_path["gallery_id"], by_path["crater"], strict=True)
    )


def test_predict_refuses_rows_without_an_image(saved) -> None:
    model = IndexModel()
    model.load_context(SimpleNamespace(artifacts={ARTIFACT: str(saved[0])}))
    with pytest.raises(DataError, match="needs a column 'path'"):
        model.predict(None, pd.DataFrame({"file": ["x.png"]}))
    with pytest.raises(DataError, match="Query row 1 has neither"):
        model.predict(None, pd.DataFrame({"path": [str(next(saved[1].iterdir())), None]}))


def test_signature_and_requirements_describe_the_model() -> None:
    import craterlab

    sig = signature()
    assert sig.inputs.input_names() == ["path", "image", "id"]
    assert not any(c.required for c in sig.inputs.inputs)
    assert sig.outputs.input_names() == list(OUTPUT_COLUMNS)
    assert {p.name: p.default for p in sig.params.params} == {"top": 10, "shortlist": 0}
    assert requirements() == [f"craterlab=={craterlab.__version__}"]


@pytest.mark.slow
def test_logged_index_is_registered_and_served_over_rest_like_search(saved, tmp_path) -> None:
    import mlflow

    directory, queries, _ = saved
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # mlflow models serve runs `uvicorn` from PATH: the environment's bin folder goes first
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": os.getcwd(), "PATH": path}
    cmd = [sys.executable, "-m", "craterlab"]
    out = subprocess.run(
        [*cmd, "index", "log", str(directory), "--tracking-uri", uri, "--register", "craters"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    model_uri = out.split("MLflow model ")[1].split()[0]
    run_id = model_uri.split("/")[1]
    client = mlflow.MlflowClient(tracking_uri=uri)
    (version,) = client.search_model_versions("name = 'craters'")
    assert version.run_id == run_id and str(version.version) == "1"
    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature.outputs.input_names() == list(OUTPUT_COLUMNS)
    local = Path(mlflow.artifacts.download_artifacts(f"{model_uri}/requirements.txt"))
    assert "craterlab==" in local.read_text()

    subprocess.run(
        [*cmd, "search", str(directory), str(queries), "--top", "3", "--out", tmp_path / "cli"],
        env=env,
        capture_output=True,
        check=True,
    )
    expected = json.loads((tmp_path / "cli.json").read_text())["queries"]

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri]
        + ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server)
        files = sorted(queries.iterdir())
        rows = [[str(f), "", ""] for f in files[:2]]  # a binary cell is "" when empty
        rows.append(["", base64.b64encode(files[2].read_bytes()).decode(), files[2].stem])
        body = {
            "dataframe_split": {"columns": ["path", "image", "id"], "data": rows},
            "params": {"top": 3},
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                answer = json.loads(r.read())["predictions"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{exc}: {exc.read().decode()[:2000]}") from None
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(30)
    served = hits_of(pd.DataFrame(answer))
    from_cli = {
        q: [(h["gallery_id"], round(h["score"], 5)) for h in hits] for q, hits in expected.items()
    }
    assert served == from_cli and len(served) == 3
