"""bench simvalidate's comparison (bench/simvalidate.py): a campaign compared
with itself must agree on every figure, and its per-request groups must hold
every transfer once per grouping."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from bench.simvalidate import compare
from lab.experiment import ExperimentConfig
from lab.run import run_experiment

pytestmark = pytest.mark.skipif(importlib.util.find_spec("simgrid") is None,
                                reason="SimGrid's Python module (Debian's python3-simgrid) is not installed")


def test_a_campaign_compared_with_itself_meets_every_criterion(tmp_path: Path) -> None:
    run = tmp_path / "campaign"
    exp = ExperimentConfig(testbed={"topology": "tiny"}, scenario="none", out_dir=str(run),
                           schedulers=["round_robin", "netkv"], window_starts_s=[0.0, 1200.0, 2400.0],
                           replay={"duration_s": 20.0, "max_requests": 15, "ttft_slo_ms": 2000.0})
    run_experiment(exp, engine="simulate", quiet=True, jobs=2)
    out = compare(run, run)
    assert out["criteria"] == {"every_mean_inside_emulator_ci": True, "same_ranking": True,
                               "transfer_ratio_p10_p90_within_1_25": True}
    groups = out["transfer_time_sim_over_emu"]
    n = groups["all"]["n"]
    assert n > 0 and groups["all"]["ratio_p10"] == groups["all"]["ratio_p90"] == 1.0
    alone, shared = "path to itself on both engines", "path shared on one engine or both"
    assert groups.get(alone, {}).get("n", 0) + groups.get(shared, {}).get("n", 0) == n
    assert sum(g["n"] for k, g in groups.items() if k.startswith("tier ") and k.endswith("background")) == n
    assert sum(g["n"] for k, g in groups.items() if k.startswith("tier ") and k.endswith(("engines", "both"))) == n
