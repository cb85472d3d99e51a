"""Reports: the paper's numbers, run records, paper-layout tables, figures and the CLI."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml

from craterlab.commands.report import main as report_main
from craterlab.errors import CraterlabError
from craterlab.report.build import sweep_name
from craterlab.report.figures import write_figures
from craterlab.report.runs import RunRecord, load_sweep_dir, run_view, unflatten_metrics
from craterlab.report.tables import (
    LAYOUTS,
    build_table,
    format_run_table,
    layout_for,
    to_csv,
    to_markdown,
)

CONF = Path(__file__).resolve().parent.parent / "conf"
DINO = {"backbone.name": "timm_vit", "backbone.model": "vit_small_patch16_224"}
DINO["backbone.pretrained_tag"] = "dino"


def config(**kw) -> dict[str, str]:
    """A flattened run config: DINO ViT-S/16, instance tokens (FPS), K=16, on CraterBench-R."""
    base = {
        **DINO,
        "pooling.name": "cls",
        "selector.name": "attention",
        "aggregator.name": "instance",
        "aggregator.seeds": "fps",
        "aggregator.assign": "hard",
        "k": "16",
        "quantizer.name": "fp32",
        "shortlist": "100",
        "train.name": "none",
        "dataset.name": "craterbench_r",
        "depth": "all",
    }
    base.update({key.replace("__", "."): str(v) for key, v in kw.items()})
    return base


def record(name="r", weights="pretrained (hub)", parameters=None, **results) -> RunRecord:
    cfg = results.pop("cfg", None) or config()
    return RunRecord(name, cfg, results, weights=weights, parameters=parameters)


# ------------------------------------------------------------------ run records


def test_run_view_and_metric_names():
    view = run_view(config(aggregator__name="none", selector__name="random"))
    assert view["tokens"] == "random selection" and view["seeds"] == "-"
    assert run_view(config())["tokens"] == "instance (fps)"
    assert run_view(config(quantizer__name="pq", quantizer__m=96))["quantizer"] == "pq96"
    assert run_view({"backbone.name": "marsdino", "backbone.size": "b"})["backbone"] == "marsdino_b"
    metrics = {"two_stage/R_at_1": 0.5, "two_stage/R_at_S": 0.9, "single/recall_at_10": 0.2}
    metrics.update({"storage/token_store_bytes": 1.0, "model/parameters": 2.0})
    assert unflatten_metrics(metrics) == {
        "two_stage": {"R@1": 0.5, "R@S": 0.9},
        "single": {"recall@10": 0.2},
    }


def test_format_run_table_marks_truncation_and_untrained_weights():
    results = {"exhaustive": {"R@1": 0.5, "mAP": 0.4, "depth": 100.0, "gallery_size": 500.0}}
    text = format_run_table(results, "random (offline)", "vit_s", "instance")
    assert "[random weights]" in text and "NOTE: untrained (random)" in text
    assert "top 100 of 500 gallery images" in text
    full = {"exhaustive": {**results["exhaustive"], "depth": 500.0}}
    full["exhaustive"].update({"mAP_ci_low": 0.35, "mAP_ci_high": 0.45})
    text = format_run_table(full, "pretrained (hub)", "vit_s", "instance")
    assert "truncated" not in text and "untrained" not in text and "[0.350, 0.450]" in text


# ------------------------------------------------------------------ tables


def test_best_pooling_layout_keeps_the_best_run_per_backbone():
    runs = [
        record("a", single={"mAP": 0.2, "R@1": 0.1}, cfg=config(pooling__name="cls")),
        record("b", single={"mAP": 0.5, "R@1": 0.3}, cfg=config(pooling__name="gem")),
        record("c", single={"mAP": 0.4, "R@1": 0.2}, cfg=config(pooling__name="mean")),
    ]
    table = build_table(runs, LAYOUTS["table2"])
    assert len(table.rows) == 1
    assert table.rows[0]["pooling"] == "gem" and table.rows[0]["mAP"] == 0.5


def test_paper_values_and_differences_sit_beside_ours():
    runs = [
        record("inst", exhaustive={"mAP": 0.60, "R@1": 0.5, "depth": 10, "gallery_size": 10}),
        record(
            "raw",
            exhaustive={"mAP": 0.45, "R@1": 0.4},
            cfg=config(aggregator__name="none"),
            weights="random (offline)",
        ),
    ]
    table = build_table(runs, layout_for("headline_k16", runs))
    rows = {r["tokens"]: r for r in table.rows}
    assert rows["instance (fps)"]["mAP paper"] == "0.623"
    assert rows["instance (fps)"]["mAP diff"] == pytest.approx(0.60 - 0.623)
    assert rows["attention selection"]["mAP diff"] == pytest.approx(0.45 - 0.444)
    assert rows["attention selection"]["weights"] == "[random weights]"
    assert rows["instance (fps)"]["R@1 paper"] == "0.425"  # Table 9 / 11, FPS, hard, K=16
    assert any("untrained" in n.lower() for n in table.notes)
    parsed = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert {r["tokens"] for r in parsed} == {"instance (fps)", "attention selection"}
    assert "mAP paper" in parsed[0] and "mAP diff" in parsed[0] and "run" in parsed[0]


def test_generic_layout_uses_what_the_sweep_varied_and_notes_other_datasets():
    runs = [
        record(f"k{k}", exhaustive={"mAP": 0.1 * k}, cfg=config(k=k, dataset__name="synthetic"))
        for k in (4, 8)
    ]
    table = build_table(runs, layout_for(None, runs))
    assert table.label_fields == ["k"] and [r["k"] for r in table.rows] == ["4", "8"]
    assert any("not CraterBench-R" in n for n in table.notes)
    assert sweep_name(runs, "fig3") == "fig3: k (2 runs)"


def test_finetune_table_puts_frozen_and_fine_tuned_runs_side_by_side():
    """The study's fine-tuning table: one row per (train, augment), CLS / GeM / LI K=32 in
    columns, the frozen backbone as a row; the CLS and GeM runs of one checkpoint share a
    row (their late-interaction numbers agree), and a disagreement is noted, not hidden."""

    def run(name, train, augment, pooling, single, li, weights="pretrained (hub)"):
        cfg = config(k=32, pooling__name=pooling, train__name=train, train__augment=augment)
        cfg["backbone.model"] = "test_vit"  # a backbone the paper has no numbers for
        results = {"single": {"mAP": single, "R@1": single / 2}, "exhaustive": {"mAP": li}}
        results["two_stage"] = {"mAP": 0.0}  # a mode the layout leaves out
        return record(name, weights=weights, cfg=cfg, **results)

    runs = [
        run("f-cls", "none", "single_crop", "cls", 0.30, 0.50),
        run("f-gem", "none", "multi_crop", "gem", 0.35, 0.50),  # augment means nothing frozen
        run("s-cls", "supcon", "single_crop", "cls", 0.40, 0.55, "random (offline)"),
        run("s-gem", "supcon", "single_crop", "gem", 0.45, 0.56, "random (offline)"),
    ]
    table = build_table(runs, layout_for("finetune", runs))
    assert table.label_fields == ["train", "augment"]
    assert table.metrics == [
        "cls R@1", "cls mAP", "gem R@1", "gem mAP", "LI K=32 R@1", "LI K=32 mAP"
    ]  # fmt: skip
    frozen, supcon = table.rows  # the frozen reference row first
    assert (frozen["train"], frozen["augment"]) == ("none", "-")
    assert (frozen["cls mAP"], frozen["gem mAP"], frozen["LI K=32 mAP"]) == (0.30, 0.35, 0.50)
    assert frozen["cls R@1"] == pytest.approx(0.15) and frozen["LI K=32 R@1"] is None
    assert frozen["run"] == "f-cls f-gem" and frozen["weights"] == "[pretrained weights]"
    assert (supcon["cls mAP"], supcon["gem mAP"], supcon["LI K=32 mAP"]) == (0.40, 0.45, 0.55)
    assert supcon["untrained"] and not frozen["untrained"]
    assert any("s-cls and s-gem differ on LI K=32 mAP" in n for n in table.notes)
    header = to_csv(table).splitlines()[0].split(",")
    assert "mAP 95% CI" not in header and "gem mAP paper" in header and "two_stage" not in header
    markdown = to_markdown(table).splitlines()  # no paper value anywhere: no empty columns
    assert markdown[2] == (
        "| train | augment | weights | cls R@1 | cls mAP | gem R@1 | gem mAP | LI K=32 R@1 "
        "| LI K=32 mAP |"
    )
    assert markdown[4].startswith("| none | - | [pretrained weights] | 0.150 | 0.300 |")


# ------------------------------------------------------------------ figures and the CLI


def fake_sweep(root: Path, n: int = 3) -> Path:
    """A multirun directory of n finished jobs varying K (what run() writes)."""
    for i, k in enumerate([4, 8, 16][:n]):
        job = root / str(i)
        job.mkdir(parents=True)
        cfg = {"k": k, "backbone": {"name": "timm_vit", "model": "vit_small_patch16_224"}}
        cfg.update({"aggregator": {"name": "instance", "seeds": "fps"}, "report": {"table": None}})
        cfg.update({"selector": {"name": "attention"}, "quantizer": {"name": "fp32"}})
        cfg.update({"dataset": {"name": "synthetic"}, "shortlist": 10 * (i + 1)})
        (job / "resolved_config.yaml").write_text(yaml.safe_dump(cfg))
        results = {
            "exhaustive": {"mAP": 0.2 + 0.1 * i, "R@1": 0.3, "bytes_per_image": 1536.0 * k},
            "two_stage": {"mAP": 0.2 + 0.05 * i, "R@S": 0.5 + 0.1 * i, "ms_per_query": 1.0 + i},
            "single": {"mAP": 0.1, "bytes_per_image": 1536.0},
        }
        summary = {"name": f"k={k}", "results": results, "weights": "random (offline)"}
        summary["parameters"] = 22e6
        (job / "results.json").write_text(json.dumps(summary))
    return root


def test_load_sweep_dir_and_its_errors(tmp_path: Path):
    records = load_sweep_dir(fake_sweep(tmp_path / "sweep"))
    assert [r.name for r in records] == ["k=4", "k=8", "k=16"] and records[0].untrained
    (tmp_path / "empty").mkdir()
    with pytest.raises(CraterlabError, match="holds no finished runs"):
        load_sweep_dir(tmp_path / "empty")


def test_figures_are_written_when_their_x_varies(tmp_path: Path):
    records = load_sweep_dir(fake_sweep(tmp_path / "sweep"))
    paths = write_figures(records, tmp_path / "figs")
    names = {p.name for p in paths}
    assert {"map_vs_k.png", "map_vs_k.svg", "map_vs_bytes.png", "shortlist.svg"} <= names
    assert "map_vs_parameters.png" not in names  # one backbone: nothing to plot
    assert all(p.stat().st_size > 1000 for p in paths)
    assert "random weights" in (tmp_path / "figs" / "map_vs_k.svg").read_text()
    one = {p.name for p in write_figures(records[:1], tmp_path / "one")}
    assert one == {"map_vs_bytes.png", "map_vs_bytes.svg"}  # its modes differ in bytes, not K


def test_report_command_on_a_multirun_dir(tmp_path: Path, capsys):
    sweep = fake_sweep(tmp_path / "sweep")
    assert report_main([str(sweep)]) == 0
    out = sweep / "report"
    assert (out / "table.md").is_file() and (out / "table.csv").is_file()
    assert (out / "map_vs_k.png").is_file()
    printed = capsys.readouterr().out
    assert "Sweep results" in printed and "k x shortlist (3 runs)" in printed
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CraterlabError, match="is a file"):
        report_main([str(tmp_path / "file.txt")])


def test_child_runs_are_named_by_what_the_sweep_varies(monkeypatch):
    from omegaconf import OmegaConf

    from craterlab.sweeps.report import announce_sweep, child_run_name, sweep_varied_keys

    config = OmegaConf.create(
        {
            "hydra": {
                "sweeper": {"params": {"method": "raw_selection,instance_tokens", "+x": "1,2"}},
                "overrides": {
                    "task": ["experiment=headline_k16", "k=16,32", "dataset=synthetic"]
                    + ["hydra.searchpath=[a,b]", "shortlist=range(10,30,10)", "y=[1,2]"]
                },
            }
        }
    )
    assert sweep_varied_keys(config) == ["method", "x", "k", "shortlist"]
    monkeypatch.delenv("CRATERLAB_SWEEP_VARIES", raising=False)
    job = ["experiment=headline_k16", "dataset=synthetic", "k=16", "method=raw_selection"]
    assert child_run_name(job) is None  # not in a sweep
    announce_sweep(config)
    assert child_run_name(job) == "k=16,method=raw_selection"
