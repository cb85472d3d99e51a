"""The study tables put each paper number in its own row: every key field must match, per
mode, and runs that cannot be compared (untrained weights, another dataset) say so."""

from __future__ import annotations

import pytest

from craterlab.errors import CraterlabError
from craterlab.report.runs import RunRecord
from craterlab.report.tables import LAYOUTS, build_table, to_csv, to_markdown

DINO = {
    "backbone.name": "timm_vit",
    "backbone.model": "vit_small_patch16_224",
    "backbone.pretrained_tag": "dino",
}
MARS = {"backbone.name": "marsdino", "backbone.size": "s"}
MARS_B = {"backbone.name": "marsdino", "backbone.size": "b"}
TRAINED = "pretrained (hub)"


def cfg(backbone: dict, **kw) -> dict[str, str]:
    base = {
        **backbone,
        "pooling.name": "cls",
        "selector.name": "attention",
        "aggregator.name": "instance",
        "aggregator.seeds": "fps",
        "aggregator.assign": "hard",
        "k": "32",
        "quantizer.name": "fp32",
        "shortlist": "100",
        "train.name": "none",
        "dataset.name": "craterbench_r",
    }
    base.update({k.replace("__", "."): str(v) for k, v in kw.items()})
    return base


def run(name: str, config: dict, weights: str = TRAINED, **results) -> RunRecord:
    return RunRecord(name, config, results, weights=weights)


def rows_by(table, *fields):
    return {tuple(r[f] for f in fields): r for r in table.rows}


def test_table4_rows_stage1_rerank_per_s_and_full_li_with_their_own_numbers():
    m = {"R@1": 0.3, "mAP": 0.4, "R@S": 0.5, "ms_per_query": 1.0}
    runs = []
    for s in (50, 100):
        runs.append(
            run(f"d{s}", cfg(DINO, shortlist=s), single=m, two_stage=m, exhaustive=m),
        )
        mars = cfg(MARS, shortlist=s, pooling__name="gem", aggregator__seeds="attention")
        runs.append(run(f"m{s}", mars, single=m, two_stage=m, exhaustive=m))
    table = build_table(runs, LAYOUTS["table4"], "table4")
    assert table.label_fields == ["backbone", "shortlist", "mode"]
    rows = rows_by(table, "backbone", "shortlist", "mode")
    assert len(rows) == 2 * (1 + 2 + 1)  # stage 1 once, S=50 and 100, full LI once
    dino = "vit_small_patch16_224.dino"
    assert rows[(dino, "-", "single")]["ms_per_query paper"] == "0.600"
    assert rows[(dino, "-", "single")]["mAP paper"] == "0.422"  # Table 4's own stage-1 cell
    assert rows[(dino, "100", "two_stage")]["ms_per_query paper"] == "3.600"
    assert rows[(dino, "100", "two_stage")]["R@1 paper"] == "0.463"
    assert rows[("marsdino_s", "100", "two_stage")]["ms_per_query paper"] == "3.400"
    assert rows[("marsdino_s", "50", "two_stage")]["R@S paper"] == "0.472"
    assert rows[(dino, "-", "exhaustive")]["mAP paper"] == "0.726"
    assert rows[("marsdino_s", "-", "exhaustive")]["R@1 paper"] == "0.415"
    assert rows[(dino, "100", "two_stage")]["mAP_recovered paper"] is None  # no per-run range


def test_table6_each_pooling_row_gets_its_pooling():
    runs = [
        run(p, cfg(MARS_B, pooling__name=p), single={"R@1": 0.1, "mAP": 0.2})
        for p in ("cls", "mean", "max", "gem")
    ]
    table = build_table(runs, LAYOUTS["table6"], "table6")
    got = {r["pooling"]: (r["R@1 paper"], r["mAP paper"]) for r in table.rows}
    assert got == {
        "cls": ("0.374", "0.553"),
        "mean": ("0.369", "0.540"),
        "max": ("0.344", "0.511"),
        "gem": ("0.369", "0.544"),
    }


def test_table9_assignment_rows_and_the_better_seed_per_k():
    runs = []
    for assign, mAP in (("hard", 0.6), ("soft2", 0.5), ("soft4", 0.4), ("dense", 0.3)):
        for seeds, bonus in (("fps", 0.05), ("attention", 0.0)):
            config = cfg(DINO, k=16, aggregator__assign=assign, aggregator__seeds=seeds)
            runs.append(run(f"{assign}-{seeds}", config, exhaustive={"mAP": mAP + bonus}))
    raw = cfg(DINO, k=16, aggregator__name="none")
    runs.append(run("raw", raw, exhaustive={"mAP": 0.3, "R@1": 0.2}))
    table = build_table(runs, LAYOUTS["table9"], "table9")
    rows = {r["aggregator"] + "/" + r["assign"]: r for r in table.rows}
    assert len(rows) == 5
    assert rows["instance/hard"]["mAP paper"] == "0.623"
    assert rows["instance/soft2"]["mAP paper"] == "0.612"
    assert rows["instance/soft4"]["mAP paper"] == "0.582"
    assert rows["instance/dense"]["mAP paper"] == "0.457"
    assert rows["none/-"]["mAP paper"] == "0.444"
    assert all(r["seeds"] in ("fps", "-") for r in table.rows)  # the better seed was kept


