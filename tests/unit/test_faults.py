"""Faults as scenario events, without root: parsing and validation of events,
paths around down links (one rule for the controller, /path and the oracle),
the controller's reroute as a per-switch diff, the oracle's pricing of down
and re-rated links, and the frontend's handling of a killed and restarted
worker (real worker processes on 127.0.0.1, driven by the fault runner)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

import topologies
from controller.rest import Api
from controller.routing import flow_entries, walk
from controller.state import ControllerState
from lab import faults, scenario
from lab.faults import Event, FaultError, FaultRunner, parse_events
from netkv.oracle import DOWN_LINK_GBPS, StaticOracle, TelemetryOracle
from netkv.records import read_records, validate_file
from netkv.serving.config import ReplayConfig
from netkv.telemetry import LinkSample, TelemetrySnapshot
from netkv.traces import DEFAULT_TRACE
from topologies.model import pick_path
from workers.launch import LocalLauncher
from workers.run import replay

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fattree() -> topologies.Topology:
    return topologies.build("fattree")


@pytest.fixture(scope="module")
def tiny() -> topologies.Topology:
    return topologies.build("tiny")


# -- parsing ---------------------------------------------------------------------------
def test_shipped_fault_scenario_parses(fattree: topologies.Topology) -> None:
    scen = scenario.load("faults", fattree)
    kinds = [e.kind for e in scen.events]
    assert kinds == ["link_down", "worker_kill", "link_up", "controller_restart"]
    assert [e.t_s for e in scen.events] == sorted(e.t_s for e in scen.events)
    again = scenario.parse(json.loads(json.dumps(scen.to_json())), fattree)
    assert again.events == scen.events
    assert scen.events[0].link == ("a0", "c0")
    assert scen.events[3].down_s == 3.0


def test_every_kind_parses_and_keeps_its_fields(fattree: topologies.Topology) -> None:
    raw = [{"kind": "switch_restart", "t_s": 9, "switch": "a1"},
           {"kind": "link_rate", "t_s": 1, "link": ["c0", "a0"], "rate_gbps": 50},
           {"kind": "worker_kill", "t_s": 2, "host": "g1"},
           {"kind": "controller_restart", "t_s": 3}]
    events = parse_events(raw, fattree)
    assert [e.kind for e in events] == ["link_rate", "worker_kill", "controller_restart", "switch_restart"]
    assert events[0].link == ("a0", "c0")  # either order names the link; kept as (lower, upper)
    assert events[1].restart_after_s is None
    assert events[2].down_s == faults.DEFAULT_DOWN_S == events[3].down_s
    assert events[3].to_json() == {"kind": "switch_restart", "t_s": 9.0, "switch": "a1", "down_s": 2.0}


@pytest.mark.parametrize("event,fragment", [
    ({"kind": "link_flap", "t_s": 1}, "event 0: kind must be one of link_rate, link_down"),
    ({"t_s": 1}, "kind must be one of"),
    ({"kind": "link_down", "t_s": 1, "link": ["a0", "c0"], "rate_gbps": 5}, "(link_down): unknown key 'rate_gbps'"),
    ({"kind": "link_down", "t_s": -1, "link": ["a0", "c0"]}, "t_s must be a number in [0, 86400]"),
    ({"kind": "link_down", "t_s": float("nan"), "link": ["a0", "c0"]}, "t_s must be a number"),
    ({"kind": "link_down", "t_s": True, "link": ["a0", "c0"]}, "t_s must be a number"),
    ({"kind": "link_down", "link": ["a0", "c0"]}, "t_s must be a number"),
    ({"kind": "link_down", "t_s": 1, "link": "a0-c0"}, "link must be a list of two node names"),
    ({"kind": "link_down", "t_s": 1, "link": ["a0", "c9"]}, "link end 'c9' is not a node of fattree"),
    ({"kind": "link_down", "t_s": 1, "link": ["a0", "a1"]}, "link a0-a1 is not a link of fattree"),
    ({"kind": "link_rate", "t_s": 1, "link": ["a0", "c0"], "rate_gbps": 0}, "rate_gbps must be a number"),
    ({"kind": "link_rate", "t_s": 1, "link": ["a0", "c0"]}, "rate_gbps must be a number"),
    ({"kind": "worker_kill", "t_s": 1, "host": "g64"}, "host 'g64' is not a GPU host of fattree"),
    ({"kind": "worker_kill", "t_s": 1, "host": "t0"}, "host 't0' is not a GPU host"),
    ({"kind": "worker_kill", "t_s": 1, "host": "g1", "restart_after_s": -2}, "restart_after_s must be"),
    ({"kind": "switch_restart", "t_s": 1, "switch": "x0"}, "switch 'x0' is not a switch of fattree"),
    ({"kind": "switch_restart", "t_s": 1, "switch": "g0"}, "switch 'g0' is not a switch"),
    ({"kind": "controller_restart", "t_s": 1, "down_s": 1e9}, "down_s must be a number in [0, 3600]"),
    ("link_down", "event 0: expected an object"),
])
def test_bad_events_are_refused_with_the_field_named(fattree: topologies.Topology, event: Any,
                                                     fragment: str) -> None:
    data = {"name": "x", "flows": [], "events": [event]}
    with pytest.raises(scenario.ScenarioError) as info:
        scenario.parse(data, fattree, "x.json")
    assert fragment in str(info.value) and str(info.value).startswith("x.json: ")


def test_events_must_be_a_short_list(fattree: topologies.Topology) -> None:
    with pytest.raises(scenario.ScenarioError, match="'events' must be a list"):
        scenario.parse({"name": "x", "events": {"kind": "link_down"}}, fattree)
    many = [{"kind": "controller_restart", "t_s": 1}] * (faults.MAX_EVENTS + 1)
    with pytest.raises(scenario.ScenarioError, match="at most 256 events"):
        scenario.parse({"name": "x", "events": many}, fattree)


def test_workers_are_checked(fattree: topologies.Topology) -> None:
    events = parse_events([{"kind": "worker_kill", "t_s": 1, "host": "g5"},
                           {"kind": "switch_restart", "t_s": 1, "switch": "t0"}], fattree)
    faults.check_workers(events, ["g5", "g6"])
    with pytest.raises(FaultError, match="worker_kill host 'g5' runs no prefill or decode worker"):
        faults.check_workers(events, ["g6"])


def run_netkv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


@pytest.mark.parametrize("events,fragment", [
    ([{"kind": "worker_kill", "t_s": 1, "host": "g3"}], "worker_kill host 'g3' runs no prefill or decode worker"),
    ([{"kind": "worker_kill", "t_s": 1, "host": "g9"}], "host 'g9' is not a GPU host of tiny (g0..g3)"),
    ([{"kind": "link_down", "t_s": 1, "link": ["t0", "t1"]}], "link t0-t1 is not a link of tiny"),
    ([{"kind": "switch_restart", "t_s": 1, "switch": "a0", "down_s": "2"}], "down_s must be a number"),
])
def test_netkv_run_refuses_bad_events_before_anything_is_built(tmp_path: Path, events: list[Any],
                                                                 fragment: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "bad", "flows": [], "events": events}))
    placement = '{"scheme": "mixed", "hosts": ["g0", "g1"]}'
    proc = run_netkv("run", "--topology", "tiny", "--scenario", str(path), "--schedulers", "netkv",
                     "--set", f"placement={placement}", "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# -- paths around down links -----------------------------------------------------------
def test_pick_path_moves_only_the_pairs_a_down_link_cuts(fattree: topologies.Topology) -> None:
    down = {("a0", "c0")}
    moved = kept = 0
    for src in ("g0", "g9", "g17"):
        for dst in ("g32", "g40", "g63"):
            usual = fattree.path(src, dst)
            now = fattree.path(src, dst, down)
            assert not any({x, y} == {"a0", "c0"} for x, y in zip(now, now[1:]))
            assert len(now) == len(usual) and now in fattree.shortest_paths(src, dst)
            if any({x, y} == {"a0", "c0"} for x, y in zip(usual, usual[1:])):
                moved += 1
            else:
                assert now == usual
                kept += 1
    assert moved and kept
    # nothing remains at that length: the usual path is kept (a host's only link)
    cands = fattree.shortest_paths("g0", "g1")
    assert pick_path(cands, "g0", "g1", {("g0", "v0")}) == fattree.path("g0", "g1")


def test_controller_reroutes_as_a_diff_and_answers_path_from_installed_routes(
        tiny: topologies.Topology) -> None:
    state = ControllerState(tiny, scale=1000.0)
    api = Api(state, clock=lambda: 100.0)
    before = {k: list(v) for k, v in state.routes.items()}
    pair = next((s, d) for s in ("g0", "g1") for d in ("g2", "g3") if "a0" in tiny.path(s, d))
    assert api.handle(f"/path?src={pair[0]}&dst={pair[1]}")[1]["nodes"] == tiny.path(*pair)
    # t0's port towards a0 goes down
    dpid = tiny.node("t0").dpid
    changes = state.on_port_status(dpid, tiny.port_to("t0", "a0"), False, 50.0)
    assert state.links_down == {("t0", "a0")}
    assert changes and set(changes) <= {sw.name for sw in tiny.switches}
    # the diff applied to the old tables gives the new ones
    for name, (add, delete) in changes.items():
        table = {(e.priority, e.ipv4_dst, e.ipv4_src): e for e in before[name]}
        for e in delete:
            del table[(e.priority, e.ipv4_dst, e.ipv4_src)]
        for e in add:
            table[(e.priority, e.ipv4_dst, e.ipv4_src)] = e
        assert sorted(table.values()) == state.routes[name]
    assert state.routes == flow_entries(tiny, {("t0", "a0")})
    for src in tiny.gpu_names():
        for dst in tiny.gpu_names():
            if src != dst:
                nodes = walk(tiny, state.routes, src, dst)
                assert "a0" not in nodes or tiny.tier_distance(src, dst) < 2
    code, body = api.handle(f"/path?src={pair[0]}&dst={pair[1]}")
    assert code == 200 and "a1" in body["nodes"] and "a0" not in body["nodes"]
    assert body["nodes"] != tiny.path(*pair) and body["links_down"] == []
    status = state.status(60.0)
    assert status["links_down"] == [["t0", "a0"]] and status["routes_version"] == 1
    change = status["reroutes"][-1]
    assert change["link"] == ["t0", "a0"] and change["up"] is False and change["confirmed_s"] is None
    # the same port reported down again changes nothing; the barriers confirm the change
    assert state.on_port_status(dpid, tiny.port_to("t0", "a0"), False, 51.0) == {}
    for name in changes:
        state.routes_sent[tiny.node(name).dpid] = 1
        state.on_routes_confirmed(tiny.node(name).dpid, 50.25)
    change = state.status(60.0)["reroutes"][-1]
    assert change["confirmed_s"] == 50.25 and change["confirm_ms"] == 250.0 and change["pending"] == []
    # up again: back to the usual routes
    state.on_port_status(dpid, tiny.port_to("t0", "a0"), True, 70.0)
    assert state.links_down == set() and state.routes == {k: sorted(v) for k, v in before.items()}
    assert api.handle(f"/path?src={pair[0]}&dst={pair[1]}")[1]["nodes"] == tiny.path(*pair)


def test_path_schema_lists_the_new_keys() -> None:
    from controller.openapi import document

    doc = document()
    schemas = doc["components"]["schemas"]
    assert {"links_down", "routes_version", "reroutes"} <= set(schemas["Status"]["properties"])
    assert "links_down" in schemas["Path"]["properties"]


# -- the oracle ---------------------------------------------------------------------------
def test_static_oracle_routes_around_a_down_link_and_prices_a_re_rated_one(
        fattree: topologies.Topology) -> None:
    oracle = StaticOracle(fattree)
    size = 10**9
    base = oracle.estimate("g0", "g32", size, 0.0)
    assert ("a0", "c0") in zip(fattree.path("g0", "g32"), fattree.path("g0", "g32")[1:])
    oracle.set_link("c0", "a0", up=False)
    detour = oracle.estimate("g0", "g32", size, 0.0)
    assert detour.transfer_ms == pytest.approx(base.transfer_ms)  # an equal-cost path at the same rate
    assert oracle.paths.route("g0", "g32") == fattree.path("g0", "g32", {("a0", "c0")})
    # a GPU's only link down: no path avoids it; the transfer is priced unavailable, finite
    oracle.set_link("g0", "v0", up=False)
    cut = oracle.estimate("g0", "g32", size, 0.0)
    assert cut.available_gbps == DOWN_LINK_GBPS and math.isfinite(cut.transfer_ms)
    assert cut.transfer_ms > 1e6 * base.transfer_ms
    assert oracle.estimate("g0", "g32", 0, 0.0).transfer_ms == cut.base_latency_ms  # 0 bytes: no NaN
    assert oracle.transfer_table("g0", 0.0)["g32"][2] == pytest.approx(8 / (DOWN_LINK_GBPS * 1e6))
    oracle.set_link("g0", "v0", up=True)
    oracle.set_link("a0", "c0", up=True)
    assert oracle.estimate("g0", "g32", size, 0.0) == base
    # the server uplink re-rated to a quarter of its rate becomes the bottleneck
    uplink = fattree.link_between("v0", "t0")
    oracle.set_link("v0", "t0", rate_gbps=uplink.rate_gbps / 4)
    slow = oracle.estimate("g0", "g32", size, 0.0)
    assert slow.available_gbps == pytest.approx(min(uplink.rate_gbps / 4, fattree.bottleneck_gbps("g0", "g32")))
    with pytest.raises(ValueError, match="rate_gbps must be finite and > 0"):
        oracle.set_link("v0", "t0", rate_gbps=0.0)


def test_telemetry_oracle_prices_down_and_re_rated_links_from_the_new_capacity(
        fattree: topologies.Topology) -> None:
    now = 1000.0
    samples = []
    for link in fattree.links:
        for x, y in ((link.a, link.b), (link.b, link.a)):
            samples.append(LinkSample(x, y, now, 10.0, link.rate_gbps, 10.0 / link.rate_gbps, 0, 0))
    snap = TelemetrySnapshot.of(samples)
    oracle = TelemetryOracle(fattree, lambda: snap)
    size = 10**9
    before = oracle.estimate("g0", "g32", size, now)
    assert before.source == "telemetry"
    uplink = fattree.link_between("v0", "t0")
    oracle.set_link("v0", "t0", rate_gbps=40.0)
    est = oracle.estimate("g0", "g32", size, now)
    assert est.source == "telemetry" and est.available_gbps == pytest.approx(min(40.0 - 10.0, before.available_gbps))
    assert uplink.rate_gbps != 40.0
    table = oracle.transfer_table("g0", now)
    assert table["g32"][2] == pytest.approx(8 / (est.available_gbps * 1e6))  # the fast path agrees
    oracle.set_link("v0", "t0", up=False)
    down = oracle.estimate("g0", "g32", size, now)
    assert down.available_gbps == pytest.approx(faults_floor()) and down.transfer_ms > 1e6 * before.transfer_ms
    assert oracle.transfer_table("g0", now)["g32"][2] == pytest.approx(8 / (down.available_gbps * 1e6))
    # a core link down: the detour is measured and priced like any path
    oracle.set_link("v0", "t0", up=True)
    oracle.set_link("a0", "c0", up=False)
    detour = oracle.estimate("g0", "g32", size, now)
    assert detour.source == "telemetry" and detour.available_gbps == pytest.approx(30.0)


def faults_floor() -> float:
    # a down hop: capacity DOWN_LINK_GBPS, 10 Gbit/s measured on it -> the floor fraction of it
    from netkv.oracle import MIN_AVAILABLE_FRACTION

    return MIN_AVAILABLE_FRACTION * DOWN_LINK_GBPS


# -- the frontend and a killed worker -------------------------------------------------
HOSTS = ["g0", "g1", "g8", "g9"]  # mixed placement: prefill g0 g8, decode g1 g9
FAST = {"prefill_mfu": 1.0, "decode_hbm_efficiency": 1.0}


@pytest.fixture(scope="module")
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nkf-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_killed_decode_is_detected_failed_with_reason_and_chosen_again_after_restart(short_dir: Path) -> None:
    cfg = ReplayConfig(trace_path=str(DEFAULT_TRACE), topology="fattree", max_requests=60, rate_multiplier=2.0,
                       placement={"scheme": "mixed", "hosts": HOSTS}, scheduler="round_robin",
                       perf_overrides=dict(FAST), drain_timeout_s=30.0, scale_factor=1000.0)
    window = cfg.window().requests
    kill_t_s = window[len(window) // 3].arrival_ms / 1000.0
    events = [Event("worker_kill", kill_t_s, host="g9", restart_after_s=1.0)]
    run_dir = short_dir / "kill"
    run_dir.mkdir()
    runner = FaultRunner(None, events, run_dir)
    try:
        summary = replay(cfg, LocalLauncher(), run_dir, on_start=runner.attach)
    finally:
        runner.stop()
    recs = read_records(run_dir / "records.jsonl")
    assert validate_file(run_dir / "records.jsonl", [r.request_id for r in window]) == []
    assert len(recs) == len(window) == summary["requests"]  # requests in = records out
    lines = [json.loads(x) for x in (run_dir / faults.EVENTS_FILE).read_text().splitlines()]
    kill, restart = lines[0], lines[1]
    assert kill["kind"] == "worker_kill" and kill["outcome"] == "ok" and kill["role"] == "decode"
    assert kill["requested_t_s"] == pytest.approx(kill_t_s)
    assert 0 <= kill["actual_t_s"] - kill_t_s < 0.5
    assert kill["detected_ms"] < 1000 * (0.5 + 0.2)  # control socket or watchdog, well within a second
    assert restart["kind"] == "worker_restart" and restart["outcome"] == "ok"
    assert restart["actual_t_s"] >= kill_t_s + 1.0 and restart["back_t_s"] >= restart["actual_t_s"]
    failed = [r for r in recs if r["status"] == "failed"]
    assert len(failed) == kill["requests_failed"]
    for r in failed:
        assert r["decode"] == "g9" and r["reason"].startswith("decode worker g9 exited with code -9 (")
    kill_ms, back_ms = kill["actual_t_s"] * 1000, restart["back_t_s"] * 1000
    # not chosen while dead; chosen again, and served, once back
    assert not [r for r in recs if r["decode"] == "g9" and kill_ms + kill["detected_ms"] + 50 < r["arrival_ms"] < back_ms - 50]
    assert [r for r in recs if r["decode"] == "g9" and r["arrival_ms"] > back_ms and r["status"] == "ok"]


def test_a_switch_lost_while_the_controller_runs_is_routed_around_until_it_is_back(
        tiny: topologies.Topology) -> None:
    state = ControllerState(tiny, scale=1000.0)
    before = {k: list(v) for k, v in state.routes.items()}
    a0 = tiny.node("a0").dpid
    state.on_connect(a0, 1.0)
    assert state.links_down == set()  # a first connection changes nothing
    changes = state.on_disconnect(a0, 2.0)
    assert state.switches_down == {"a0"} and changes
    assert state.links_down == {link.key for link in tiny.links_of("a0")}
    for src in tiny.gpu_names():
        for dst in tiny.gpu_names():
            if src != dst:
                assert "a0" not in walk(tiny, state.routes, src, dst)
    assert state.status(3.0)["reroutes"][-1]["switch"] == "a0"
    back = state.on_connect(a0, 5.0)
    assert back and state.switches_down == set() and state.routes == before


def test_report_summarises_fault_events_and_ttft_around_them(tmp_path: Path) -> None:
    from lab.report import fault_figures

    assert fault_figures(tmp_path, []) == {}
    lines = [{"event": 0, "kind": "worker_kill", "requested_t_s": 2.0, "actual_t_s": 2.01, "outcome": "ok",
              "detected_ms": 3.5, "requests_failed": 1, "pid": 7},
             {"kind": "restore", "link": ["a0", "c0"], "outcome": "ok"}]
    (tmp_path / faults.EVENTS_FILE).write_text("".join(json.dumps(x) + "\n" for x in lines))
    recs = [{"status": "ok", "ttft_ms": 100.0, "arrival_ms": 1000.0},
            {"status": "ok", "ttft_ms": 300.0, "arrival_ms": 2500.0},
            {"status": "failed", "ttft_ms": None, "arrival_ms": 2600.0}]
    out = fault_figures(tmp_path, recs)
    assert out["fault_events"] == [{"kind": "worker_kill", "requested_t_s": 2.0, "actual_t_s": 2.01,
                                    "outcome": "ok", "detected_ms": 3.5, "requests_failed": 1}]
    assert out["ttft_mean_ms_before_faults"] == 100.0 and out["ttft_mean_ms_from_first_fault"] == 300.0
    assert out["failed_from_first_fault"] == 1
