"""Hostile numbers: a backbone that outputs NaN stops the run with the stage and the count of
images, NaN scores stop it, degenerate features are warned about, and bad run settings fail
before any image is encoded (a cache hit included)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import CONF, TINY
from hydra import compose, initialize_config_dir

import craterlab.experiment as run_module
import craterlab.pipeline as pipeline
from craterlab.backbones.timm_backbone import TimmBackbone
from craterlab.checks import check_features, check_scores, check_tokens, nonfinite_rows
from craterlab.errors import ConfigError, CraterlabError
from craterlab.experiment import run
from craterlab.types import Features, Ranking, Tokens

FAST = [*TINY, "backbone.model=test_vit", "backbone.pretrained_tag=r160_in1k", "tracking=none"]


def config(tmp_path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[*FAST, f"output_dir={tmp_path / 'run'}", *overrides],
        )


def test_nan_from_the_backbone_stops_the_run_naming_stage_and_count(tmp_path, monkeypatch) -> None:
    real_encode = TimmBackbone.encode

    def encode_with_nan(self, images):  # the first image of every batch turns NaN
        feats = real_encode(self, images)
        tokens = feats.tokens.clone()
        tokens[0, 1] = float("nan")
        return Features(feats.cls, tokens, feats.attn, feats.grid)

    monkeypatch.setattr(TimmBackbone, "encode", encode_with_nan)
    cfg = config(tmp_path, "batch_size=1000", "cache.enabled=false")
    n_gallery = len(
        list(run_module.get_registry().build("dataset", cfg.dataset).records("gallery"))
    )
    with pytest.raises(CraterlabError) as exc_info:
        run(cfg)
    message = str(exc_info.value)
    assert "after feature extraction (backbone output)" in message
    assert f"1 of {n_gallery} gallery images are affected" in message
    assert "backbone.weights" in message


def test_nan_features_never_reach_the_feature_cache(tmp_path, monkeypatch) -> None:
    """With the cache on, the NaN batch stops extraction before it is written; the next run
    with a sound model resumes the same entry and every cached feature is finite."""
    real_encode = TimmBackbone.encode
    calls = {"n": 0}

    def nan_in_the_second_batch(self, images):
        feats = real_encode(self, images)
        calls["n"] += 1
        if calls["n"] == 2:
            feats = Features(feats.cls * float("nan"), feats.tokens, feats.attn, feats.grid)
        return feats

    monkeypatch.setattr(TimmBackbone, "encode", nan_in_the_second_batch)
    overrides = ("batch_size=4", f"cache.dir={tmp_path / 'cache'}")
    with pytest.raises(CraterlabError) as exc_info:
        run(config(tmp_path, *overrides))
    message = str(exc_info.value)
    assert "4 of the 4 gallery images 5-8" in message
    assert "Nothing of this batch was written to the feature cache" in message
    monkeypatch.setattr(TimmBackbone, "encode", real_encode)
    run(config(tmp_path, *overrides))  # resumes the entry, finishes
    from craterlab.cache import FeatureCache

    cache = FeatureCache(tmp_path / "cache")
    entries = [p.name for p in (tmp_path / "cache").glob("*gallery*") if p.is_dir()]
    assert len(entries) == 1
    feats = cache.load(entries[0], verify=True)
    assert feats is not None and nonfinite_rows(feats.cls, feats.tokens, feats.attn) == 0


def test_bad_settings_fail_before_extraction_even_on_a_cache_hit(tmp_path, monkeypatch) -> None:
    def no_extraction(*args, **kwargs):
        raise AssertionError("extraction started")

    monkeypatch.setattr(pipeline, "extract_features", no_extraction)
    for override in ("num_workers=-1", "batch_size=0", "seed=abc", "depth=0"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            run(config(tmp_path, override))


def test_nonfinite_checks_count_images_and_ignore_padding() -> None:
    tokens = torch.randn(5, 4, 3)
    tokens[1, 2, 0] = float("inf")
    tokens[3, 0, 1] = float("nan")
    assert nonfinite_rows(tokens) == 2
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[3, 0] = False  # that NaN sits in a padding slot
    assert nonfinite_rows(tokens, mask=mask) == 1
    with pytest.raises(CraterlabError, match="after tokens: 1 of 5 query images"):
        check_tokens(Tokens(tokens, mask), "query", "tokens")


def test_nan_scores_stop_the_run_but_minus_inf_padding_does_not() -> None:
    scores = torch.tensor([[0.9, 0.5, float("-inf")], [0.8, 0.1, 0.0]])
    check_scores(Ranking(torch.zeros(2, 3, dtype=torch.long), scores), "two_stage")
    scores[1, 1] = float("nan")
    with pytest.raises(CraterlabError, match="mode 'two_stage': 1 of 2 query images"):
        check_scores(Ranking(torch.zeros(2, 3, dtype=torch.long), scores), "two_stage")


def test_identical_features_are_warned_about(caplog) -> None:
    same = Features(torch.ones(6, 4), torch.ones(6, 3, 4), None, (1, 3))
    with caplog.at_level(logging.WARNING, logger="craterlab"):
        check_features(same, "gallery")
    assert "all 6 gallery images have identical values" in caplog.text
    caplog.clear()
    check_features(Features(torch.randn(6, 4), torch.ones(6, 3, 4), None, (1, 3)), "gallery")
    assert "identical" not in caplog.text
