"""Each experiment preset composes with the study's settings; a small one runs end to end."""

from __future__ import annotations

import functools
import math
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


@functools.cache
def jobs(name: str, *overrides: str) -> list:
    """Every job config of a preset's sweep (the grid, composed one by one); K only at its
    first value (the settings checked here do not depend on K)."""
    grid = [[]]
    for key, values in sweep(compose_preset(name, *overrides)).items():
        values = values[:1] if key == "k" else values
        grid = [g + [f"{key}={v}"] for g in grid for v in values]
    return [compose_preset(name, *overrides, *g) for g in grid]


def first_job(name: str, *overrides: str):
    """The config of a preset's first sweep point, as a job runs it (no hydra node)."""
    grid = sweep(compose_preset(name, *overrides))
    point = [f"{k}={v[0]}" for k, v in grid.items()]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", *overrides, *point])


# The presets, named as the paper numbers its tables and figures (conf/experiment/*.yaml).
PAPER_PRESETS = {
    "table2_backbones": "table2",
    "table3_aggregation": "table3",
    "table4_two_stage": "table4",
    "table5_backbones": "table5",
    "table6_pooling": "table6",
    "table7_cnn": "table7",
    "table8_selection": "table8",
    "table9_assignment_dino": "table9",
    "table10_assignment_marsdino": "table10",
    "table11_seeds": "table11",
    "table12_quantization": "table12",
    "table13_matching": "table13",
    "fig2_parameters": "fig2",
    "fig3_token_budget": "fig3",
    "fig4_storage": "fig4",
    "finetune": "finetune",
}
STUDY_K = ["4", "8", "16", "32", "64"]  # Tables 9, 10, 11 and 13


def test_one_preset_per_paper_table_and_figure_and_no_misnamed_ones():
    assert set(PAPER_PRESETS) <= set(PRESETS)
    assert {"smoke", "headline_k16", "deployment", "finetune_smoke"} <= set(PRESETS)
    assert not {"table9_seeds", "table10_assignment", "table11_k", "selection_vs_instance"} & set(
        PRESETS
    )
    for name, table in PAPER_PRESETS.items():
        assert compose_preset(name).report.table == table


@pytest.mark.parametrize("name", STUDY_PRESETS)
def test_preset_header_dataset_and_report_table(name: str):
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    header = text.split("defaults:")[0]
    assert any(w in header.lower() for w in ("table", "fig", "sec.", "headline")), "what it is"
    assert "python -m craterlab" in header
    cfg = compose_preset(name)
    assert cfg.dataset.name == "craterbench_r"
    assert cfg.report.table in LAYOUTS
    synthetic = compose_preset(name, "dataset=synthetic", "dataset.size=tiny")
    assert synthetic.dataset.name == "synthetic" and synthetic.dataset.size == "tiny"


def study_settings_hold(cfg) -> None:
    """DINO rows: a CLS shortlist and FPS seeds; MarsDINO rows: GeM and attention seeds (where
    the preset does not sweep the seeds or the pooling itself)."""
    own = ("instance", "netvlad")  # Table 13's and Table 3's single vectors
    if cfg.backbone.name == "marsdino":
        assert cfg.pooling.name in ("gem", *own)
    elif cfg.backbone.get("pretrained_tag") == "dino" and "vit_small" in cfg.backbone.model:
        assert cfg.pooling.name in ("cls", *own)


TOKEN_PRESETS = [
    "headline_k16",
    "deployment",
    "fig3_token_budget",
    "fig4_storage",
    "table3_aggregation",
    "table4_two_stage",
    "table8_selection",
    "table12_quantization",
]


@pytest.mark.parametrize("name", TOKEN_PRESETS)
def test_every_job_uses_the_study_settings(name: str):
    for cfg in jobs(name):
        study_settings_hold(cfg)
        if cfg.aggregator.name == "instance":
            fps = cfg.backbone.name != "marsdino"
            assert cfg.aggregator.seeds == ("fps" if fps else "attention")


def test_fig3_uses_the_papers_k_grid_on_both_backbones():
    grid = sweep(compose_preset("fig3_token_budget"))
    assert grid["k"] == ["1", "16", "36", "64", "100", "144", "196"]
    assert grid["recipe"] == ["dino", "marsdino"]
    methods = {
        (c.backbone.name, c.selector.name, c.aggregator.name, c.aggregator.get("seeds"))
        for c in jobs("fig3_token_budget")
    }
    assert methods == {
        ("timm_vit", "attention", "none", None),
        ("timm_vit", "random", "none", None),
        ("timm_vit", "attention", "instance", "fps"),
        ("marsdino", "attention", "none", None),
        ("marsdino", "random", "none", None),
        ("marsdino", "attention", "instance", "attention"),
    }
    assert compose_preset("fig3_token_budget").retrieval.stages.keys() == {"exhaustive"}
    rows = {(c.aggregator.name, c.aggregator.get("seeds")) for c in jobs("headline_k16")}
    assert rows == {("none", None), ("instance", "fps")}


