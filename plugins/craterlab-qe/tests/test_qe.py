"""Tests of the alpha-QE stage, runnable from this folder once the package is installed."""

from __future__ import annotations

import pytest
import torch
from craterlab_qe import AlphaQE

import craterlab
from craterlab.errors import ConfigError
from craterlab.testing import TINY_OVERRIDES, check_component, compose_config, retrieval_inputs


def test_registered_through_entry_point(craterlab_registry) -> None:
    assert craterlab_registry.get("stage", "qe").plugin == "qe"


def test_keeps_the_stage_contract() -> None:
    check_component("stage", "qe")  # config: conf/retrieval/qe.yaml with shortlist=3
    check_component("stage", "qe", {"shortlist": 20, "n": 1, "alpha": 0.0})


@pytest.mark.parametrize(("n", "alpha"), [(1, 1.0), (3, 3.0), (5, 0.0)])
def test_scores_equal_the_alpha_qe_formula(craterlab_registry, n: int, alpha: float) -> None:
    inputs = retrieval_inputs(craterlab_registry, nq=4, ng=20, depth=10)
    ranking = AlphaQE(n=n, alpha=alpha, shortlist=20).search(inputs)
    gallery = inputs.gallery_store.decode()
    s = inputs.matcher.score(inputs.query_tokens, gallery)  # (Nq, Ng), the whole gallery
    s_gg = inputs.matcher.score(gallery, gallery)  # (Ng, Ng)
    for qi in range(4):
        top = s[qi].argsort(descending=True)[:n]  # two-stage with S = Ng: exact top-n
        w = s[qi, top].clamp(min=0) ** alpha
        expected = (s[qi] + (w[:, None] * s_gg[top]).sum(0)) / (1 + w.sum())
        ids = ranking.indices[qi]
        torch.testing.assert_close(ranking.scores[qi], expected[ids], atol=1e-5, rtol=1e-4)
        assert (ranking.scores[qi, :-1] >= ranking.scores[qi, 1:]).all()  # sorted by s'
        assert set(ids.tolist()) == set(s[qi].topk(10).indices.tolist())  # two-stage's top 10


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="need n >= 1"):
        craterlab.build("stage", {"name": "qe", "n": 0})


@pytest.mark.slow
def test_runs_beside_two_stage_in_an_experiment(tmp_path) -> None:
    cfg = compose_config(*TINY_OVERRIDES, "retrieval=qe", f"output_dir={tmp_path}")
    results = craterlab.run(cfg).results
    assert set(results) == {"two_stage", "qe"}
    assert 0.0 <= results["qe"]["mAP"] <= 1.0 and "R@S" in results["qe"]
