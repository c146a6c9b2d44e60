"""The simulator engine (sim/, lab/simulator.py, `netkv simulate`): the SimGrid
platform built from a topology, flow times against bytes over the bottleneck,
sharing, link telemetry, a small replay's records, and refusals in one line.

Every simulation runs in a forked child (sim.isolate): SimGrid keeps one engine
per process.  No root needed; SimGrid is Debian's python3-simgrid."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lab import scenario as scenario_mod
from lab.experiment import ExperimentConfig, ExperimentError
from lab.faults import Event
from lab.run import run_experiment
from lab.simulator import PlatformCache, simulate_replay
from lab.verdict import inside, judge_replay, rejudge
from netkv.records import ORDERED_TIMESTAMPS, read_records, validate_file
from netkv.serving.config import ReplayConfig, wire_bytes
from sim import platform as sim_platform
from sim.isolate import Zygote, run_isolated
from sim.network import SimulationError
from topologies import Topology, build

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("simgrid") is None,
                                reason="SimGrid's Python module (Debian's python3-simgrid) is not installed")

BF = sim_platform.BANDWIDTH_FACTOR
# A flow alone takes latency_factor x route latency, then its bytes at BANDWIDTH_FACTOR of its
# bottleneck (LV08); SimGrid solves that exactly, so measured and formula agree to float precision.
FORMULA_TOLERANCE = 1e-6


def direction_name(topo: Topology, x: str, y: str) -> str:
    link = topo.link_between(x, y)
    return f"{link.a}-{link.b}_{'UP' if (x, y) == link.key else 'DOWN'}"


def _platform_facts(name: str) -> dict[str, Any]:
    topo = build(name)
    plat = sim_platform.build(topo)
    links = {link.name: link.bandwidth for link in plat.engine.all_links if link.name != "__loopback__"}
    routes = {}
    for src, dst in sim_platform.every_pair(topo):
        hop_links, latency = plat.hosts[src].route_to(plat.hosts[dst])
        routes[(src, dst)] = ([link.name for link in hop_links], latency)
    return {"links": links, "routes": routes, "hosts": sorted(h.name for h in plat.engine.all_hosts)}


@pytest.mark.parametrize("name,gpus,links", [("tiny", 4, 10), ("fattree", 64, 88)])
def test_the_platform_has_every_link_at_its_rate_and_the_controllers_route_per_pair(
        name: str, gpus: int, links: int) -> None:
    topo = build(name)
    facts = run_isolated(_platform_facts, name)
    assert facts["hosts"] == sorted(topo.gpu_names()) and len(facts["hosts"]) == gpus
    assert len(facts["links"]) == 2 * links == 2 * len(topo.links)  # one split-duplex link per topology link
    for link in topo.links:
        for half in ("UP", "DOWN"):
            assert facts["links"][f"{link.a}-{link.b}_{half}"] == pytest.approx(link.rate_gbps * 1e9 / 8)
    assert len(facts["routes"]) == gpus * (gpus - 1)
    for (src, dst), (names, latency) in facts["routes"].items():
        assert names == [direction_name(topo, x, y) for x, y in topo.path_hops(src, dst)], (src, dst)
        assert latency == pytest.approx(len(names) * sim_platform.LINK_LATENCY_S)


def _flows(name: str, flows: list[tuple[str, str, int]], sample_at: float | None = None) -> dict[str, Any]:
    from sim.network import Simulation

    topo = build(name)
    sim = Simulation(sim_platform.build(topo))
    ends: dict[int, tuple[float, float]] = {}

    def start() -> None:
        for i, (src, dst, nbytes) in enumerate(flows):
            sim.transfer(src, dst, nbytes, lambda x, i=i: ends.__setitem__(i, (x.start_s, x.end_s)))

    sim.at(0.0, start)
    samples: dict[str, tuple[float, float, float]] = {}
    if sample_at is not None:
        def sample() -> None:
            for hop, s in sim.sample(sample_at).samples.items():
                samples[f"{hop[0]}>{hop[1]}"] = (s.load_gbps, s.capacity_gbps, s.utilization)
        sim.at(sample_at, sample)
    sim.run()
    return {"ends": ends, "samples": samples}


def alone_s(topo: Topology, src: str, dst: str, nbytes: int) -> float:
    hops = len(topo.path_hops(src, dst))
    return (sim_platform.LATENCY_FACTOR * hops * sim_platform.LINK_LATENCY_S
            + nbytes * 8 / (BF * topo.bottleneck_gbps(src, dst) * 1e9))


@pytest.mark.parametrize("name,src,dst", [("tiny", "g0", "g1"), ("tiny", "g0", "g2"), ("fattree", "g0", "g40")])
def test_one_flow_takes_its_bytes_over_its_bottleneck_at_lv08s_factors(name: str, src: str, dst: str) -> None:
    topo = build(name)
    nbytes = 1_500_000_000  # a 1.5 GB KV payload
    start, end = run_isolated(_flows, name, [(src, dst, nbytes)])["ends"][0]
    assert start == 0.0
    assert end == pytest.approx(alone_s(topo, src, dst, nbytes), rel=FORMULA_TOLERANCE)
    ideal = nbytes * 8 / (topo.bottleneck_gbps(src, dst) * 1e9)
    assert 1.0 / BF <= end / ideal <= 1.0 / BF + 0.01  # the bandwidth factor, plus at most 1% of start-up


def shared_pairs(topo: Topology) -> tuple[tuple[str, str], tuple[str, str], tuple[str, str]]:
    """Two flows between four different GPUs whose installed paths share their
    bottleneck hop (the controller's ECMP pick decides which do), and that hop."""
    by_hop: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for src in topo.gpu_names():
        for dst in topo.gpu_names():
            if src == dst:
                continue
            bottleneck = topo.bottleneck_gbps(src, dst)
            for hop in topo.path_hops(src, dst):
                if topo.link_between(*hop).rate_gbps == bottleneck:
                    for other in by_hop.get(hop, []):
                        if len({src, dst, *other}) == 4:
                            return other, (src, dst), hop
                    by_hop.setdefault(hop, []).append((src, dst))
    raise AssertionError("no two flows share a bottleneck")


def test_two_flows_sharing_a_link_each_get_half_of_it_and_telemetry_sees_the_sum() -> None:
    topo = build("fattree")
    a, b, hop = shared_pairs(topo)
    nbytes = 1_000_000_000
    rate_gbps = topo.link_between(*hop).rate_gbps
    half_s = nbytes * 8 / (BF * rate_gbps / 2 * 1e9)
    out = run_isolated(_flows, "fattree", [(a[0], a[1], nbytes), (b[0], b[1], nbytes)], half_s / 2)
    for i in (0, 1):
        assert out["ends"][i][1] == pytest.approx(half_s, rel=0.01)  # each about half the link
    load, capacity, utilization = out["samples"][f"{hop[0]}>{hop[1]}"]
    assert capacity == rate_gbps
    assert load == pytest.approx(BF * rate_gbps, rel=0.01) and utilization == pytest.approx(BF, rel=0.01)
    back = out["samples"][f"{hop[1]}>{hop[0]}"]
    assert back[0] == 0.0  # the byte counts are the data's; cross traffic (ACKs) is not counted


def small_scenario(topo: Topology) -> scenario_mod.Scenario:
    return scenario_mod.parse({
        "name": "tiny-load", "flows": [{"src": "g0", "dst": "g3", "start_s": 0, "duration_s": 600,
                                        "rate_gbps": 100, "protocol": "tcp"}],
        "events": [{"kind": "link_rate", "t_s": 2, "link": ["t0", "a0"], "rate_gbps": 100}]}, topo)


def test_a_small_replay_writes_one_consistent_record_per_request(tmp_path: Path) -> None:
    topo = build("tiny")
    scen = small_scenario(topo)
    cfg = ReplayConfig(topology="tiny", duration_s=60.0, max_requests=10, oracle="telemetry",
                       scheduler="netkv", ttft_slo_ms=2000.0)
    run_dir = tmp_path / "netkv"
    summary, envelope = simulate_replay(cfg, topo, scen, run_dir, 0.5)
    ids = [r.request_id for r in cfg.window().requests]
    assert len(ids) == 10
    assert validate_file(run_dir / "records.jsonl", ids) == [] and summary["problems"] == []
    records = read_records(run_dir / "records.jsonl")
    assert sorted(r["request_id"] for r in records) == sorted(ids)
    assert summary["ok"] == 10 and summary["engine"] == "simulate"
    for rec in records:
        stamps = [rec[k] for k in ORDERED_TIMESTAMPS]
        assert stamps == sorted(stamps), rec["request_id"]
        assert rec["ttft_ms"] == pytest.approx(rec["first_token_ms"] - rec["arrival_ms"])
        xfer_ms = rec["transfer_end_ms"] - rec["transfer_start_ms"]
        floor_ms = rec["kv_bytes"] * 8 / (BF * topo.bottleneck_gbps(rec["prefill"], rec["decode"]) * 1e9) * 1e3
        assert xfer_ms >= floor_ms * (1 - 1e-6)  # no transfer beats its bottleneck
        assert rec["bytes_sent"] == wire_bytes(rec["kv_bytes"], cfg.scale_factor)  # as the emulator sends
    for name in ("config.json", "run.json", "summary.json", "envelope.json", "telemetry.jsonl", "events.jsonl"):
        assert (run_dir / name).is_file(), name
    polls = [json.loads(line) for line in (run_dir / "telemetry.jsonl").read_text().splitlines()]
    assert envelope["telemetry_polls"] == len(polls) >= 2
    loaded = {(row[0], row[1]): row[3] for row in polls[2]["links"]}
    assert loaded[("g0", "v0")] == pytest.approx(100.0, rel=0.02)  # the background flow at its rate
    event = json.loads((run_dir / "events.jsonl").read_text().splitlines()[0])
    assert event["kind"] == "link_rate" and event["outcome"] == "ok" and event["actual_t_s"] == 2.0
    assert envelope["engine"] == "simulate" and envelope["within_envelope"] is True
    verdict = judge_replay(run_dir)
    assert inside(verdict) and verdict["limiting_resource"] is None and not verdict["changed"]


def _outcome(run_dir: Path) -> list[tuple[Any, ...]]:
    return sorted((r["request_id"], r["status"], r["decode"], r["ttft_ms"]) for r in read_records(run_dir / "records.jsonl"))


def test_replays_on_one_built_platform_equal_replays_that_build_their_own(tmp_path: Path) -> None:
    """A campaign builds its platform once (a zygote) and forks each replay from
    it; a replay must come out exactly as one that built its own platform."""
    topo = build("tiny")
    scen = small_scenario(topo)
    cfg = ReplayConfig(topology="tiny", duration_s=60.0, max_requests=10, oracle="telemetry",
                       scheduler="netkv", ttft_slo_ms=2000.0)
    simulate_replay(cfg, topo, scen, tmp_path / "alone-netkv", 0.5)
    simulate_replay(replace(cfg, scheduler="round_robin"), topo, scen, tmp_path / "alone-rr", 0.5)
    cache = PlatformCache(topo)
    try:
        _, env = cache.replay(cfg, scen, tmp_path / "netkv", 0.5)
        first = cache.zygote
        assert first is not None and env["platform_shared"] is True
        assert env["platform_shared_build_s"] > 0 and env["platform_shared_rss_gib"] > 0
        assert json.loads((tmp_path / "netkv" / "envelope.json").read_text())["platform_shared_build_s"] > 0
        _, env = cache.replay(replace(cfg, scheduler="round_robin"), scen, tmp_path / "rr", 0.5)
        assert cache.zygote is first and env["platform_shared"] is True
        assert _outcome(tmp_path / "netkv") == _outcome(tmp_path / "alone-netkv")
        assert _outcome(tmp_path / "rr") == _outcome(tmp_path / "alone-rr")
        # the tier mix computed once in the zygote is the one a replay computes alone
        tiers = [json.loads((tmp_path / d / "run.json").read_text())["tier_pairs"] for d in ("rr", "alone-rr")]
        assert tiers[0] == tiers[1] and sum(tiers[0].values()) > 0
        # other background flows are other routes: a new platform, the old process ended
        quiet = scenario_mod.parse({"name": "quiet", "flows": [], "events": []}, topo)
        cache.replay(cfg, quiet, tmp_path / "quiet", 0.5)
        assert cache.zygote is not first and not first._proc.is_alive()
        last = cache.zygote
    finally:
        cache.close()
    assert last is not None and not last._proc.is_alive()


def _fails(state: Any, what: str) -> None:
    raise ValueError(what)


def _broken_build() -> None:
    raise RuntimeError("no such link")


def test_a_zygote_passes_back_its_replays_errors_and_its_own() -> None:
    zygote = Zygote("k", lambda: 41)
    try:
        assert zygote.run(lambda_free_add, 1) == 42
        with pytest.raises(ValueError, match="the replay's own error"):
            zygote.run(_fails, "the replay's own error")
        assert zygote.run(lambda_free_add, 2) == 43  # still serving after a failed replay
    finally:
        zygote.close()
    broken = Zygote("k", _broken_build)
    with pytest.raises(SimulationError, match="building the platform failed: RuntimeError: no such link"):
        broken.run(lambda_free_add, 1)
    assert not broken._proc.is_alive()


def lambda_free_add(state: int, n: int) -> int:
    return state + n


def test_a_simulated_envelope_is_judged_inside_with_a_note() -> None:
    v = rejudge({"engine": "simulate", "within_envelope": True})
    assert v["within_envelope"] is True and v["limiting_resource"] is None and "simulat" in v["note"]


def test_the_memory_bound_is_stated() -> None:
    assert sim_platform.check_fits(4032, 64, available=2**30) == 4032 * sim_platform.BYTES_PER_ROUTE
    with pytest.raises(sim_platform.PlatformTooLarge, match=r"33,554,432 routes, about 16\.0 GiB .* 75% of the "
                                                            r"16\.0 GiB available"):
        sim_platform.check_fits(2 * 4096 * 4096, 8192, available=16 * 2**30)


def test_an_unknown_engine_is_refused_before_anything_runs(tmp_path: Path) -> None:
    exp = ExperimentConfig(testbed={"topology": "tiny"}, scenario="none", out_dir=str(tmp_path / "run"))
    with pytest.raises(ExperimentError, match="unknown engine 'ns3'; known: emulate, simulate"):
        run_experiment(exp, engine="ns3", quiet=True)
    assert not (tmp_path / "run").exists()


def run_netkv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.mark.parametrize("args,fragment", [
    (["--scenario", "faults"], "fault event 'controller_restart' cannot be simulated (the simulator supports "
                               "link_rate)"),
    (["--param", "pods=448", "--scenario", "none"], "the simulated platform of 14336 GPUs needs 102,760,448 routes"),
    (["--topology", "tiny", "--scenario", "core-hotspot"], "is not a GPU host of tiny"),
])
def test_netkv_simulate_refuses_bad_input_in_one_line(tmp_path: Path, args: list[str], fragment: str) -> None:
    proc = run_netkv("simulate", *args, "--out", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "xbt_cfg" not in line]
    assert len(lines) == 1 and lines[0].startswith("netkv: error: ") and fragment in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_netkv_simulate_writes_a_run_directory_netkv_report_reads(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_netkv("simulate", "--topology", "tiny", "--scenario", "none", "--duration-s", "10",
                     "--schedulers", "round_robin,netkv", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison["schedulers"]) == {"round_robin", "netkv"}
    assert comparison["outside_envelope"] == [] and comparison["unjudged"] == []
    testbed = json.loads((out / "testbed.json").read_text())
    assert testbed["bringup"]["engine"] == "simulate" and testbed["bringup"]["simgrid_model"] == "LV08"
    report = run_netkv("report", str(out))
    assert report.returncode == 0 and "round_robin" in report.stdout, report.stderr


def test_netkv_sweep_runs_on_the_simulator_without_root(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    proc = run_netkv("sweep", "load", "--engine", "simulate", "--topology", "tiny", "--scenario", "none",
                     "--values", "1,2", "--duration-s", "5", "--window-starts-s", "0,1200",
                     "--schedulers", "round_robin,netkv", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "sweep-plan.json").read_text())["engine"] == "simulate"
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["nothing_lost"] is True
    assert [(p["value"], p["missing"]) for p in sweep["points"]] == [(1.0, False), (2.0, False)]
    for point in ("rate_multiplier=1", "rate_multiplier=2"):
        for window in ("w0-0s", "w1-1200s"):
            for label in ("round_robin", "netkv"):
                run_dir = out / point / window / label
                assert json.loads((run_dir / "envelope.json").read_text())["engine"] == "simulate"
                ids = [r.request_id for r in ReplayConfig.load(run_dir / "config.json").window().requests]
                assert ids and validate_file(run_dir / "records.jsonl", ids) == []
        assert json.loads((out / point / "campaign.json").read_text())["simulated_replays"] == 4
    report = run_netkv("report", str(out / "rate_multiplier=1"))
    assert report.returncode == 0, report.stderr
    assert "simulated replays: no emulator envelope applies" in report.stdout
    assert "inside the emulator's envelope" not in report.stdout


def test_netkv_sweep_on_the_simulator_refuses_what_it_cannot_simulate(tmp_path: Path) -> None:
    proc = run_netkv("sweep", "load", "--engine", "simulate", "--scenario", "faults", "--values", "1",
                     "--out", str(tmp_path / "sweep"))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "xbt_cfg" not in line]
    assert len(lines) == 1 and "fault event 'controller_restart' cannot be simulated" in lines[0], proc.stderr
    assert not (tmp_path / "sweep").exists()


def test_replays_at_once_come_out_as_replays_one_at_a_time(tmp_path: Path) -> None:
    """--jobs 2: a campaign's replays run two at a time, each from a zygote of
    its own (two platforms built side by side), and every replay's records are
    those of the same campaign run one replay at a time."""
    def campaign(out: Path, jobs: int) -> None:
        exp = ExperimentConfig(testbed={"topology": "tiny"}, scenario="none", out_dir=str(out),
                               schedulers=["round_robin", "netkv"], window_starts_s=[0.0, 1200.0],
                               replay={"duration_s": 20.0, "max_requests": 12, "ttft_slo_ms": 2000.0})
        result = run_experiment(exp, engine="simulate", quiet=True, jobs=jobs)
        assert result["nothing_lost"] is True

    campaign(tmp_path / "one", 1)
    campaign(tmp_path / "two", 2)
    assert multiprocessing.active_children() == []  # every zygote and replay process ended
    replays = sorted(p.parent.relative_to(tmp_path / "one") for p in (tmp_path / "one").glob("w*/*/records.jsonl"))
    assert len(replays) == 4
    for rel in replays:
        assert _outcome(tmp_path / "two" / rel) == _outcome(tmp_path / "one" / rel), rel
    # the cache itself: while one zygote is busy with a replay, the next replay gets a second one of
    # the same routes; with both free, replays reuse them
    topo = build("tiny")
    scen = scenario_mod.parse({"name": "quiet", "flows": [], "events": []}, topo)
    cfg = ReplayConfig(topology="tiny", duration_s=20.0, max_requests=6, scheduler="round_robin")
    cache = PlatformCache(topo, jobs=2)
    try:
        cache.replay(cfg, scen, tmp_path / "t0", 0.5)
        first = cache.zygotes[0]
        busy = cache._take(cache.key_of(cfg, scen), lambda: pytest.fail("a free zygote was there"))
        assert busy is first
        cache.replay(cfg, scen, tmp_path / "t1", 0.5)
        assert len(cache.zygotes) == 2 and cache.zygotes[1] is not first and cache.zygotes[1].key == first.key
        cache._free.append(busy)
        cache.replay(cfg, scen, tmp_path / "t2", 0.5)
        assert len(cache.zygotes) == 2
        assert _outcome(tmp_path / "t0") == _outcome(tmp_path / "t1") == _outcome(tmp_path / "t2") != []
    finally:
        cache.close()
    assert cache.zygotes == [] and not first._proc.is_alive()


@pytest.mark.parametrize("args,fragment", [
    (["sweep", "load", "--engine", "emulate", "--jobs", "2"], "--jobs 2: the emulate engine runs 1 replay at a time"),
    (["simulate", "--jobs", "0"], "--jobs must be >= 1, got 0"),
])
def test_jobs_the_engine_cannot_run_are_refused_in_one_line(tmp_path: Path, args: list[str], fragment: str) -> None:
    proc = run_netkv(*args, "--out", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "xbt_cfg" not in line]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()
