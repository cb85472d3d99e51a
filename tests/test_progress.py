"""Sweep progress: the job count of a sweep, ``job i/N`` with elapsed and ETA from the state in
the sweep directory, and the summary table and CSV of what varied."""

from __future__ import annotations

import csv
import json
import re
import time

import pytest

from craterlab.sweeps.progress import (
    count_jobs,
    duration,
    end_of_sweep,
    job_finished,
    job_started,
    start_sweep,
    state_dir,
    swept_keys,
)

BASIC = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None}


@pytest.mark.parametrize(
    "overrides,params,expected",
    [
        (["k=16,32,64", "quantizer=fp32,int8", "seed=0"], None, 6),
        (["k=16"], None, 1),
        (["extract.shard=range(4)", "extract.num_shards=4"], None, 4),
        (["k=16,32"], {"quantizer": "fp32,int8,pq48"}, 6),
        (["k=16,32"], {"k": "8,16,32"}, 2),  # the command line wins over the preset's params
    ],
)
def test_count_jobs_of_the_basic_sweeper(overrides, params, expected) -> None:
    assert count_jobs(overrides, {**BASIC, "params": params}) == expected


def test_count_jobs_of_an_optimizing_sweeper_is_its_trials() -> None:
    assert (
        count_jobs(["k=int(interval(4,64))"], {"_target_": "x.OptunaSweeper", "n_trials": 20}) == 20
    )
    assert count_jobs(["k=interval(4,64)"], BASIC) is None  # not a discrete sweep


def test_swept_keys_are_the_ones_with_several_values() -> None:
    keys = swept_keys(["k=16,32", "seed=0", "retrieval=two_stage"], {"params": {"q": "a,b"}})
    assert keys == ["q", "k"]


def test_a_job_line_shows_the_swept_overrides(tmp_path, capsys) -> None:
    start_sweep(tmp_path, 6, ["k"])
    job_started(tmp_path, 2, ["tracking.uri=sqlite:///x.db", "k=16", "seed=0"])
    assert capsys.readouterr().out.splitlines()[-1] == "[sweep] job 3/6: k=16"


def test_job_lines_report_elapsed_and_eta_from_the_sweep_start(tmp_path) -> None:
    start_sweep(tmp_path, 4)
    state = json.loads((state_dir(tmp_path) / "sweep.json").read_text())
    state["started"] = time.time() - 100  # the sweep started 100 s ago
    (state_dir(tmp_path) / "sweep.json").write_text(json.dumps(state))
    run_dir = tmp_path / "0"
    run_dir.mkdir()
    line = job_finished(tmp_path, 0, ["k=16"], "finished", 95.0, run_dir)
    assert line.startswith("[sweep] job 1/4 finished in 95.0 s; 1/4 done, elapsed 1m40s, ETA ")
    eta = re.search(r"ETA (\d+)m(\d+)s", line)
    assert 299 <= int(eta[1]) * 60 + int(eta[2]) <= 302  # 100 s per job, 3 jobs to go
    line = job_finished(tmp_path, 1, ["k=32"], "finished", 5.0, run_dir)
    assert "2/4 done" in line


def test_the_summary_shows_what_varied_and_the_csv_holds_every_metric(tmp_path, capsys) -> None:
    start_sweep(tmp_path, 3)
    for num, (k, mAP) in enumerate([(16, 0.5), (32, 0.6), (64, 0.6)]):
        run_dir = tmp_path / str(num)
        run_dir.mkdir()
        results = {"results": {"single": {"mAP": mAP, "R@1": 0.4}}, "storage": {"b": 7.0}}
        (run_dir / "results.json").write_text(json.dumps(results))
        if num == 2:
            (run_dir / "skipped.json").write_text("{}")
        job_finished(tmp_path, num, [f"k={k}", "seed=0"], "finished", 1.0, run_dir)
    text = end_of_sweep(tmp_path)
    assert "Sweep done: 3/3 jobs ended (2 finished, 1 skipped)" in text
    assert "Resume: skipped 1 of 3 jobs" in text
    header = text.splitlines()[2].split()
    assert header == ["job", "status", "k", "seconds", "single/mAP"]  # R@1 and seed don't vary
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["k"] for r in rows] == ["16", "32", "64"]
    assert [r["single/R@1"] for r in rows] == ["0.4"] * 3 and rows[0]["storage/b"] == "7.0"
    assert [r["status"] for r in rows] == ["finished", "finished", "skipped"]


@pytest.mark.parametrize("seconds,text", [(5.2, "5s"), (65, "1m05s"), (3725, "1h02m05s")])
def test_duration(seconds, text) -> None:
    assert duration(seconds) == text
