"""`netkv sweep` end to end on the tiny fabric (root): two points, two
schedulers, one window each; the JSON, the plot, and every request of every
replay accounted for as exactly one record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fabric import cleanup
from lab.verdict import judge_replay
from netkv.records import read_records
from tests.helpers.net import free_port, test_prefix

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parents[2]


def test_two_point_load_sweep_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    prefix = test_prefix("w")
    argv = [sys.executable, "-m", "cli.main", "sweep", "load", "--values", "1,2", "--topology", "tiny",
            "--prefix", prefix, "--of-port", str(free_port()), "--rest-port", str(free_port()),
            "--scenario", "none", "--schedulers", "round_robin,netkv", "--max-requests", "6",
            "--duration-s", "20", "--out", str(out), "--quiet"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads((out / "sweep.json").read_text())
    assert (out / "sweep.png").stat().st_size > 10_000
    assert [p["value"] for p in result["points"]] == [1.0, 2.0]
    assert result["schedulers"] == ["round_robin", "netkv"] and result["nothing_lost"] is True
    for point in result["points"]:
        assert not point["missing"]
        # every replay judged again from its own files: the headline counts only those inside
        inside = {acc["scheduler"]: judge_replay(out / point["dir"] / acc["window"] / acc["scheduler"])[
            "within_envelope"] is True for acc in point["accounting"]}
        for name in ("round_robin", "netkv"):
            summary = point["ttft_mean_ms"][name]
            assert summary["n"] == (1 if inside[name] else 0)
            assert summary["mean"] is None or summary["mean"] > 0
        assert point["netkv_ttft_change_pct"]["round_robin"]["n"] == (1 if all(inside.values()) else 0)
        assert point["within_envelope"] is all(inside.values())
        assert len(point["accounting"]) == 2
        for acc in point["accounting"]:
            # requests in = records out: every request of the window ends as one record
            assert acc["records"] == acc["requests_expected"] == 6 and acc["partial"] is False
            replay_dir = out / point["dir"] / acc["window"] / acc["scheduler"]
            recs = read_records(replay_dir / "records.jsonl")
            assert len({r["request_id"] for r in recs}) == 6
            # the envelope judged the replay's own process too: its dispatch lag and the
            # meter's largest hole, both as the summary and the samples say
            env = json.loads((replay_dir / "envelope.json").read_text())
            summary = json.loads((replay_dir / "summary.json").read_text())
            assert env["dispatch_lag_ms_max"] == round(summary["max_dispatch_lag_ms"], 1)
            assert "wall_clock_jump_s_max" in env  # a paused virtual machine would show there
            times = [row[0] for row in env["series"]]
            assert env["sample_gap_s_max"] is None or 0.5 < env["sample_gap_s_max"] <= max(
                b - a for a, b in zip(times, times[1:])) + 0.1
        exp = json.loads((out / point["dir"] / "experiment.json").read_text())
        assert exp["replay"]["rate_multiplier"] == point["value"]  # the knob, and only it, differs
    # the sweep's figures are remade from its files alone
    report = subprocess.run([sys.executable, "-m", "cli.main", "report", str(out), "--json"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert report.returncode == 0, report.stderr[-2000:]
    assert json.loads(report.stdout)["points"] == result["points"]
    assert cleanup.sweep(prefix).total == 0  # nothing of the prefix was left


def test_sweep_bad_value_refused_before_any_network(tmp_path: Path) -> None:
    prefix = test_prefix("w")
    proc = subprocess.run([sys.executable, "-m", "cli.main", "sweep", "load", "--values", "1,-3",
                           "--topology", "tiny", "--prefix", prefix, "--scenario", "none",
                           "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "rate_multiplier=-3.0" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "s").exists()
