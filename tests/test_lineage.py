"""Weight lineage end to end: a model fine-tuned from untrained weights says so everywhere.

Three runs of the real pipeline with timm's tiny ``test_vit`` (64 px) on a tiny synthetic set,
offline, so ``backbone.weights=pretrained`` falls back to untrained weights:

1. fine-tune from that fallback (supcon, one tiny epoch);
2. evaluate run 1's checkpoint frozen, loaded as ``backbone.weights=run:<id>``;
3. fine-tune run 1's checkpoint again (triplet), loaded the same way.

Every run's table header, NOTE line, tags and params must say the weights are untrained, and
the lineage must name each step's checkpoint, hash and producing MLflow run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import CONF, TINY
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from craterlab.backbones.lineage import read_lineage, resolve_run_weights
from craterlab.errors import CraterlabError
from craterlab.experiment import run
from craterlab.hashing import file_sha256

TINY_VIT = [
    "backbone.model=test_vit",
    "backbone.pretrained_tag=r160_in1k",
    "backbone.weights=pretrained",  # offline: the untrained fallback
    "allow_random_weights=true",
    "+backbone.image_size=64",
    "dataset.image_size=64",
]
TRAIN = [
    "train.epochs=1",
    "train.batch_size=8",
    "train.steps_per_epoch=2",
    "train.augment=none",
    "train.lr=1e-4",
    "train.val_fraction=0.4",
    "train.progress=false",
]


def compose_run(tmp_path: Path, name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[
                *TINY,
                *TINY_VIT,
                f"output_dir={tmp_path / name}",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                f"tracking.artifact_location={tmp_path / 'artifacts'}",
                f"tracking.run_name={name}",
                *overrides,
            ],
        )


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The three runs: {name: (stdout, mlflow run)}."""
    tmp_path = tmp_path_factory.mktemp("lineage")
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp_path)  # outputs/finetune and outputs/checkpoints land here
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)  # where run:<id> is looked up
    client = MlflowClient(uri)
    out: dict[str, tuple[str, object]] = {}

    def go(name: str, *overrides: str) -> None:
        import contextlib
        import io

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            run(compose_run(tmp_path, name, *overrides))
        exp = client.get_experiment_by_name("craterlab").experiment_id
        (mlrun,) = client.search_runs(exp, f"attributes.run_name = '{name}'")
        out[name] = (buffer.getvalue(), mlrun)

    try:
        go("finetune", "train=supcon", *TRAIN)
        first = out["finetune"][1].info.run_id
        go("frozen", f"backbone.weights=run:{first}")
        go("refine", f"backbone.weights=run:{first}", "train=triplet", *TRAIN)
    finally:
        mp.undo()
    return out, client, tmp_path


@pytest.mark.parametrize("name", ["finetune", "frozen", "refine"])
def test_every_output_says_the_weights_are_untrained(chain, name):
    runs, _, _ = chain
    stdout, mlrun = runs[name]
    header = next(line for line in stdout.splitlines() if line.startswith("Results"))
    assert "[random + fine-tuned weights]" in header
    assert "NOTE: untrained (random) backbone weights" in stdout
    tags, params = mlrun.data.tags, mlrun.data.params
    assert tags["craterlab.untrained_weights"] == "true"
    assert tags["craterlab.weights"].startswith("random + fine-tuned (")
    assert params["weights.untrained"] == "true"
    assert params["weights.origin"] == "random"
    assert params["weights.used"] == tags["craterlab.weights"][: len(params["weights.used"])]
    steps = 2 if name == "refine" else 1
    assert params["weights.finetune_steps"] == str(steps)
    assert "origin: random (fallback: pretrained weights" in tags["craterlab.weights"]


def test_the_lineage_names_every_checkpoint_hash_and_producing_run(chain):
    runs, _, _ = chain
    first = runs["finetune"][1]
    refine = runs["refine"][1]
    lineage = read_lineage(refine.data.tags["craterlab.checkpoint.last"])
    assert lineage == read_lineage(refine.data.params["weights.checkpoint"])
    assert [s["kind"] for s in lineage] == ["random", "finetune", "finetune"]
    assert lineage[0]["status"].startswith("random (fallback: pretrained weights")
    assert [s["loss"] for s in lineage[1:]] == ["supcon", "triplet"]
    assert lineage[1]["mlflow_run_id"] == first.info.run_id
    assert lineage[2]["mlflow_run_id"] == refine.info.run_id
    for step, mlrun in ((lineage[1], first), (lineage[2], refine)):
        tags = mlrun.data.tags
        assert Path(tags["craterlab.checkpoint.last"]) == Path(step["checkpoint"]).resolve()
        assert tags["craterlab.checkpoint.last.sha256"] == step["sha256"]
        assert file_sha256(step["checkpoint"]) == step["sha256"]
    # The frozen run evaluated exactly the checkpoint run 1 recorded; the param sums it up.
    frozen = runs["frozen"][1].data.params
    assert frozen["weights.checkpoint"] == lineage[1]["checkpoint"]
    assert frozen["weights.sha256"] == lineage[1]["sha256"]
    summary = refine.data.params["weights.lineage"]
    assert summary.startswith(frozen["weights.lineage"] + " > triplet 1ep last (run ")
    assert summary.startswith("random > supcon 1ep last (run " + first.info.run_id[:8])


def test_fine_tuning_runs_log_steps_validation_and_checkpoints(chain):
    runs, client, _ = chain
    mlrun = runs["finetune"][1]
    run_id = mlrun.info.run_id
    loss = client.get_metric_history(run_id, "train/loss")
    lr = client.get_metric_history(run_id, "train/lr")
    assert [m.step for m in loss] == [1, 2] and [m.step for m in lr] == [1, 2]
    val = client.get_metric_history(run_id, "val/mAP")
    assert [m.step for m in val] == [0, 2]
    artifacts = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert {"checkpoints/last.pt", "checkpoints/last.pt.lineage.json"} <= artifacts
    assert mlrun.data.tags["craterlab.checkpoint.last.artifact"] == "true"
    assert "craterlab.checkpoint.best" in mlrun.data.tags
    # The frozen run has no checkpoints of its own.
    assert "craterlab.checkpoint.last" not in runs["frozen"][1].data.tags


def test_run_reference_falls_back_to_the_uploaded_artifact(chain, monkeypatch, tmp_path):
    runs, client, _ = chain
    mlrun = runs["finetune"][1]
    monkeypatch.chdir(tmp_path)
    uri = client.tracking_uri
    local = Path(mlrun.data.tags["craterlab.checkpoint.last"])
    moved = tmp_path / "moved.pt"
    shutil.move(local, moved)
    try:
        path = resolve_run_weights(f"run:{mlrun.info.run_id}", uri)
        assert Path(path) != local
        assert file_sha256(path) == mlrun.data.tags["craterlab.checkpoint.last.sha256"]
        assert read_lineage(path)[0]["kind"] == "random"  # the sidecar came along
    finally:
        shutil.move(moved, local)
    with pytest.raises(CraterlabError, match="recorded no 'last' checkpoint"):
        resolve_run_weights(f"run:{runs['frozen'][1].info.run_id}", uri)
    with pytest.raises(CraterlabError, match="no MLflow run 'nope'"):
        resolve_run_weights("run:nope", uri)
