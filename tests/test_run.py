"""End to end on a tiny synthetic set: metrics, the results table, MLflow, hooks, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import CONF, ROOT, TINY
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from craterlab.devices import resolve_precision
from craterlab.errors import ConfigError, UnknownComponentError
from craterlab.experiment import run
from craterlab.registry import KINDS


def tiny_config(tmp_path, *overrides: str):
    tracking = [
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_location={tmp_path / 'artifacts'}",
    ]
    if "tracking=none" in overrides:
        tracking = []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[*TINY, f"output_dir={tmp_path / 'run'}", *overrides, *tracking],
        )


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("run")
    cfg = tiny_config(tmp_path)
    return cfg, run(cfg), tmp_path


def test_every_mode_reports_every_metric(default_run) -> None:
    cfg, result, _ = default_run
    assert set(result.results) == {"single", "exhaustive", "two_stage"}
    for metrics in result.results.values():
        for key in ("R@1", "R@5", "R@10", "mAP", "bytes_per_image", "ms_per_query"):
            assert key in metrics
        assert 0.0 <= metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= 1.0
    assert "R@S" in result.results["two_stage"]
    assert result.storage["tokens_per_image"] == 8  # k=8
    assert result.storage["token_bytes_per_image"] == 8 * 64 * 4  # fp32, test_vit's dim 64


def test_untrained_weights_are_declared(default_run) -> None:
    _, result, tmp_path = default_run
    assert result.weights_status.startswith("random")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (mlrun,) = client.search_runs(client.get_experiment_by_name("craterlab").experiment_id)
    assert mlrun.data.tags["craterlab.untrained_weights"] == "true"


def test_mlflow_records_config_metrics_and_artifacts(default_run) -> None:
    _, result, tmp_path = default_run
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (mlrun,) = client.search_runs(client.get_experiment_by_name("craterlab").experiment_id)
    assert mlrun.data.params["aggregator.k"] == "8"
    assert mlrun.data.params["backbone.model"] == "test_vit"
    assert mlrun.data.tags["craterlab.backbone"] == "test_vit"
    # the forward precision actually used (precision=auto resolved on this machine)
    assert mlrun.data.tags["craterlab.precision"] == resolve_precision("auto", torch.device("cpu"))
    assert mlrun.data.tags["craterlab.tokens"] == "instance"
    assert mlrun.info.run_name == "synthetic test_vit instance k=8"
    metrics = mlrun.data.metrics
    for mode in ("single", "exhaustive", "two_stage"):
        assert metrics[f"{mode}/mAP"] == pytest.approx(result.results[mode]["mAP"])
        assert f"{mode}/R_at_10" in metrics
    assert "two_stage/R_at_S" in metrics
    assert "storage/token_bytes_per_image" in metrics
    assert "time/encode_gallery_seconds" in metrics
    assert any(k.startswith("two_stage/latency_") for k in metrics)
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"resolved_config.yaml", "rankings.json"} <= artifacts


def test_second_run_hits_the_feature_cache(default_run, tmp_path) -> None:
    cfg = tiny_config(tmp_path, "tracking=none")
    result = run(cfg)
    assert result.timings["encode_gallery_cache_hit"] == 1.0
    assert result.timings["encode_query_cache_hit"] == 1.0


def test_unknown_component_fails_before_any_work(tmp_path) -> None:
    cfg = tiny_config(tmp_path, "tracking=none", "+aggregator.kk=3")
    with pytest.raises(ConfigError, match="Valid keys"):
        run(cfg)
    cfg = tiny_config(tmp_path, "tracking=none", "pooling.name=gemm")
    with pytest.raises(UnknownComponentError, match="Did you mean 'gem'"):
        run(cfg)


def cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "craterlab", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=None,
    )


def test_user_mistakes_print_one_paragraph_without_traceback(tmp_path) -> None:
    result = cli("tracking=none", "pooling.name=gemm", cwd=tmp_path)
    assert result.returncode == 2
    assert "Unknown pooling 'gemm'" in result.stderr
    assert "Traceback" not in result.stderr


def test_mistyped_component_key_names_the_valid_keys(tmp_path) -> None:
    result = cli("tracking=none", "aggregator.kk=3", cwd=tmp_path)
    assert result.returncode == 2
    assert "aggregator 'instance' has no config key 'kk'. Did you mean 'k'?" in result.stderr
    assert "Valid keys: k, seeds, assign, temperature" in result.stderr


def test_mistyped_stage_key_names_the_stage_keys_and_the_path_to_fix(tmp_path) -> None:
    stage = "retrieval.stages.token_ivf"
    result = cli("tracking=none", "retrieval=token_ivf", f"{stage}.refin=300", cwd=tmp_path)
    assert result.returncode == 2
    assert "stage 'token_ivf' has no config key 'refin'. Did you mean 'refine'?" in result.stderr
    assert f"(e.g. {stage}.shortlist=VALUE)" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_wrong_key_in_a_stage_config_names_the_stage_path_to_fix(tmp_path) -> None:
    """A stage config that reaches the pipeline with a bad key (a config file, a sweep's
    yaml) is refused with the stage's own path, not the bare kind."""
    from omegaconf import OmegaConf

    from craterlab.pipeline import build_components
    from craterlab.plugins import get_registry

    cfg = tiny_config(tmp_path, "tracking=none", "retrieval=token_ivf")
    OmegaConf.set_struct(cfg, False)
    cfg.retrieval.stages.token_ivf.refin = 300
    with pytest.raises(ConfigError, match=r"e.g. retrieval\.stages\.token_ivf\.shortlist=VALUE"):
        build_components(cfg, get_registry(), seed=0)


