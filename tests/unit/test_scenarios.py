"""Congestion scenario files: every shipped one parses against the default
fabric, and malformed ones are refused with the flow and the field named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import topologies
from lab import scenario
from lab.experiment import ExperimentConfig, ExperimentError
from netkv.repo import REPO_ROOT


@pytest.fixture(scope="module")
def fattree() -> topologies.Topology:
    return topologies.build("fattree")


def test_shipped_scenarios_parse(fattree: topologies.Topology) -> None:
    names = scenario.names()
    assert {"none", "hotspots"} <= set(names)
    for name in names:  # each against the fabric it is written for (its links size its flows)
        params = scenario.written_for(name)
        scen = scenario.load(name, topologies.build("fattree", params) if params else fattree)
        assert scen.name == name
    hot = scenario.load("hotspots", fattree)
    # 2 cross-pod flows at 150 Gbit/s (8 links) + 1 in-rack at 300 Gbit/s (4 links), at 1:20000
    assert hot.load_mbps_hops(fattree, 20_000) == pytest.approx(2 * 7.5 * 8 + 15 * 4)


@pytest.mark.parametrize("flow,fragment", [
    ({"src": "g0", "dst": "g99", "duration_s": 1, "rate_gbps": 1}, "dst 'g99' is not a GPU host"),
    ({"src": "g0", "dst": "g0", "duration_s": 1, "rate_gbps": 1}, "same host"),
    ({"src": "g0", "dst": "g32", "duration_s": 1, "rate_gbps": 500}, "exceeds the path's bottleneck"),
    ({"src": "g0", "dst": "g32", "duration_s": 1, "rate_gbps": -1}, "rate_gbps must be a finite number"),
    ({"src": "g0", "dst": "g32", "duration_s": 0.1, "rate_gbps": 1}, "duration_s must be"),
    ({"src": "g0", "dst": "g32", "duration_s": 1, "rate_gbps": 1, "protocol": "sctp"}, "protocol must be"),
    ({"src": "g0", "dst": "g32", "duration_s": 1, "rate_gbps": 1, "rate_gpbs": 2}, "unknown key 'rate_gpbs'"),
])
def test_bad_flows_refused(fattree: topologies.Topology, flow: dict[str, object], fragment: str) -> None:
    with pytest.raises(scenario.ScenarioError, match=fragment.replace("(", r"\(")) as info:
        scenario.parse({"name": "x", "flows": [flow]}, fattree, "x.json")
    assert "flow 0" in str(info.value)


def test_unknown_scenario_and_file_errors(fattree: topologies.Topology, tmp_path: Path) -> None:
    with pytest.raises(scenario.ScenarioError, match="no scenario 'nope'"):
        scenario.load("nope", fattree)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(scenario.ScenarioError, match="cannot read scenario"):
        scenario.load(str(bad), fattree)
    bad.write_text(json.dumps({"name": "x", "flowz": []}))
    with pytest.raises(scenario.ScenarioError, match="unknown key 'flowz'"):
        scenario.load(str(bad), fattree)


def test_experiment_config_rejects_unknown_keys() -> None:
    with pytest.raises(ExperimentError, match="unknown experiment setting 'schedulerz'"):
        ExperimentConfig.from_json({"schedulerz": ["netkv"]})
    exp = ExperimentConfig.from_json(ExperimentConfig().to_json())
    assert exp.schedulers == ["round_robin", "tuned_cache_load", "netkv"]


def test_saved_experiment_reruns_with_the_same_settings(tmp_path: Path) -> None:
    from cli.lab import experiment_from_args
    from cli.main import build_parser

    parser = build_parser()
    first = experiment_from_args(parser.parse_args(
        ["run", "--topology", "leafspine", "--scale", "30000", "--param", "spines=4", "--scenario", "none",
         "--schedulers", "netkv,round_robin", "--duration-s", "15", "--set", "decode_max_batch=32",
         "--out", str(tmp_path / "a")]))
    saved = tmp_path / "experiment.json"
    saved.write_text(json.dumps(first.to_json()))
    again = experiment_from_args(parser.parse_args(["run", "--experiment", str(saved), "--out", str(tmp_path / "b")]))
    assert again.out_dir == str((tmp_path / "b").resolve())
    assert {**again.to_json(), "out_dir": ""} == {**first.to_json(), "out_dir": ""}
    assert again.testbed["scale"] == 30000 and again.testbed["params"] == {"spines": "4"}
    assert again.replay["decode_max_batch"] == 32
    # an option given on the command line overrides the saved value
    third = experiment_from_args(parser.parse_args(["run", "--experiment", str(saved), "--scale", "50000"]))
    assert third.testbed["scale"] == 50000 and third.schedulers == ["netkv", "round_robin"]


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "experiments").glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_experiment_passes_the_checks_made_before_a_network_is_built(path: Path) -> None:
    from cli.lab import experiment_from_args
    from cli.main import build_parser
    from lab.experiment import prepare

    exp = experiment_from_args(build_parser().parse_args(["run", "--experiment", str(path)]))
    prepare(exp)
    assert exp.window_starts_s, f"{path.name}: a shipped experiment names the trace windows it was run on"


def test_schedulers_chosen_on_the_command_line_take_the_experiments_variants_of_those_only() -> None:
    """--schedulers picks labels of an experiment file: the file's variants of the
    labels left out go with them, those kept stay; a --variant given on the command
    line for a label not chosen is still refused."""
    from cli.common import CliError
    from cli.lab import experiment_from_args
    from cli.main import build_parser
    from lab.experiment import ExperimentError, prepare

    path = str(REPO_ROOT / "experiments" / "network-heavy-baselines.json")
    exp = experiment_from_args(build_parser().parse_args(
        ["run", "--experiment", path, "--schedulers", "round_robin,dynamo_decode,netkv"]))
    assert exp.schedulers == ["round_robin", "dynamo_decode", "netkv"] and list(exp.variants) == ["dynamo_decode"]
    prepare(exp)
    exp = experiment_from_args(build_parser().parse_args(
        ["run", "--experiment", path, "--schedulers", "netkv", "--variant", 'other={"scheduler": "round_robin"}']))
    with pytest.raises((ExperimentError, CliError), match="variant 'other' is not among the schedulers"):
        prepare(exp)
