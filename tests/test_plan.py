"""The budget planner: the Pareto front equals a brute-force one, the best configuration within
a budget is chosen by mAP, and `plan` reads measured runs from an MLflow store and prints the
command line that runs the choice."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from craterlab.commands.plan import main
from craterlab.errors import CraterlabError
from craterlab.sweeps.plan import Candidate, best_within, pareto_front
from craterlab.sweeps.resume import OVERRIDES_TAG


def candidate(i: int, m: float, b: float, t: float) -> Candidate:
    return Candidate(f"r{i}", "two_stage", m, b, t, {}, [])


def test_pareto_front_matches_a_brute_force_check() -> None:
    rng = random.Random(0)
    points = [
        candidate(i, rng.choice([0.1, 0.2, 0.3, 0.4]), rng.choice([64, 128, 256]), rng.random())
        for i in range(60)
    ]
    front = pareto_front(points)
    for c in points:  # on the front <=> nothing is at least as good everywhere, better somewhere
        beaten = any(
            o.map >= c.map
            and o.bytes_per_image <= c.bytes_per_image
            and o.ms_per_query <= c.ms_per_query
            and (o.map, -o.bytes_per_image, -o.ms_per_query)
            != (c.map, -c.bytes_per_image, -c.ms_per_query)
            for o in points
        )
        assert (c in front) == (not beaten)
    assert [c.map for c in front] == sorted((c.map for c in front), reverse=True)


def test_best_within_budget_takes_the_highest_map_then_fewer_bytes() -> None:
    a, b, c = candidate(0, 0.5, 4096, 2.0), candidate(1, 0.4, 512, 0.5), candidate(2, 0.4, 256, 0.9)
    assert best_within([a, b, c], 10_000, 10) is a
    assert best_within([a, b, c], 1024, 10) is c  # mAP tie: fewer bytes
    assert best_within([a, b, c], 1024, 0.6) is b
    assert best_within([a, b, c], 100, 10) is None


def test_the_command_keeps_the_jobs_settings_and_sets_the_mode() -> None:
    c = Candidate(
        "r", "two_stage", 0.5, 1, 1, {},
        ["k=16", "quantizer=int8", "retrieval=all", "tracking.uri=sqlite:///x.db",
         "hydra.sweep.dir=/tmp/s", "shortlist=50", "dataset.root=/data/my crater"],
    )  # fmt: skip
    assert c.command() == (
        "python -m craterlab k=16 quantizer=int8 shortlist=50 'dataset.root=/data/my crater' "
        "retrieval=two_stage"
    )


@pytest.fixture
def store(tmp_path):
    """A store with four measured runs (K x quantizer) and a sweep parent run."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("craterlab", (tmp_path / "art").as_uri())
    parent = client.create_run(experiment, tags={"craterlab.role": "sweep"})
    client.log_metric(parent.info.run_id, "single/mAP", 0.99)
    client.set_terminated(parent.info.run_id, "FINISHED")
    measured = {  # (k, quantizer): (mAP two_stage, bytes, ms); single: mAP/2, 1536 bytes, 0.01 ms
        (16, "fp32"): (0.60, 25_000, 1.3),
        (16, "int8"): (0.59, 7_000, 0.8),
        (32, "fp32"): (0.66, 50_000, 1.6),
        (32, "int8"): (0.65, 13_000, 1.2),
    }
    for (k, q), (m, b, t) in measured.items():
        overrides = [f"k={k}", f"quantizer={q}", "retrieval=all", f"tracking.uri={uri}"]
        run = client.create_run(experiment, tags={OVERRIDES_TAG: json.dumps(overrides)})
        rid = run.info.run_id
        for key, value in (("k", k), ("quantizer.name", q), ("shortlist", 100)):
            client.log_param(rid, key, value)
        client.log_param(rid, "aggregator.name", "instance")
        for name, value in {
            "two_stage/mAP": m, "two_stage/bytes_per_image": b, "two_stage/ms_per_query": t,
            "single/mAP": m / 2, "single/bytes_per_image": 1536, "single/ms_per_query": 0.01,
        }.items():  # fmt: skip
            client.log_metric(rid, name, value)
        client.set_terminated(rid, "FINISHED")
    failed = client.create_run(experiment)
    client.log_metric(failed.info.run_id, "two_stage/mAP", 0.95)
    client.log_metric(failed.info.run_id, "two_stage/bytes_per_image", 10)
    client.log_metric(failed.info.run_id, "two_stage/ms_per_query", 0.001)
    client.set_terminated(failed.info.run_id, "FAILED")
    return uri