def test_a_stage_key_its_config_file_omits_is_added_not_refused() -> None:
    from craterlab.__main__ import check_component_keys

    args = ["retrieval=token_ivf", "retrieval.stages.token_ivf.sample=5000"]
    assert check_component_keys(args) == [args[0], "+" + args[1]]  # a factory default
    listed = ["retrieval=token_ivf", "retrieval.stages.token_ivf.refine=300"]
    assert check_component_keys(listed) == listed  # in the yaml: Hydra sets it as is
    with pytest.raises(ConfigError, match="'sample' must be int"):
        check_component_keys(["retrieval=token_ivf", "retrieval.stages.token_ivf.sample=x"])


def test_plugins_listing_shows_every_kind(tmp_path) -> None:
    result = cli("plugins", cwd=tmp_path)
    assert result.returncode == 0
    for kind in KINDS:
        assert f"  {kind} " in result.stdout
    assert "craterlab.tokens" in result.stdout


def test_module_runs_from_any_directory(tmp_path) -> None:
    """The configs are found relative to the package, not the working directory."""
    assert (ROOT / "conf" / "config.yaml").is_file()
    result = cli("--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "aggregator:" in result.stdout


@pytest.mark.parametrize("source", ["manifest", "craterbench_r"])
def test_file_datasets_run_end_to_end(source: str, tmp_path) -> None:
    """Your own crops (the example manifest) and a CraterBench-R layout run like the default."""
    if source == "manifest":
        dataset = ["dataset=manifest", f"dataset.path={ROOT / 'examples/manifest/manifest.csv'}"]
    else:
        from craterlab.data.export import export_dataset
        from craterlab.data.synthetic import SyntheticCraters

        small = SyntheticCraters(size="tiny", n_identities=6, n_query_craters=2, image_size=64)
        export_dataset(small, tmp_path / "release", progress=False)
        dataset = ["dataset=craterbench_r", f"dataset.root={tmp_path / 'release'}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                *dataset,
                "backbone.model=test_vit",
                "backbone.pretrained_tag=r160_in1k",
                "backbone.weights=random",
                "k=4",
                "shortlist=3",
                "tracking=none",
                f"output_dir={tmp_path / 'run'}",
            ],
        )
    result = run(cfg)
    assert set(result.results) == {"single", "exhaustive", "two_stage"}
    assert all(0.0 <= m["mAP"] <= 1.0 for m in result.results.values())
    assert (tmp_path / "run" / "rankings.json").is_file()


def test_saved_index_answers_queries_without_the_backbone(default_run, tmp_path) -> None:
    from craterlab.retrieval.index import EncodedGallery

    cfg = tiny_config(tmp_path, "tracking=none", "save_index=true")
    result = run(cfg)
    index = EncodedGallery.load(result.run_dir / "index")
    rankings = json.loads((result.run_dir / "rankings.json").read_text())
    gallery_ids = index.ids
    assert len(gallery_ids) == len(set(gallery_ids)) == 24  # 12 identities x 2 crops
    # the stored gallery vectors find each gallery image itself first
    found = index.search(index.vectors[:5], None, mode="single", depth=3)
    assert [ids[0] for ids in found.ids] == gallery_ids[:5]
    assert set(rankings["single"]) and all(
        i in gallery_ids for row in rankings["single"].values() for i in row
    )
