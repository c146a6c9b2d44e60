"""bench clocks: counts intervals whose thread CPU time ran ahead of wall time."""

from __future__ import annotations

import json

import pytest

from bench import clocks


def test_measure_times_every_interval_and_counts_within_them() -> None:
    out = clocks.measure(intervals=2000, work_us=20.0, threshold_us=0.0)
    assert out["intervals"] == 2000
    assert 0 < out["interval_wall_us_mean"] < 20_000
    assert 0 <= out["cpu_ahead_count"] <= 2000
    assert out["cpu_ahead_per_10k"] == pytest.approx(out["cpu_ahead_count"] * 5.0, abs=0.01)
    assert (out["cpu_ahead_us_max"] > 0) == (out["cpu_ahead_count"] > 0)


def test_iterations_scale_with_the_work_asked_for() -> None:
    assert clocks.iterations_for(400.0) > clocks.iterations_for(4.0)


def test_main_prints_one_json_object_last(capsys: pytest.CaptureFixture[str]) -> None:
    assert clocks.main(["--intervals", "500", "--work-us", "5"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["intervals"] == 500


@pytest.mark.parametrize("argv", [["--intervals", "0"], ["--work-us", "0"], ["--threshold-us", "-1"]])
def test_bad_options_are_one_line_and_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        clocks.main(argv)
    assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err
