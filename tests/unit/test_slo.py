"""SLO figures: TTFT attainment curve, length-aware TTFT SLO, TBT attainment, settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netkv import slo
from netkv.records import RecordWriter, empty_record, summarize
from netkv.slo import SloConfig, SloError
from tests.helpers.records import ok_record


def _rec(rid: str, ttft_ms: float, input_tokens: int = 1000, tbt_mean_ms: float | None = 10.0,
         tbt_p99_ms: float | None = 10.0) -> dict[str, Any]:
    rec = ok_record(rid, ttft_ms)
    rec.update(input_tokens=input_tokens, tbt_mean_ms=tbt_mean_ms, tbt_p99_ms=tbt_p99_ms)
    return rec


def _failed(rid: str) -> dict[str, Any]:
    rec = empty_record(rid, "stub", 0.0, 1000, 3)
    rec["reason"] = "transfer failed: reset"
    return rec


RECS = [_rec("L1", 100.0), _rec("L2", 300.0), _rec("L3", 1500.0), _rec("L4", 5000.0), _failed("L5")]


def test_attainment_curve_counts_failures_as_misses() -> None:
    curve = slo.ttft_attainment_curve(RECS, [250.0, 400.0, 2000.0, 10_000.0])
    assert curve == [(250.0, 1 / 5), (400.0, 2 / 5), (2000.0, 3 / 5), (10_000.0, 4 / 5)]
    assert slo.ttft_attainment(RECS, 300.0) == 2 / 5     # the threshold itself meets it
    assert slo.ttft_attainment([], 1.0) is None
    default = slo.ttft_attainment_curve(RECS)
    assert [t for t, _ in default] == list(slo.DEFAULT_TTFT_THRESHOLDS_MS)
    assert 2000.0 in slo.DEFAULT_TTFT_THRESHOLDS_MS    # the flat SLO is one point of the curve


@given(st.lists(st.floats(0, 1e5), max_size=30), st.lists(st.floats(1, 1e5), min_size=1, max_size=6, unique=True))
def test_curve_is_monotonic(ttfts: list[float], thresholds: list[float]) -> None:
    recs = [_rec(f"L{i}", t) for i, t in enumerate(ttfts)]
    fractions = [f for _, f in slo.ttft_attainment_curve(recs, sorted(thresholds))]
    if recs:
        assert fractions == sorted(fractions)  # type: ignore[type-var]
        assert all(0 <= f <= 1 for f in fractions)  # type: ignore[operator]


def test_length_aware_slo() -> None:
    assert slo.length_aware_ttft_slo_ms(10_000, 250.0, 0.2) == 250.0 + 2000.0
    recs = [_rec("L1", 2200.0, input_tokens=10_000),   # allowed 2250: met
            _rec("L2", 2200.0, input_tokens=1000),     # allowed 450: missed
            _rec("L3", 400.0, input_tokens=1000),      # allowed 450: met
            _failed("L4")]
    assert slo.length_aware_ttft_attainment(recs, 250.0, 0.2) == 2 / 4
    assert slo.length_aware_ttft_attainment(recs, 2500.0, 0.0) == 3 / 4  # flat 2.5 s
    assert slo.length_aware_ttft_attainment([]) is None
    # the defaults are the documented ones
    assert slo.length_aware_ttft_slo_ms(1000) == slo.DEFAULT_LENGTH_AWARE_FIXED_MS + \
        1000 * slo.DEFAULT_LENGTH_AWARE_PER_INPUT_TOKEN_MS


def test_tbt_attainment_mean_and_p99() -> None:
    recs = [_rec("L1", 1.0, tbt_mean_ms=50.0, tbt_p99_ms=150.0),
            _rec("L2", 1.0, tbt_mean_ms=120.0, tbt_p99_ms=130.0),
            _rec("L3", 1.0, tbt_mean_ms=None, tbt_p99_ms=None),   # one output token: no gap, met
            _failed("L4")]
    assert slo.tbt_attainment(recs, 100.0) == 2 / 4
    assert slo.tbt_attainment(recs, 100.0, "p99") == 1 / 4
    assert slo.tbt_attainment(recs, 140.0, "p99") == 2 / 4
    assert slo.tbt_attainment([], 100.0) is None
    with pytest.raises(SloError, match="stat must be one of mean, p99, got 'p50'"):
        slo.tbt_attainment(recs, 100.0, "p50")


def test_config_checks_and_round_trip() -> None:
    cfg = SloConfig.from_dict({"ttft_thresholds_ms": [500, 1000], "tbt_slo_ms": 50, "tbt_stat": "p99"})
    assert cfg.ttft_thresholds_ms == (500.0, 1000.0)
    assert SloConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad, fragment in [
        ({"ttft_threshold_ms": [1]}, "unknown SLO key 'ttft_threshold_ms'; known: ttft_thresholds_ms"),
        ({"ttft_thresholds_ms": []}, "ttft_thresholds_ms must be a non-empty list"),
        ({"ttft_thresholds_ms": "500"}, "ttft_thresholds_ms must be a non-empty list"),
        ({"ttft_thresholds_ms": [500, 250]}, "strictly increasing"),
        ({"ttft_thresholds_ms": [500, float("inf")]}, r"ttft_thresholds_ms\[1\] must be a finite number > 0"),
        ({"tbt_slo_ms": 0}, "tbt_slo_ms must be a finite number > 0"),
        ({"tbt_slo_ms": True}, "tbt_slo_ms must be a finite number > 0"),
        ({"length_aware_per_input_token_ms": -1}, "length_aware_per_input_token_ms must be a finite number >= 0"),
        ({"length_aware_fixed_ms": 0, "length_aware_per_input_token_ms": 0}, "cannot both be 0"),
    ]:
        with pytest.raises(SloError, match=fragment) as err:
            SloConfig.from_dict(bad)
        assert "\n" not in str(err.value)


def test_summary_carries_the_slo_figures(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    with RecordWriter(path) as writer:
        for rec in RECS:
            writer.write(rec)
    s = summarize(path, ttft_slo_ms=2000.0)
    assert s["slo"]["ttft_attainment_curve"][4] == [2000.0, s["ttft_slo_attainment"]]
    assert s["slo"]["settings"] == SloConfig().to_dict()
    assert s["slo"]["tbt_attainment"] == 4 / 5
    # 1000-token prompts are allowed 450 ms by default: only the 100 and 300 ms ones meet it
    assert s["slo"]["length_aware_ttft_attainment"] == 2 / 5
    custom = summarize(path, slo=SloConfig(ttft_thresholds_ms=(50.0,), tbt_slo_ms=5.0))
    assert custom["slo"]["ttft_attainment_curve"] == [[50.0, 0.0]] and custom["slo"]["tbt_attainment"] == 0.0


def test_replay_config_slo_settings_are_checked() -> None:
    from netkv.serving.config import ReplayConfig, ReplayConfigError

    assert ReplayConfig().slo == {}
    assert ReplayConfig(slo={"tbt_slo_ms": 50.0}).slo == {"tbt_slo_ms": 50.0}
    with pytest.raises(ReplayConfigError, match="^slo: unknown SLO key 'tbt_ms'"):
        ReplayConfig(slo={"tbt_ms": 50.0})
    with pytest.raises(ReplayConfigError, match="^slo must be a JSON object"):
        ReplayConfig(slo=[1])  # type: ignore[arg-type]


def test_flat_slo_is_one_definition() -> None:
    from lab.experiment import DEFAULT_REPLAY

    assert DEFAULT_REPLAY["ttft_slo_ms"] == slo.FLAT_TTFT_SLO_MS
    assert slo.FLAT_TTFT_SLO_MS in slo.DEFAULT_TTFT_THRESHOLDS_MS
