"""Replays judged again from their saved samples (lab/verdict.py): today's rule
on old and new envelope files, and what cannot be judged is not inside."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lab.envelope import EmulatorMeter
from lab.report import render_table
from lab.verdict import describe, inside, judge_replay, rejudge


def old_envelope(times: list[float], judged: int, **stored: Any) -> dict[str, Any]:
    """An envelope.json as written before December 2026: relative times only."""
    series = [[t, 20.0, 8.0, 40.0] for t in times]
    return {"samples": judged, "samples_outside_window": len(times) - judged, "series": series,
            "switch_cpu_pct_p95": 8.0, "switch_cpu_sum_pct_p95": 20.0, "machine_busy_pct_p95": 40.0,
            "switch_processes_died": [], "within_envelope": True, "limiting_resource": None, **stored}


def test_an_old_file_with_a_hole_straddling_the_window_start_is_outside_today() -> None:
    # workers start (samples 0, 1), the replay clock starts, the process stands still 5 s from
    # before the window's first judged sample into it; the stored verdict missed it
    times = [0.0, 1.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    env = old_envelope(times, judged=6, wall_clock_jump_s_max=0.0, sample_gap_s_max=1.0)
    v = rejudge(env, {"max_dispatch_lag_ms": 20.0})
    assert v["within_envelope"] is False and v["sample_gap_s_max"] == 5.0
    assert v["limiting_resource"] == "replay process stalled (no meter sample for 5.0 s)"
    assert v["checks_missing"] == []


def test_an_old_file_without_the_monotonic_clock_says_what_it_cannot_show() -> None:
    env = old_envelope([float(i) for i in range(10)], judged=8)
    v = rejudge(env, {"max_dispatch_lag_ms": 20.0})
    assert v["within_envelope"] is True
    assert v["checks_missing"] == ["pauses shorter than a sample gap (no monotonic clock saved)"]
    # the dispatch lag comes from the summary, judged by today's threshold
    assert rejudge(env, {"max_dispatch_lag_ms": 900.0})["within_envelope"] is False


def test_a_new_file_is_rejudged_exactly_and_agrees_with_the_meter() -> None:
    meter = EmulatorMeter({"t0": 1})
    for i in range(8):
        t = 100.0 + i + (4.0 if i >= 3 else 0.0)  # a 5 s hole between samples 2 and 3
        meter.add(t, {"t0": 10.0}, 30.0, 50.0 + i + (4.0 if i >= 3 else 0.0))
    # the window starts inside the hole: only the straddling pair shows the stall
    env = meter.stop((104.5, 111.0), dispatch_lag_ms=10.0)
    assert env["within_envelope"] is False and env["sample_gap_s_max"] == 5.0
    again = rejudge(json.loads(json.dumps(env)), None)
    assert {k: again[k] for k in ("within_envelope", "limiting_resource", "sample_gap_s_max")} == \
        {k: env[k] for k in ("within_envelope", "limiting_resource", "sample_gap_s_max")}
    assert again["checks_missing"] == []


def test_no_file_and_no_samples_are_unjudged_not_inside(tmp_path: Path) -> None:
    v = judge_replay(tmp_path)
    assert v["within_envelope"] is None and not inside(v) and describe(v).startswith("unjudged")
    assert rejudge({"samples": 0, "series": []}, None)["within_envelope"] is None
    assert not inside(None) and inside({"within_envelope": True})


def test_the_report_says_where_the_stored_verdict_differs(tmp_path: Path) -> None:
    run_dir = tmp_path / "netkv"
    run_dir.mkdir()
    env = old_envelope([0.0, 1.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0], judged=6, wall_clock_jump_s_max=0.0)
    (run_dir / "envelope.json").write_text(json.dumps(env))
    (run_dir / "summary.json").write_text(json.dumps({"max_dispatch_lag_ms": 20.0}))
    v = judge_replay(run_dir)
    assert v["changed"] is True and v["stored_within_envelope"] is True and v["within_envelope"] is False
    comparison = {"run_dir": str(tmp_path), "schedulers": {"netkv": {
        "ok": 1, "requests": 1, "verdict": v, "envelope": env}}, "verdict_changed_on_rejudging": {"netkv": v}}
    text = render_table(comparison)
    assert "OUTSIDE (replay process stalled (no meter sample for 5.0 s))" in text
    assert "re-judged, netkv: OUTSIDE (replay process stalled (no meter sample for 5.0 s)) under today's rule; " \
           "stored at run time: True" in text
