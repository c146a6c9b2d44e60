"""bench simpaper's experiment at scale (bench/simpaper.py): the fabric, the load and
the congestion it derives from the 64-GPU campaign, written by --plan-only and
accepted by the checks `netkv simulate` makes; bad sizes refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.simpaper import EXPERIMENT, experiment, hotspot_scenario
from lab.experiment import ExperimentConfig, prepare
from lab.simulator import check_experiment
from topologies import build
from topologies.catalog import fattree_at

ROOT = Path(__file__).resolve().parents[2]


def test_the_hotspot_is_repeated_once_per_pair_of_pods() -> None:
    scen = hotspot_scenario(256)
    topo = build("fattree", fattree_at(256))
    pods = [(topo.node(f["src"]).pod, topo.node(f["dst"]).pod) for f in scen["flows"]]
    assert pods == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert {f["rate_gbps"] for f in scen["flows"]} == {150.0}


def test_plan_only_writes_an_experiment_the_simulator_accepts(tmp_path: Path) -> None:
    out = tmp_path / "p1024"
    done = subprocess.run([sys.executable, "-m", "bench", "simpaper", "--gpus", "1024", "--plan-only",
                           "--schedulers", "dynamo_decode,netkv", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout.strip().splitlines()[-1])
    exp = json.loads(Path(plan["experiment"]).read_text())
    assert exp["schedulers"] == ["dynamo_decode", "netkv"] and list(exp["variants"]) == ["dynamo_decode"]
    assert exp["replay"]["trace_replicas"] == 16 and exp["testbed"]["params"] == fattree_at(1024)
    assert json.loads(Path(exp["scenario"]).read_text())["name"] == "core-hotspot-x16"
    assert not out.exists()  # nothing run
    same = experiment(1024, ["dynamo_decode", "netkv"], [1200.0, 1800.0, 2400.0], 60.0, Path(exp["scenario"]))
    assert same == exp
    # the checks `netkv simulate` makes before anything runs
    exp_cfg = ExperimentConfig.from_json(exp)
    exp_cfg.out_dir = str(tmp_path / "run")
    tb_cfg, base, scen, _ = prepare(exp_cfg)
    check_experiment(exp_cfg, base, scen, tb_cfg.validate())
    assert len(scen.flows) == 16


def test_a_size_that_is_not_a_multiple_of_the_traces_64_gpus_is_refused_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench", "simpaper", "--gpus", "100", "--out", str(tmp_path / "x")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].endswith(
        "--gpus must be a multiple of 64 (the trace's load), got 100")
    assert EXPERIMENT.is_file() and not any(tmp_path.iterdir())