def test_two_stage_and_quantization_on_both_backbones():
    table4 = compose_preset("table4_two_stage")
    assert sweep(table4)["shortlist"] == ["50", "100", "200", "500"]
    assert sweep(table4)["recipe"] == ["dino", "marsdino"]
    assert set(table4.retrieval.stages) == {"single", "exhaustive", "two_stage"}
    assert table4.k == 32 and table4.quantizer.name == "fp32"
    table12 = sweep(compose_preset("table12_quantization"))
    assert table12["quantizer"] == ["fp32", "fp16", "int8", "pq96", "pq48"]
    assert table12["recipe"] == ["dino", "marsdino"]
    assert compose_preset("table12_quantization").k == 32
    deployment = compose_preset("deployment")
    assert deployment.quantizer.name == "int8" and deployment.pooling.name == "cls"


def test_aggregation_baselines_table3_and_fig4():
    table3 = {
        (c.backbone.name, c.pooling.name, c.aggregator.name, tuple(c.retrieval.stages))
        for c in jobs("table3_aggregation")
    }
    assert ("timm_vit", "netvlad", "none", ("single",)) in table3
    assert ("marsdino", "netvlad", "none", ("single",)) in table3
    assert {a for _, _, a, _ in table3} == {"none", "vlad", "kmeans", "medoids", "instance"}
    assert sweep(compose_preset("table3_aggregation"))["k"] == ["16", "64"]
    assert sweep(compose_preset("fig4_storage"))["k"] == ["16", "32", "64"]
    stages = compose_preset("fig4_storage").retrieval.stages
    assert set(stages) == {"single", "exhaustive"}


def test_single_vector_tables_have_no_token_method_so_cnns_run():
    backbones = options("backbone")
    cnns = {b for b in backbones if "timm_cnn" in (CONF / "backbone" / f"{b}.yaml").read_text()}
    table5 = sweep(compose_preset("table5_backbones"))
    assert set(table5["backbone"]) == backbones and len(backbones) == 30
    assert table5["pooling"] == ["cls", "mean", "max", "gem"]
    assert sweep(compose_preset("fig2_parameters")) == table5
    table2 = sweep(compose_preset("table2_backbones"))["backbone"]
    assert len(table2) == 11 and {"efficientnet_b0", "resnet50", "marsdino_b"} <= set(table2)
    assert set(sweep(compose_preset("table6_pooling"))["backbone"]) == backbones - cnns
    table7 = sweep(compose_preset("table7_cnn"))
    assert set(table7["backbone"]) == cnns and table7["pooling"] == ["mean", "gem"]
    for name in ("table2_backbones", "table5_backbones", "fig2_parameters", "table6_pooling"):
        cfg = compose_preset(name)
        assert (cfg.selector.name, cfg.aggregator.name) == ("none", "none")
        assert set(cfg.retrieval.stages) == {"single"}
    for cfg in jobs("table7_cnn"):
        assert (cfg.selector.name, cfg.aggregator.name) == ("none", "none")


def test_selection_at_k64_on_both_backbones():
    cfg = compose_preset("table8_selection")
    assert cfg.k == 64 and cfg.aggregator.name == "none"
    grid = sweep(cfg)
    assert grid["recipe"] == ["dino", "marsdino"] and "k" not in grid
    assert grid["selector"] == [
        *("attention", "norm_attention", "norm", "random", "grid", "cls_similarity"),
        "cls_distance",
    ]


def test_assignment_seed_and_matching_tables_sweep_every_cell():
    cells = {(s, a) for s in ("attention", "fps") for a in ("hard", "soft2", "soft4", "dense")}
    for name, backbone in (
        ("table9_assignment_dino", "timm_vit"),
        ("table10_assignment_marsdino", "marsdino"),
    ):
        assert sweep(compose_preset(name))["k"] == STUDY_K
        found = {(c.aggregator.get("seeds"), c.aggregator.get("assign")) for c in jobs(name)}
        assert found == cells | {(None, None)}  # + the Raw column
        assert {c.backbone.name for c in jobs(name)} == {backbone}
    table11 = jobs("table11_seeds")
    assert {(c.aggregator.seeds, c.aggregator.assign) for c in table11} == cells
    assert {c.backbone.name for c in table11} == {"timm_vit", "marsdino"}
    assert sweep(compose_preset("table11_seeds"))["k"] == STUDY_K
    table13 = jobs("table13_matching")
    assert {c.aggregator.seeds for c in table13} == {"attention"}
    assert {c.aggregator.assign for c in table13} == {"hard", "soft2", "soft4", "dense"}
    for c in table13:  # the pooled vector is built from the very tokens that are matched
        assert (c.pooling.name, c.pooling.seeds, c.pooling.assign) == (
            "instance",
            c.aggregator.seeds,
            c.aggregator.assign,
        )
        assert set(c.retrieval.stages) == {"single", "exhaustive"}
    assert {c.pooling.reduce for c in table13} == {"mean", "max"}
    assert sweep(compose_preset("table13_matching"))["k"] == STUDY_K


