"""Each experiment preset composes with the study's settings; a small one runs end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from craterlab.report.tables import LAYOUTS

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
STUDY_PRESETS = [p for p in PRESETS if p != "smoke" and not p.endswith("_smoke")]


def compose_preset(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "config", overrides=[f"experiment={name}", *overrides], return_hydra_config=True
        )


def sweep(cfg) -> dict[str, list[str]]:
    params = cfg.hydra.sweeper.params or {}
    return {k.lstrip("+"): str(v).split(",") for k, v in params.items()}


def jobs(name: str, *overrides: str) -> list:
    """Every job config of a preset's sweep (the grid, composed one by one); K only at its
    first value (the settings checked here do not depend on K)."""
    grid = [[]]
    for key, values in sweep(compose_preset(name, *overrides)).items():
        values = values[:1] if key == "k" else values
        grid = [g + [f"{key}={v}"] for g in grid for v in values]
    return [compose_preset(name, *overrides, *g) for g in grid]


def test_the_old_preset_names_still_exist():
    assert {"smoke", "headline_k16", "deployment", "selection_vs_instance"} <= set(PRESETS)


@pytest.mark.parametrize("name", STUDY_PRESETS)
def test_preset_header_dataset_and_report_table(name: str):
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    header = text.split("defaults:")[0]
    assert any(w in header.lower() for w in ("table", "fig", "headline")), "say what it reproduces"
    assert "python -m craterlab" in header
    cfg = compose_preset(name)
    assert cfg.dataset.name == "craterbench_r"
    assert cfg.report.table in LAYOUTS
    synthetic = compose_preset(name, "dataset=synthetic", "dataset.size=tiny")
    assert synthetic.dataset.name == "synthetic" and synthetic.dataset.size == "tiny"


def study_settings_hold(cfg) -> None:
    """DINO rows: FPS seeds and a CLS shortlist; MarsDINO rows: GeM and attention seeds."""
    if cfg.backbone.name == "marsdino":
        assert cfg.pooling.name == "gem"
        if cfg.aggregator.name == "instance":
            assert cfg.aggregator.seeds == "attention"
    elif cfg.backbone.get("pretrained_tag") == "dino" and "vit_small" in cfg.backbone.model:
        assert cfg.pooling.name == "cls"
        if cfg.aggregator.name == "instance":
            assert cfg.aggregator.seeds == "fps"


TOKEN_PRESETS = [
    "headline_k16",
    "selection_vs_instance",
    "deployment",
    "fig3_k_sweep",
    "table3_aggregation",
    "table4_two_stage",
    "table8_selection",
    "table10_assignment",
    "table11_k",
    "table12_quantization",
]


@pytest.mark.parametrize("name", TOKEN_PRESETS)
def test_every_job_uses_the_study_settings(name: str):
    for cfg in jobs(name):
        study_settings_hold(cfg)


def test_headline_and_fig3():
    rows = {(c.aggregator.name, c.aggregator.get("seeds")) for c in jobs("headline_k16")}
    assert rows == {("none", None), ("instance", "fps")}
    assert compose_preset("headline_k16").k == 16
    grid = sweep(compose_preset("fig3_k_sweep"))
    assert grid["k"] == ["1", "2", "4", "8", "16", "32", "64", "128", "196"]
    assert grid["recipe"] == ["dino", "marsdino"]
    methods = {
        (c.backbone.name, c.selector.name, c.aggregator.name, c.aggregator.get("seeds"))
        for c in jobs("fig3_k_sweep")
    }
    assert methods == {
        ("timm_vit", "attention", "none", None),
        ("timm_vit", "random", "none", None),
        ("timm_vit", "attention", "instance", "fps"),
        ("marsdino", "attention", "none", None),
        ("marsdino", "random", "none", None),
        ("marsdino", "attention", "instance", "attention"),
    }
    assert compose_preset("fig3_k_sweep").retrieval.stages.keys() == {"exhaustive"}


def test_two_stage_quantization_and_deployment():
    table4 = compose_preset("table4_two_stage")
    assert sweep(table4)["shortlist"] == ["50", "100", "200", "500"]
    assert set(table4.retrieval.stages) == {"single", "exhaustive", "two_stage"}
    assert table4.k == 32 and table4.quantizer.name == "fp32"
    table12 = compose_preset("table12_quantization")
    assert sweep(table12)["quantizer"] == ["fp32", "fp16", "int8", "pq96", "pq48"]
    assert table12.k == 32 and table12.shortlist == 100
    deployment = compose_preset("deployment")
    assert deployment.quantizer.name == "int8" and deployment.pooling.name == "cls"
    assert sweep(deployment)["shortlist"] == ["50", "100", "200", "500"]


def test_backbone_pooling_selection_seed_and_assignment_tables():
    backbones = {p.stem for p in (CONF / "backbone").glob("*.yaml")}
    table2 = sweep(compose_preset("table2_backbones"))
    assert set(table2["backbone"]) == backbones and len(backbones) == 30
    assert table2["pooling"] == ["cls", "mean", "max", "gem"]
    assert sweep(compose_preset("fig2_parameters")) == table2
    table6 = sweep(compose_preset("table6_pooling"))
    cnns = {b for b in backbones if "timm_cnn" in (CONF / "backbone" / f"{b}.yaml").read_text()}
    assert set(table6["backbone"]) == backbones - cnns
    assert sweep(compose_preset("table8_selection"))["selector"] == [
        *("attention", "norm", "norm_attention", "random", "grid", "cls_similarity"),
        "cls_distance",
    ]
    assert compose_preset("table8_selection").aggregator.name == "none"
    assert sweep(compose_preset("table9_seeds"))["aggregator.seeds"] == ["attention", "fps"]
    assign = sweep(compose_preset("table10_assignment"))["aggregator.assign"]
    assert assign == ["hard", "soft2", "soft4", "dense"]


LOSSES = ("arcface", "supcon", "triplet")
LOSS_ROWS = {(loss, f"{mode}_crop") for loss in LOSSES for mode in ("single", "multi")}


def test_finetune_rows_are_the_frozen_backbone_and_each_loss_and_crop_mode():
    """7 rows (frozen + 3 losses x 2 crop modes), each with CLS and GeM: no "frozen,
    multi-crop" duplicate; the study's recipe in the full preset, the CPU recipe in the smoke."""
    full = jobs("finetune")
    rows = {(c.train.name, c.train.get("augment"), c.pooling.name) for c in full}
    expected = {(t, a) for t, a in LOSS_ROWS} | {("none", None)}
    assert len(full) == 14 and rows == {(t, a, p) for t, a in expected for p in ("cls", "gem")}
    for cfg in full:
        assert cfg.k == 32 and cfg.report.table == "finetune"
        if cfg.train.name != "none":
            assert (cfg.train.lr, cfg.train.epochs, cfg.train.neck) == (1e-5, 30, "none")
    smoke = jobs("finetune_smoke")
    single = {(t, a) for t, a in LOSS_ROWS if a == "single_crop"} | {("none", None)}
    assert {(c.train.name, c.train.get("augment")) for c in smoke} == single
    assert all(c.train.neck == "bn" for c in smoke if c.train.name != "none")


