"""precision=auto's bf16 probe: decided by measurement, cached per machine, skipped without bf16."""

from __future__ import annotations

import json
import math

import pytest

from craterlab import precision_probe as P

WITH_BF16 = frozenset({"avx512f", "avx512_bf16"})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "probe.json"
    monkeypatch.setenv("CRATERLAB_PROBE_CACHE", str(path))
    P._cached_probe.cache_clear()
    yield path
    P._cached_probe.cache_clear()


def test_no_bf16_arithmetic_means_no_probe(cache, monkeypatch) -> None:
    monkeypatch.setattr(P, "measure", lambda: pytest.fail("probe ran on a CPU without bf16"))
    assert P.bf16_pays(frozenset({"avx2", "fma"})) is None
    assert not cache.exists()


def test_verdict_follows_the_measured_speedup(cache, monkeypatch) -> None:
    monkeypatch.setattr(P, "measure", lambda: (30.0, 15.0))
    fast = P.probe(WITH_BF16)
    assert fast.choice == "bf16" and fast.speedup == pytest.approx(2.0)
    cache.unlink()
    monkeypatch.setattr(P, "measure", lambda: (10.0, 10.0 / (P.MIN_SPEEDUP - 0.01)))
    assert P.probe(WITH_BF16).choice == "fp32"


def test_verdict_is_cached_per_machine_and_logged(cache, monkeypatch, caplog) -> None:
    monkeypatch.setattr(P, "measure", lambda: (30.0, 15.0))
    with caplog.at_level("INFO", logger="craterlab.precision_probe"):
        first = P.probe(WITH_BF16)
    assert "precision=auto -> bf16" in caplog.text and "measured now" in caplog.text
    stored = json.loads(cache.read_text())
    assert list(stored) == [P.machine_key(WITH_BF16)]
    assert stored[first.machine]["choice"] == "bf16"
    monkeypatch.setattr(P, "measure", lambda: pytest.fail("a cached verdict was re-measured"))
    caplog.clear()
    with caplog.at_level("INFO", logger="craterlab.precision_probe"):
        assert P.probe(WITH_BF16) == first
    assert "cached in" in caplog.text
    # another machine (here: other flags) gets its own entry
    assert P.machine_key(WITH_BF16 | {"amx_bf16"}) != first.machine


def test_a_damaged_or_unwritable_cache_only_costs_a_new_measurement(tmp_path, monkeypatch) -> None:
    damaged = tmp_path / "probe.json"
    damaged.write_text("{not json")
    monkeypatch.setenv("CRATERLAB_PROBE_CACHE", str(damaged))
    monkeypatch.setattr(P, "measure", lambda: (30.0, 15.0))
    assert P.probe(WITH_BF16).choice == "bf16"
    assert json.loads(damaged.read_text())  # rewritten whole
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("CRATERLAB_PROBE_CACHE", str(blocker / "sub" / "probe.json"))
    assert P.probe(WITH_BF16).choice == "bf16"


def test_the_real_measurement_times_both_precisions() -> None:
    fp32_ms, bf16_ms = P.measure(repeats=1)
    assert all(math.isfinite(t) and t > 0 for t in (fp32_ms, bf16_ms))