def test_tables_12_and_13_and_best_assignment():
    runs = [
        run(q, cfg(MARS, quantizer__name=q, aggregator__seeds="attention"), exhaustive={"mAP": 0.5})
        for q in ("fp32", "int8")
    ]
    table = build_table(runs, LAYOUTS["table12"], "table12")
    assert {r["quantizer"]: r["mAP paper"] for r in table.rows} == {
        "fp32": "0.602",
        "int8": "0.602",
    }
    runs = []
    for assign, score in (("hard", 0.2), ("soft2", 0.3)):
        config = cfg(
            DINO, k=64, aggregator__seeds="attention", aggregator__assign=assign,
            pooling__name="instance", pooling__reduce="mean", pooling__seeds="attention",
            pooling__assign=assign,
        )  # fmt: skip
        runs.append(run(assign, config, exhaustive={"mAP": score}, single={"mAP": score / 2}))
    table = build_table(runs, LAYOUTS["table13"], "table13")
    rows = rows_by(table, "mode")
    assert rows[("exhaustive",)]["mAP paper"] == "0.734" and rows[("exhaustive",)]["run"] == "soft2"
    assert (
        rows[("single",)]["mAP paper"] == "0.322"
        and rows[("single",)]["pooling"] == "instance_mean"
    )


def test_untrained_and_other_datasets_keep_the_paper_column_but_say_not_comparable():
    runs = [
        run("ok", cfg(DINO, k=16), exhaustive={"mAP": 0.6}),
        run("rand", cfg(DINO, k=16, aggregator__assign="soft2"), "random (offline)",
            exhaustive={"mAP": 0.5}),
        run("syn", cfg(DINO, k=16, aggregator__assign="soft4", dataset__name="synthetic",
                       dataset__size="tiny"), exhaustive={"mAP": 0.5}),
    ]  # fmt: skip
    table = build_table(runs, LAYOUTS["table9"], "table9")
    rows = {r["run"]: r for r in table.rows}
    assert table.label_fields[0] == "dataset"  # two datasets: never one row
    assert rows["ok"]["comparable"] and not rows["rand"]["comparable"]
    assert not rows["syn"]["comparable"] and rows["syn"]["mAP paper"] == "0.582"
    markdown = to_markdown(table)
    assert "(not comparable)" in markdown and "-0.023 |" in markdown
    assert "synthetic-tiny" in markdown
    assert to_csv(table).splitlines()[0].endswith(",comparable,run")


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_layout_builds_from_an_empty_and_a_one_run_sweep(name: str):
    one = run("one", cfg(DINO), single={"mAP": 0.1}, exhaustive={"mAP": 0.2})
    assert build_table([], LAYOUTS[name], name).rows == []
    assert len(build_table([one], LAYOUTS[name], name).rows) >= 1


def test_fig3_lines_never_join_datasets_or_weights_and_carry_intervals(tmp_path):
    from craterlab.report.figures import k_series, map_vs_k

    def point(k, dataset, weights, m):
        config = cfg(DINO, k=k, dataset__name=dataset, dataset__size="tiny")
        metrics = {"mAP": m, "mAP_ci_low": m - 0.05, "mAP_ci_high": m + 0.05}
        return run(f"{dataset}{k}{weights}", config, weights, exhaustive=metrics)

    runs = [point(8, "synthetic", TRAINED, 0.2), point(16, "synthetic", TRAINED, 0.3)]
    runs += [point(32, "other", TRAINED, 0.4), point(16, "synthetic", "random (offline)", 0.1)]
    series = k_series(runs)
    assert len(series) == 3  # synthetic trained (K=8, 16), other, synthetic untrained
    joined = next(
        pts for label, pts in series.items() if "synthetic-tiny" in label and "pre" in label
    )
    assert sorted(p[0] for p in joined) == [8.0, 16.0]
    assert all(p[3] == pytest.approx(p[1] - 0.05) for pts in series.values() for p in pts)
    assert [p.suffix for p in map_vs_k(runs, tmp_path)] == [".png", ".svg"]


def log_run(client, experiment: str, name: str, dataset: str, size: str, mAP: float) -> None:
    run_ = client.create_run(experiment, run_name=name, tags={"craterlab.weights": "random (x)"})
    rid = run_.info.run_id
    for key, value in {**cfg(DINO, k=16), "dataset.name": dataset, "dataset.size": size}.items():
        client.log_param(rid, key, value)
    client.log_metric(rid, "exhaustive/mAP", mAP)
    client.set_terminated(rid, "FINISHED")


def test_report_on_an_experiment_from_any_directory_keeps_datasets_apart(
    tmp_path, monkeypatch, capsys
):
    """`report craterlab` from a subfolder of the project, beside a folder named craterlab:
    the store is found upward, the folder (no runs in it) is not taken for a sweep, and runs
    of two datasets are two rows; --dataset keeps one."""
    from mlflow.tracking import MlflowClient

    from craterlab.commands.report import main

    store = tmp_path / "outputs" / "mlflow.db"
    store.parent.mkdir()
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.create_experiment("craterlab", (tmp_path / "art").as_uri())
    log_run(client, experiment, "tiny", "synthetic", "tiny", 0.9)
    log_run(client, experiment, "small", "synthetic", "small", 0.3)
    (tmp_path / "craterlab").mkdir()  # the package folder of a checkout
    (tmp_path / "docs").mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["craterlab", "--out", str(tmp_path / "r1")]) == 0
    monkeypatch.chdir(tmp_path / "docs")
    assert main(["craterlab", "--out", str(tmp_path / "r2")]) == 0
    table = (tmp_path / "r2" / "table.md").read_text()
    assert table == (tmp_path / "r1" / "table.md").read_text()
    assert "| dataset |" in table and "synthetic-tiny" in table and "synthetic-small" in table
    assert main(["craterlab", "--dataset", "synthetic-small", "--out", str(tmp_path / "r3")]) == 0
    assert "synthetic-tiny" not in (tmp_path / "r3" / "table.csv").read_text()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'missing.db'}")
    with pytest.raises(CraterlabError, match="no MLflow store at"):
        main(["craterlab", "--out", str(tmp_path / "r4")])