@pytest.mark.slow
def test_the_finetune_table_in_miniature_runs_offline(tmp_path: Path):
    """`-m experiment=finetune_smoke`: 8 jobs, one fine-tuning per loss (each checkpoint
    evaluated with CLS and GeM), and a report with the frozen row and every loss side by side."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CRATERLAB_CACHE": str(tmp_path / "cache")}
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "craterlab", "-m", "experiment=finetune_smoke"]
    cmd += ["report.page_queries=0", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    cmd += [f"hydra.sweep.dir={sweep_dir}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoints = list((tmp_path / "outputs" / "finetune").glob("*/model.pt"))
    assert len(checkpoints) == 3  # one per loss, shared by its CLS and GeM jobs
    table = (sweep_dir / "report" / "table.md").read_text().splitlines()
    assert table[2].startswith("| train | augment | weights | cls R@1 | cls mAP | gem R@1")
    assert table[2].endswith("| LI K=8 R@1 | LI K=8 mAP |")
    body = [line.split(" | ")[:3] for line in table[4:8]]
    tuned = [[f"| {loss}", "single_crop", "[random + fine-tuned weights]"] for loss in LOSSES]
    assert body == [["| none", "-", "[random weights]"], *tuned]
    assert all("—" not in line for line in table[4:8])  # every cell filled


@pytest.mark.slow
def test_a_preset_sweep_runs_offline_and_reports(tmp_path: Path):
    """headline_k16 on the tiny synthetic set, tracked; then `report` on the dir and on MLflow."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CRATERLAB_CACHE": str(tmp_path / "cache")}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "craterlab", "-m", "experiment=headline_k16"]
    cmd += ["dataset=synthetic", "dataset.size=tiny", "report.page_queries=2"]
    cmd += [f"tracking.uri={uri}", "tracking.timeout_s=120", f"hydra.sweep.dir={sweep_dir}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for job in ("0", "1"):
        assert (sweep_dir / job / "results.json").is_file()
        assert (sweep_dir / job / "results.html").is_file()
    table = (sweep_dir / "report" / "table.md").read_text()  # written by the sweep callback
    assert "0.444" in table and "0.623" in table and "[random weights]" in table

    report = [sys.executable, "-m", "craterlab", "report"]
    by_dir = subprocess.run(
        [*report, str(sweep_dir), "--out", str(tmp_path / "r1")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert by_dir.returncode == 0, by_dir.stderr[-3000:]
    assert (tmp_path / "r1" / "table.csv").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("craterlab")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("craterlab.role") == "sweep")
    children = {r.info.run_name for r in runs if r.data.tags.get("craterlab.role") != "sweep"}
    assert children == {"method=raw_selection", "method=instance_tokens"}
    assert parent.info.run_name == "headline_k16: tokens (2 runs)"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {
        "report/table.md",
        "report/table.csv",
    }
    by_run = subprocess.run(
        [*report, parent.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "r2")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert by_run.returncode == 0, by_run.stderr[-3000:]
    rows = (tmp_path / "r2" / "table.csv").read_text().splitlines()
    assert len(rows) == 3 and "0.623" in "".join(rows)
    missing = subprocess.run(
        [*report, "no-such-experiment", "--tracking-uri", uri],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert missing.returncode == 2 and "neither a directory" in missing.stderr
