"""What MLflow shows of craterlab's runs: the experiment's kind, the key columns, datasets as
inputs, run names without launch-local settings, a sweep's parent summary; and, slow, the real
``mlflow ui`` over a sweep's store in headless Chromium."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import BROWSER_ARGS, CHROMIUM, ROOT, TINY, free_port, wait_for
from mlflow.tracking import MlflowClient

from craterlab.plugins import get_registry
from craterlab.sweeps.report import SWEEP_VARIES_ENV, child_run_name
from craterlab.tracking.datasets import dataset_inputs, dataset_name, dataset_source
from craterlab.tracking.mlflow import MlflowTracker
from craterlab.tracking.view import (
    EXPERIMENT_KIND_TAG,
    LATEST_VIEW,
    MODEL_DEVELOPMENT,
    VIEW_TAG,
    best_children,
    key_columns,
    launch_local,
    split_params,
    view_url,
)

METRICS = [
    "single/mAP",
    "two_stage/mAP",
    "two_stage/R_at_1",
    "two_stage/R_at_10",
    "two_stage/ms_per_query",
    "two_stage/latency_rerank_p50_ms",
    "single/bytes_per_image",
    "storage/token_store_bytes",
]


def test_key_columns_are_the_per_mode_key_metrics_then_swept_and_key_params() -> None:
    params = {"k", "quantizer.name", "backbone.model", "cache.dir", "aggregator.name"}
    assert key_columns(METRICS, params, ["aggregator.name"]) == [
        "attributes.`Dataset`",
        "metrics.`two_stage/mAP`",
        "metrics.`single/mAP`",
        "metrics.`two_stage/R_at_1`",
        "metrics.`single/bytes_per_image`",
        "metrics.`two_stage/ms_per_query`",
        "params.`aggregator.name`",
        "params.`backbone.model`",
        "params.`k`",
        "params.`quantizer.name`",
    ]
    url = view_url("7", "sweep-ab")
    assert url.endswith(
        "#/experiments/7/runs?viewStateShareKey=sweep-ab&workflowType=machine_learning"
    )


def run(name: str, params: dict, metrics: dict) -> SimpleNamespace:
    return SimpleNamespace(
        info=SimpleNamespace(run_name=name, run_id=f"id-{name}"),
        data=SimpleNamespace(params=params, metrics=metrics),
    )


def test_constant_and_varied_params_and_the_best_child_per_metric() -> None:
    children = [
        run(
            "a",
            {"k": "8", "dataset.name": "synthetic"},
            {"two_stage/mAP": 0.4, "two_stage/ms_per_query": 3.0},
        ),
        run(
            "b",
            {"k": "16", "dataset.name": "synthetic"},
            {"two_stage/mAP": 0.6, "two_stage/ms_per_query": 5.0},
        ),
        run("c", {"k": "32", "dataset.name": "synthetic", "x": "1"}, {"two_stage/mAP": math.nan}),
    ]
    constant, varied = split_params([c.data.params for c in children])
    assert constant == {"dataset.name": "synthetic"}
    assert varied == {"k": ["16", "32", "8"], "x": ["1"]}  # a key some children lack varies
    best = best_children(children, ["two_stage/mAP", "two_stage/ms_per_query", "single/mAP"])
    assert {m: (v, c.info.run_name) for m, (v, c) in best.items()} == {
        "two_stage/mAP": (0.6, "b"),  # accuracy: the highest; NaN is no candidate
        "two_stage/ms_per_query": (3.0, "a"),  # cost: the lowest
    }


def test_run_names_carry_only_what_the_sweep_varies_never_launch_local_settings(
    monkeypatch,
) -> None:
    assert launch_local("cache.dir=/scratch/x") and launch_local("+tracking.uri=file:/x")
    assert launch_local("device=cuda") and launch_local("hydra.sweep.dir=/x")
    assert not launch_local("k=8") and not launch_local("dataset.path=x.csv")
    monkeypatch.setenv(SWEEP_VARIES_ENV, "k,cache.dir,aggregator")
    overrides = ["cache.dir=/scratch/me", "k=8", "aggregator=instance", "quantizer=int8"]
    assert child_run_name(overrides) == "k=8,aggregator=instance"


def test_gallery_and_queries_become_dataset_inputs_that_differ_with_the_data(tiny_dataset) -> None:
    config = {"name": "synthetic", "size": "tiny", "n_identities": 6, "image_size": 64}
    inputs = dataset_inputs(tiny_dataset, config)
    assert [i.tags[0].value for i in inputs] == ["gallery", "query"]
    for item, split in zip(inputs, ("gallery", "query"), strict=True):
        records = list(tiny_dataset.records(split))
        profile = json.loads(item.dataset.profile)
        assert profile == {
            "images": len(records),
            "craters": len({r.crater_id for r in records}),
            "split": split,
        }
        assert item.dataset.name == "synthetic" and item.dataset.source_type == "code"
    assert inputs[0].dataset.digest != inputs[1].dataset.digest
    other = get_registry().build(
        "dataset", {**config, "n_identities": 7, "n_query_craters": 2}, seed=0
    )
    assert dataset_inputs(other, config)[0].dataset.digest != inputs[0].dataset.digest
    manifest = {"name": "manifest", "path": "examples/manifest/manifest.csv"}
    assert dataset_name(manifest) == "manifest:manifest.csv"
    kind, source = dataset_source(manifest)
    assert kind == "local" and json.loads(source)["uri"] == str(Path(manifest["path"]).resolve())


def test_tracker_sets_the_kind_logs_inputs_and_saves_the_key_columns_view(
    mlflow_store, tiny_dataset
) -> None:
    settings = {k: v for k, v in mlflow_store.items() if k != "name"}
    client = MlflowClient(settings["uri"])
    client.create_experiment(settings["experiment"])  # made before craterlab set its kind
    tracker = MlflowTracker(**settings)
    tracker.start({"craterlab.dataset": "synthetic"}, run_name="k=8")
    tracker.log_params({"k": 8, "dataset": {"name": "synthetic"}, "cache": {"dir": "/x"}})
    tracker.log_datasets(tiny_dataset, {"name": "synthetic", "n_identities": 6})
    tracker.log_metrics({"two_stage/mAP": 0.5, "two_stage/R@1": 0.25, "time/x": 1.0})
    tracker.finish()
    assert tracker.not_logged == []
    experiment = client.get_experiment_by_name(settings["experiment"])
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_DEVELOPMENT
    view = json.loads(experiment.tags[VIEW_TAG + LATEST_VIEW])
    assert view["selectedColumns"] == [
        "attributes.`Dataset`",
        "metrics.`two_stage/mAP`",
        "metrics.`two_stage/R_at_1`",
        "params.`dataset.name`",
        "params.`k`",
    ]
    inputs = client.get_run(tracker.run_id).inputs.dataset_inputs
    assert sorted(i.tags[0].value for i in inputs) == ["gallery", "query"]


# ------------------------------------------------------------------ the real UI, slow

ARTIFACTS = Path(os.environ.get("CRATERLAB_TEST_ARTIFACTS", ROOT / "outputs" / "test-artifacts"))


@pytest.mark.slow
def test_sweep_in_the_real_mlflow_ui(tmp_path) -> None:
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: apt-get install -y chromium (.ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]'")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CRATERLAB_CACHE": str(tmp_path / "cache")}
    sweep = subprocess.run(
        [sys.executable, "-m", "craterlab", "-m", *TINY, "aggregator=instance,none"]
        + [f"cache.dir={tmp_path / 'cache'}", f"tracking.uri={store}"]
        + [f"tracking.artifact_location={tmp_path / 'artifacts'}"]
        + [f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]

    # the parent run summarises its sweep (what the UI shows of it)
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("craterlab")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("craterlab.role") == "sweep"]
    children = [r for r in runs if r is not parent]
    assert sorted(r.info.run_name for r in children) == ["aggregator=instance", "aggregator=none"]
    assert parent.data.params["sweep.varied"] == "aggregator"
    assert parent.data.params["sweep.values.aggregator.name"] == "instance|none"
    assert parent.data.params["k"] == "8" and "aggregator.name" not in parent.data.params
    best = max(children, key=lambda r: r.data.metrics["two_stage/mAP"])
    assert parent.data.metrics["best/two_stage/mAP"] == best.data.metrics["two_stage/mAP"]
    assert parent.data.tags["best/two_stage/mAP"] == f"{best.info.run_name} ({best.info.run_id})"
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "report"} <= names
    contexts = sorted(i.tags[0].value for i in parent.inputs.dataset_inputs)
    assert contexts == ["gallery", "query"]

    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store]
        + ["-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
        env={**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = tmp_path / "mlflow-sweep.png"
    try:
        wait_for(f"{base}/health", ui)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
            # wide: the grid renders only the columns in view
            tab = browser.new_page(viewport={"width": 2600, "height": 700})
            tab.goto(view_url(experiment.experiment_id, LATEST_VIEW, base))
            tab.get_by_text(parent.info.run_name, exact=True).first.wait_for(timeout=90_000)
            close = tab.get_by_role("button", name="Close").first
            if close.count() and close.is_visible():
                close.click()  # the assistant panel, so the table has the width
            for name in ("two_stage/mAP", "single/R_at_1", "aggregator.name", "Dataset"):
                tab.get_by_role("columnheader", name=name).first.wait_for(timeout=30_000)
            assert tab.get_by_text("synthetic (", exact=False).count() >= 1  # dataset inputs
            # the sweep's parent row opens onto its children (its "+" beside the name)
            cell = tab.locator("[role=gridcell]", has_text=parent.info.run_name)
            cell.locator("button[data-component-id*='runnamecellrenderer']").first.click()
            for child in children:
                tab.get_by_text(child.info.run_name, exact=True).first.wait_for(timeout=30_000)
            time.sleep(1)
            tab.screenshot(path=str(shot))
            # the parent's report is among its artifacts
            tab.goto(
                f"{base}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}/artifacts"
            )
            tab.get_by_text("summary.csv").first.wait_for(timeout=60_000)
            tab.get_by_text("report", exact=True).first.wait_for()
            browser.close()
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, 15)
            ui.wait(30)
    assert shot.stat().st_size > 20_000
    shutil.copy(shot, ARTIFACTS / shot.name)  # kept as a test artifact
