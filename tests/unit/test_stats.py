"""Statistics across windows: t quantiles, intervals, paired changes, verdicts, window choice."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netkv import stats
from netkv.schedulers import baselines
from netkv.stats import StatsError, compare_paired, mean_ci, percentile, select_windows, t_cdf, t_quantile


@pytest.mark.parametrize("p", [0.6, 0.9, 0.95, 0.975, 0.995])
def test_t_quantile_closed_forms(p: float) -> None:
    # df = 1 is the Cauchy distribution: tan(pi (p - 1/2)); df = 2: (2p - 1) / sqrt(2 p (1 - p))
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert t_quantile(1 - p, 5) == pytest.approx(-t_quantile(p, 5))


def test_t_quantile_table_values() -> None:
    # two-sided 95% critical values of Student's t, as printed in any t table
    table = {2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 30: 2.042}
    for df, value in table.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)
    # large df tends to the normal quantile, written here through the error function
    z = math.sqrt(2) * _erfinv(0.95)
    assert t_quantile(0.975, 1e6) == pytest.approx(z, abs=1e-5)


def _erfinv(y: float) -> float:
    lo, hi = 0.0, 6.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.erf(mid) < y else (lo, mid)
    return lo


@given(st.floats(-50, 50), st.floats(0.5, 200))
def test_cdf_and_quantile_are_inverse(t: float, df: float) -> None:
    p = t_cdf(t, df)
    assert 0.0 <= p <= 1.0
    assert t_cdf(-t, df) == pytest.approx(1 - p, abs=1e-12)
    if 1e-9 < p < 1 - 1e-9:
        assert t_quantile(p, df) == pytest.approx(t, abs=1e-6 * max(1.0, abs(t)))


def test_mean_ci_against_a_hand_computation() -> None:
    values = [10.0, 12.0, 17.0]
    ci = mean_ci(values)
    s = statistics.stdev(values)
    half = t_quantile(0.975, 2) * s / math.sqrt(3)
    assert ci.mean == pytest.approx(13.0) and ci.half_width == pytest.approx(half)
    assert (ci.low, ci.high) == (pytest.approx(13.0 - half), pytest.approx(13.0 + half))
    assert ci.n == 3 and ci.values == (10.0, 12.0, 17.0)
    assert mean_ci(values, 0.99).half_width > ci.half_width > mean_ci(values, 0.5).half_width  # type: ignore[operator]
    one = mean_ci([5.0])
    assert (one.mean, one.half_width, one.low, one.verdict) == (5.0, None, None, "not significant")
    assert json.loads(json.dumps(ci.to_dict()))["verdict"] == "significant"


def test_interval_covers_the_true_mean_about_95_percent_of_the_time() -> None:
    rng = random.Random(7)
    hits = sum(1 for _ in range(2000)
               if (ci := mean_ci([rng.gauss(3.0, 2.0) for _ in range(4)])).low <= 3.0 <= ci.high)  # type: ignore[operator]
    assert 0.93 <= hits / 2000 <= 0.97


def test_paired_changes_and_verdicts() -> None:
    # NetKV vs baseline mean TTFT per window
    cmp = compare_paired([80.0, 90.0, 85.0], [100.0, 100.0, 100.0])
    assert cmp.changes == (-20.0, -10.0, -15.0)
    assert cmp.ci.mean == pytest.approx(-15.0)
    assert cmp.ci.high < 0 and cmp.verdict == "significant"  # type: ignore[operator]
    mixed = compare_paired([90.0, 105.0, 95.0], [100.0, 100.0, 100.0])
    assert mixed.ci.low < 0 < mixed.ci.high and mixed.verdict == "not significant"  # type: ignore[operator]
    # SLO attainment: absolute change in its own unit (fraction), not relative
    slo = compare_paired([0.95, 0.97, 0.96], [0.90, 0.91, 0.93], relative=False)
    assert slo.changes == pytest.approx((0.05, 0.06, 0.03)) and slo.verdict == "significant"
    assert compare_paired([1.0], [2.0]).verdict == "not significant"   # no interval from one window
    d = cmp.to_dict()
    assert d["changes"] == [-20.0, -10.0, -15.0] and d["verdict"] == "significant" and d["n"] == 3


@pytest.mark.parametrize("call, fragment", [
    (lambda: mean_ci([]), "values is empty"),
    (lambda: mean_ci([1.0, float("nan")]), r"values\[1\] must be a finite number, got nan"),
    (lambda: mean_ci([1.0, 2.0], 1.0), r"confidence must be in \(0, 1\), got 1.0"),
    (lambda: compare_paired([1.0, 2.0], [1.0]), "one per window on both sides, got 2 and 1"),
    (lambda: compare_paired([1.0], [0.0]), r"baseline\[0\] is 0"),
    (lambda: t_quantile(1.0, 3), r"p must be in \(0, 1\)"),
    (lambda: t_quantile(0.9, 0), "degrees of freedom must be a finite number > 0"),
])
def test_errors_are_one_line(call: object, fragment: str) -> None:
    with pytest.raises(StatsError, match=fragment) as err:
        call()  # type: ignore[operator]
    assert "\n" not in str(err.value)


# -- windows ---------------------------------------------------------------------------------

def _disjoint(starts: list[float], window_s: float) -> bool:
    s = sorted(starts)
    return all(b >= a + window_s - 1e-9 * max(1.0, b) for a, b in zip(s, s[1:]))  # float rounding of lo + i*w


def test_select_windows_spread_and_skip_the_excluded_interval() -> None:
    assert select_windows(600, 60, 3) == [0.0, 240.0, 540.0]
    starts = select_windows(600, 60, 4, [(100.0, 200.0)])
    # free stretches [0, 100) -> 1 slot at 0; [200, 600) -> 6 slots from 200
    assert starts == [0.0, 260.0, 380.0, 500.0]
    assert _disjoint(starts, 60)
    assert all(s + 60 <= 100 or s >= 200 for s in starts)
    assert select_windows(600, 60, 1, [(0.0, 30.0)]) == [30.0]


@given(st.floats(10, 5000), st.floats(1, 300), st.integers(1, 8), st.floats(0, 5000), st.floats(1, 600))
def test_select_windows_properties(duration: float, window: float, count: int, ex_start: float, ex_len: float) -> None:
    excluded = (ex_start, ex_start + ex_len)
    try:
        starts = select_windows(duration, window, count, [excluded])
    except StatsError as exc:
        assert "disjoint" in str(exc) and f"asked for {count}" in str(exc)
        return
    assert len(starts) == count and starts == sorted(starts)
    assert _disjoint(starts, window)
    assert all(0 <= s and s + window <= duration + 1e-6 for s in starts)
    assert all(s + window <= excluded[0] + 1e-9 or s >= excluded[1] - 1e-9 for s in starts)


def test_too_few_slots_and_bad_arguments() -> None:
    with pytest.raises(StatsError, match=r"only 2 disjoint 60 s windows fit in 180 s of trace outside \[\[60.0, 90.0\]\]; asked for 3"):
        select_windows(180, 60, 3, [(60.0, 90.0)])
    with pytest.raises(StatsError, match="window_s must be a finite number of seconds > 0"):
        select_windows(100, 0, 1)
    with pytest.raises(StatsError, match=r"excluded_s\[0\] must be \(start_s, end_s\) with start < end"):
        select_windows(100, 10, 1, [(5.0, 5.0)])
    with pytest.raises(StatsError, match="count must be a whole number >= 1, got 0"):
        select_windows(100, 10, 0)


def test_evaluation_windows_avoid_the_recorded_tuning_window() -> None:
    window = baselines.tuning_window_s()
    starts = stats.evaluation_windows(3537.0, 60.0, 5)
    assert len(starts) == 5 and _disjoint(starts, 60.0)
    if window is not None:
        assert all(s + 60 <= window[0] or s >= window[1] for s in starts)


def test_tuning_window_read_from_the_result_file(tmp_path: Path) -> None:
    assert baselines.tuning_window_s(path=tmp_path / "none.json") is None
    f = tmp_path / "w.json"
    f.write_text(json.dumps({"weights": {"w_cache": 1, "w_load": 1}, "tuning_window_s": [600, 660]}))
    assert baselines.tuning_window_s(path=f) == (600.0, 660.0)
    f.write_text(json.dumps({"tuning_window_s": [660, 600]}))
    with pytest.raises(ValueError, match="tuning_window_s must be"):
        baselines.tuning_window_s(path=f)
    f.write_text(json.dumps({"weights": {}}))
    with pytest.raises(ValueError, match="no tuning_window_s"):
        baselines.tuning_window_s(path=f)


def test_exact_fits_are_not_lost_to_rounding() -> None:
    # 0.3 s windows: 3 x 0.1 is not exactly 0.3 in floating point
    assert len(select_windows(0.9, 0.3, 3)) == 3
    assert select_windows(1.0, 0.1, 10) == pytest.approx([i * 0.1 for i in range(10)])


def test_percentile_matches_linear_interpolation() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 25) == 2.0
    assert percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    with pytest.raises(ValueError, match="pct must be in"):
        percentile([1.0], 101)


def test_percentile_lower_takes_the_lower_rank() -> None:
    assert percentile([40.0, 50.0], 95, method="lower") == 40.0
    assert percentile([3.0, 1.0, 2.0], 50, method="lower") == 2.0
    assert percentile([], 95, method="lower") is None
    with pytest.raises(ValueError, match="method must be"):
        percentile([1.0], 50, method="nearest")