def test_plan_prints_the_front_and_the_best_command_within_budget(store, capsys) -> None:
    budget = ["--bytes-per-image", "15000", "--ms-per-query", "1.5"]
    assert main([*budget, "--tracking-uri", store]) == 0
    out = capsys.readouterr().out
    assert "8 measured configurations (4 runs)" in out  # the parent and the FAILED run ignored
    front = out.split("Pareto front")[1].split("Best within")[0]
    # dominated: 16/fp32 (16/int8 beats it) and 32/fp32 at 1.6 ms? no: it has the best mAP
    assert front.count("two_stage") == 3 and "0.6000" not in front
    assert front.count("single") == 1  # the four single modes tie on bytes/time: best mAP only
    best = out.split("Best within")[1]
    assert "0.6500" in best and "13000" in best
    assert best.strip().endswith("python -m craterlab k=32 quantizer=int8 retrieval=two_stage")


def test_plan_says_what_the_smallest_configuration_needs(store, capsys) -> None:
    assert main(["--bytes-per-image", "100", "--ms-per-query", "5", "--tracking-uri", store]) == 1
    assert "No measured configuration fits 100 bytes/image" in capsys.readouterr().out


def test_plan_without_a_store_says_how_to_get_one(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'none.db'}"
    with pytest.raises(CraterlabError, match="There is no MLflow store at"):
        main(["--bytes-per-image", "1", "--ms-per-query", "1", "--tracking-uri", uri])


def test_pareto_front_of_equal_points_keeps_them_all() -> None:
    same = [candidate(i, 0.5, 100, 1.0) for i in range(3)]
    assert pareto_front(same) == same
    assert all(not a.dominates(b) for a, b in itertools.permutations(same, 2))


def test_the_planner_knows_the_multi_vector_stages_and_residual_stores() -> None:
    from types import SimpleNamespace

    from craterlab.sweeps.plan import candidates_of_run

    metrics = {}
    for mode, (m, b, t) in {"muvera": (0.7, 9000, 3.0), "token_ivf": (0.72, 3400, 5.0)}.items():
        metrics |= {f"{mode}/mAP": m, f"{mode}/bytes_per_image": b, f"{mode}/ms_per_query": t}
    params = {"k": "32", "quantizer.name": "residual", "quantizer.nbits": "2", "shortlist": "100"}
    overrides = ["k=32", "quantizer=residual2", "retrieval=multivector"]
    run = SimpleNamespace(
        data=SimpleNamespace(
            metrics=metrics, params=params, tags={OVERRIDES_TAG: json.dumps(overrides)}
        ),
        info=SimpleNamespace(run_id="r", run_name=""),
    )
    found = {c.mode: c for c in candidates_of_run(run)}
    assert set(found) == {"muvera", "token_ivf"}
    best = best_within(list(found.values()), 4000, 10)
    assert best is found["token_ivf"] and best.setting["S"] == "100"
    assert best.setting["quantizer"] == "residual2"
    assert best.command() == "python -m craterlab k=32 quantizer=residual2 retrieval=token_ivf"


def add_run(uri: str, dataset: str, size: str | None, mAP: float, untrained: bool) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("craterlab").experiment_id
    tags = {OVERRIDES_TAG: json.dumps([f"dataset={dataset}"])}
    tags["craterlab.weights"] = "random (offline)" if untrained else "pretrained (hub)"
    run = client.create_run(experiment, tags=tags)
    rid = run.info.run_id
    client.log_param(rid, "dataset.name", dataset)
    if size:
        client.log_param(rid, "dataset.size", size)
    client.log_param(rid, "aggregator.name", "instance")
    for name, value in {
        "exhaustive/mAP": mAP, "exhaustive/bytes_per_image": 100, "exhaustive/ms_per_query": 0.1,
    }.items():  # fmt: skip
        client.log_metric(rid, name, value)
    client.set_terminated(rid, "FINISHED")


def test_plan_never_ranks_runs_of_different_datasets_together(tmp_path, capsys) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("craterlab", (tmp_path / "art").as_uri())
    add_run(uri, "synthetic", "tiny", 0.9, untrained=True)  # 48 images: a high mAP
    add_run(uri, "synthetic", "small", 0.3, untrained=True)
    add_run(uri, "craterbench_r", None, 0.5, untrained=False)
    budget = ["--bytes-per-image", "1000", "--ms-per-query", "1", "--tracking-uri", uri]
    assert main(budget) == 2  # refuses to choose across datasets
    out = capsys.readouterr().out
    assert "Best within" not in out and "Pass --dataset NAME" in out
    for name in ("craterbench_r", "synthetic-small", "synthetic-tiny"):
        assert f"Dataset {name} — Pareto front" in out
    tiny = out.split("Dataset synthetic-tiny")[1]
    assert "0.9000" in tiny and "untrained" in tiny and "0.5000" not in tiny
    assert "NOTE: weights 'untrained'" in out
    assert main([*budget, "--dataset", "craterbench_r"]) == 0
    best = capsys.readouterr().out.split("Best within")[1]
    assert "0.5000" in best and "craterbench_r" in best and "pretrained" in best
    with pytest.raises(CraterlabError, match="its runs are on: craterbench_r, synthetic-small"):
        main([*budget, "--dataset", "synthetic-medium"])