def options(group: str) -> set[str]:
    return {p.stem for p in (CONF / group).glob("*.yaml")}


LOSSES = ("arcface", "late_interaction", "supcon", "triplet")
LOSS_ROWS = {(loss, f"{mode}_crop") for loss in LOSSES for mode in ("single", "multi")}


def test_finetune_rows_are_the_frozen_backbone_and_each_loss_and_crop_mode():
    """9 rows (frozen + 4 losses x 2 crop modes), each with CLS and GeM: no "frozen,
    multi-crop" duplicate; the study's recipe in the full preset, the CPU recipe in the smoke."""
    full = jobs("finetune")
    rows = {(c.train.name, c.train.get("augment"), c.pooling.name) for c in full}
    expected = {(t, a) for t, a in LOSS_ROWS} | {("none", None)}
    assert len(full) == 18 and rows == {(t, a, p) for t, a in expected for p in ("cls", "gem")}
    for cfg in full:  # the study: ViT-S/16 MarsDINO, every train identity, LI at K=32
        assert cfg.k == 32 and cfg.report.table == "finetune"
        assert (cfg.backbone.name, cfg.backbone.size) == ("marsdino", "s")
        assert cfg.train.val_fraction == 0.0 and cfg.aggregator.seeds == "attention"
        if cfg.train.name != "none":
            assert (cfg.train.lr, cfg.train.epochs, cfg.train.neck) == (1e-5, 30, "none")
    smoke = jobs("finetune_smoke")
    single = {(t, a) for t, a in LOSS_ROWS if a == "single_crop"} | {("none", None)}
    assert {(c.train.name, c.train.get("augment")) for c in smoke} == single
    assert all(c.train.neck == "bn" for c in smoke if c.train.name != "none")


@pytest.mark.slow
def test_the_finetune_table_in_miniature_runs_offline(tmp_path: Path):
    """`-m experiment=finetune_smoke`: 10 jobs, one fine-tuning per loss (each checkpoint
    evaluated with CLS and GeM), and a report with the frozen row and every loss side by side."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CRATERLAB_CACHE": str(tmp_path / "cache")}
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "craterlab", "-m", "experiment=finetune_smoke"]
    cmd += ["report.page_queries=0", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    cmd += [f"hydra.sweep.dir={sweep_dir}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoints = list((tmp_path / "outputs" / "finetune").glob("*/model.pt"))
    assert len(checkpoints) == 4  # one per loss, shared by its CLS and GeM jobs
    table = (sweep_dir / "report" / "table.md").read_text().splitlines()
    assert table[2].startswith("| train | augment | weights | cls R@1 | cls mAP | gem R@1")
    assert table[2].endswith("| LI K=8 R@1 | LI K=8 mAP |")
    body = [line.split(" | ")[:3] for line in table[4:9]]
    tuned = [[f"| {loss}", "single_crop", "[random + fine-tuned weights]"] for loss in LOSSES]
    assert body == [["| none", "-", "[random weights]"], *tuned]
    assert all("—" not in line for line in table[4:9])  # every cell filled


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


MINIATURE = [*PAPER_PRESETS, "headline_k16", "deployment"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MINIATURE)
def test_each_preset_runs_offline_in_miniature(name: str, tmp_path: Path, monkeypatch):
    """The first job of each preset's sweep on the tiny synthetic set, with untrained weights
    (offline): CNN backbones (Tables 2, 5, 7, Fig 2 start with one) included."""
    from craterlab.experiment import run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny = ["dataset=synthetic", "dataset.size=tiny", "tracking=none", "report.page_queries=1"]
    cfg = first_job(name, *tiny, f"output_dir={tmp_path}")
    result = run(cfg)
    assert set(result.results) == set(cfg.retrieval.stages)
    for mode, metrics in result.results.items():
        assert 0.0 <= metrics["mAP"] <= 1.0 and not math.isnan(metrics["R@1"]), mode
    assert (tmp_path / "results.json").is_file()
