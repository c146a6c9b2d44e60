"""Faults as scenario events on the real emulated fabric (root, tiny fabric).

One test per event kind: the event happens at its time (events.jsonl), the
replay finishes, requests in = records out, and the behaviour the testbed
promises is asserted from the records, the controller's API and the switches'
own flow tables.  Every test restores the fabric (the fault runner does), so
they share one testbed."""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from controller.routing import flow_entries, walk
from fabric import cleanup, switches, system, verify
from fabric import faults as fabric_faults
from fabric.config import emulated_mbps
from fabric.net import Testbed
from lab import scenario
from lab.emulator import replay_under_scenario
from lab.faults import EVENTS_FILE
from lab.rundir import TELEMETRY_SERIES
from netkv.records import read_records, validate_file
from netkv.serving.config import ReplayConfig
from netkv.traces import DEFAULT_TRACE
from tests.helpers.fabric import running_testbed

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def tb() -> Any:
    yield from running_testbed("f")


def faulted_replay(tb: Testbed, run_dir: Path, events: list[dict[str, Any]], *,
                   during: Callable[[], None] | None = None, **replay: Any) -> dict[str, Any]:
    """A short replay (24 requests of the first 10 s of the trace, arrivals in
    bursts at 0, 3, 6 and 9 s) under the events; ``during`` runs in a thread
    meanwhile.  Returns what the test reads."""
    scen = scenario.parse({"name": "t", "flows": [], "events": events}, tb.topo)
    settings: dict[str, Any] = dict(trace_path=str(DEFAULT_TRACE), duration_s=10.0, max_requests=24,
                                    topology="tiny", scheduler="round_robin", scale_factor=tb.config.scale,
                                    drain_timeout_s=60.0, oracle="telemetry")
    settings.update(replay)
    cfg = ReplayConfig(**settings)
    run_dir.mkdir()
    probe = threading.Thread(target=during) if during is not None else None
    if probe is not None:
        probe.start()
    try:
        summary, envelope = replay_under_scenario(tb, cfg, scen, run_dir)
    finally:
        if probe is not None:
            probe.join(timeout=60)
    records = read_records(run_dir / "records.jsonl")
    ids = [r.request_id for r in cfg.window().requests]
    assert validate_file(run_dir / "records.jsonl", ids) == []
    assert len(records) == len(ids) == summary["requests"], "requests in != records out"
    lines = [json.loads(x) for x in (run_dir / EVENTS_FILE).read_text().splitlines()]
    for rec in lines:
        assert str(rec["outcome"]).startswith("ok"), rec
    for rec, ev in zip([x for x in lines if "event" in x], scen.events):
        assert rec["kind"] == ev.kind and rec["requested_t_s"] == ev.t_s
        assert 0 <= rec["actual_t_s"] - ev.t_s < 0.5, rec  # at its time, on the replay clock
    return {"summary": summary, "envelope": envelope, "records": records, "events": lines, "dir": run_dir}


def wait_for_event(run_dir: Path, kind: str, timeout_s: float = 40.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        path = run_dir / EVENTS_FILE
        if path.exists():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("kind") == kind:
                    return rec  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"no {kind} in {run_dir / EVENTS_FILE} within {timeout_s} s")


def test_link_down_moves_routes_and_link_up_moves_them_back(tb: Testbed, tmp_path: Path) -> None:
    # g0 -> g3 (a prefill to a decode) normally crosses t0-a1; t0-a0 is the other equal-cost path.
    assert tb.topo.path("g0", "g3")[3] == "a1"
    run_dir = tmp_path / "run"
    seen: dict[str, Any] = {}

    def during() -> None:
        wait_for_event(run_dir, "link_down")
        seen["path"] = tb.rest_get("/path?src=g0&dst=g3")
        seen["status"] = tb.rest_get("/status")
        seen["ovs"] = walk(tb.topo, verify.flow_tables(tb), "g0", "g3")  # the switches' own tables

    out = faulted_replay(tb, run_dir, [{"kind": "link_down", "t_s": 2, "link": ["t0", "a1"]},
                                       {"kind": "link_up", "t_s": 7, "link": ["a1", "t0"]}], during=during)
    down, up = out["events"][0], out["events"][1]
    for rec in (down, up):
        assert rec["reroute"] is not None and rec["event_to_routes_ms"] < 3000, rec
        assert "t0" in rec["reroute"]["switches"]
    assert seen["path"]["nodes"][3] == "a0" and seen["ovs"][3] == "a0"
    assert seen["status"]["links_down"] == [["t0", "a1"]]
    # transfers kept going: every request ended ok (TCP retransmitted onto the detour)
    assert [r["reason"] for r in out["records"] if r["status"] != "ok"] == []
    crossed = [r for r in out["records"] if r["prefill"] == "g0" and r["decode"] == "g3"]
    assert crossed, "round robin should send g0's KV to g3"
    # after the run: back on the usual path, in the controller and in the switches
    assert tb.rest_get("/path?src=g0&dst=g3")["nodes"][3] == "a1"
    assert walk(tb.topo, verify.flow_tables(tb), "g0", "g3")[3] == "a1"
    assert tb.rest_get("/status")["links_down"] == []


def htb_rate_kbit(tb: Testbed, node: str, ifname: str) -> float:
    argv = ["tc", "class", "show", "dev", ifname]
    text = system.run(tb.in_host(node, argv) if tb.topo.node(node).is_gpu else tb.in_switch(node, argv)).stdout
    words = text.split()
    rate = words[words.index("rate") + 1]
    scale = {"Kbit": 1, "Mbit": 1000, "Gbit": 1e6, "bit": 1e-3}
    for unit, factor in scale.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * factor
    raise AssertionError(text)


def test_link_rate_reshapes_both_ends_and_the_oracle_prices_the_new_rate(tb: Testbed, tmp_path: Path) -> None:
    link = tb.topo.link_between("v0", "t0")  # every transfer of this placement crosses it
    new_gbps = link.rate_gbps / 10
    ends = [(n, tb.intf(n, link.port_of(n))) for n in (link.a, link.b)]
    nominal = [htb_rate_kbit(tb, n, i) for n, i in ends]
    run_dir = tmp_path / "run"
    seen: dict[str, Any] = {}

    def during() -> None:
        wait_for_event(run_dir, "link_rate")
        seen["kbit"] = [htb_rate_kbit(tb, n, i) for n, i in ends]
        seen["controller_gbps"] = tb.rest_get("/links/t0/v0")["capacity_gbps"]
        seen["oracle"] = tb.rest_get("/oracle?src=g0&dst=g2&bytes=1000000000")

    out = faulted_replay(tb, run_dir, [{"kind": "link_rate", "t_s": 2.5, "link": ["v0", "t0"],
                                        "rate_gbps": new_gbps}], during=during, scheduler="netkv",
                         placement={"scheme": "explicit", "prefill": ["g0", "g1"], "decode": ["g2", "g3"]})
    want_kbit = emulated_mbps(new_gbps, tb.config.scale) * 1000
    assert all(abs(k - want_kbit) <= 0.02 * want_kbit for k in seen["kbit"]), (seen, want_kbit)
    assert [htb_rate_kbit(tb, n, i) for n, i in ends] == nominal  # restored after the replay
    # the controller was told: its capacity and its own oracle used the new rate, and
    # the nominal one again after the replay
    assert out["events"][0]["controller_rate_gbps"] == new_gbps
    assert seen["controller_gbps"] == new_gbps
    for kind in ("static", "telemetry"):
        assert seen["oracle"][kind]["available_gbps"] <= new_gbps, seen["oracle"]
    assert tb.rest_get("/links/t0/v0")["capacity_gbps"] == link.rate_gbps
    assert tb.rest_get("/oracle?src=g0&dst=g2&bytes=1000000000")["static"]["available_gbps"] > new_gbps
    event_ms = out["events"][0]["done_t_s"] * 1000
    ok = [r for r in out["records"] if r["status"] == "ok"]
    assert len(ok) == len(out["records"])
    # decided after the event was done (requests are dispatched at their arrival)
    after = [r for r in ok if r["arrival_ms"] > event_ms + 100]
    before = [r for r in ok if r["arrival_ms"] < event_ms - 500 and r["transfer_end_ms"] < event_ms]
    assert after and before
    slow_ms = [r["kv_bytes"] * 8 / (new_gbps * 1e9) * 1000 for r in after]
    # the oracle priced the new rate (an estimate at or above the transfer at the new rate) ...
    for r, ideal in zip(after, slow_ms):
        assert r["estimate_transfer_ms"] >= 0.95 * ideal, (r["request_id"], r["estimate_transfer_ms"], ideal)
    for r in before:
        assert r["estimate_transfer_ms"] < 0.5 * r["kv_bytes"] * 8 / (new_gbps * 1e9) * 1000
    # ... and the link carried them at about that rate, not faster
    ratios = [(r["transfer_end_ms"] - r["transfer_start_ms"]) / ideal for r, ideal in zip(after, slow_ms)]
    assert statistics.median(ratios) >= 0.8, ratios


def test_killed_decode_worker_fails_its_requests_with_reason_and_serves_again_after_restart(
        tb: Testbed, tmp_path: Path) -> None:
    # killed before the burst at 3 s (which must avoid it), back before the bursts at 6 and 9 s
    out = faulted_replay(tb, tmp_path / "run", [{"kind": "worker_kill", "t_s": 2.5, "host": "g3",
                                                 "restart_after_s": 2.5}], max_requests=32)
    kill = out["events"][0]
    restart = next(x for x in out["events"] if x["kind"] == "worker_restart")
    assert kill["role"] == "decode" and kill["detected_ms"] < 1000, kill
    assert kill["actual_t_s"] + 2.5 <= restart["back_t_s"] < 5.9, restart
    failed = [r for r in out["records"] if r["status"] == "failed"]
    assert len(failed) == kill["requests_failed"]
    for r in failed:
        assert r["decode"] == "g3" and r["reason"].startswith("decode worker g3 exited with code -9 ("), r
    kill_ms, back_ms = kill["actual_t_s"] * 1000, restart["back_t_s"] * 1000
    dead = [r for r in out["records"] if r["decode"] == "g3"
            and kill_ms + kill["detected_ms"] + 50 < r["arrival_ms"] < back_ms - 50]
    assert dead == [], "a dead decode was chosen"
    assert [r for r in out["records"] if 3000 <= r["arrival_ms"] < back_ms], "no arrival while it was dead"
    assert [r for r in out["records"] if r["decode"] == "g3" and r["arrival_ms"] > back_ms and r["status"] == "ok"]
    run = json.loads((out["dir"] / "run.json").read_text())
    assert run["workers"]["g3"]["pid"] == restart["pid"]  # the restarted worker was stopped at the end by pid
    assert not system.process_alive(restart["pid"]) and not system.process_alive(kill["pid"])


def test_controller_restart_switches_keep_forwarding_telemetry_stale_then_resumed(
        tb: Testbed, tmp_path: Path) -> None:
    old_pid = tb.controller.pid if tb.controller is not None else None
    run_dir = tmp_path / "run"
    seen: dict[str, Any] = {}

    def during() -> None:
        wait_for_event(run_dir, "controller_restart")
        seen["rerated_gbps"] = tb.rest_get("/links/a0/t1")["capacity_gbps"]

    # a link re-rated before the outage: the restarted controller is told again
    out = faulted_replay(tb, run_dir, [{"kind": "link_rate", "t_s": 1.0, "link": ["t1", "a0"], "rate_gbps": 100},
                                       {"kind": "controller_restart", "t_s": 2.5, "down_s": 3.0}], during=during)
    assert out["events"][0]["controller_rate_gbps"] == 100
    assert seen["rerated_gbps"] == 100
    assert tb.rest_get("/links/a0/t1")["capacity_gbps"] == tb.topo.link_between("t1", "a0").rate_gbps
    ev = next(e for e in out["events"] if e["kind"] == "controller_restart")
    assert ev["pid_killed"] == old_pid and ev["pid"] != old_pid and tb.controller is not None
    assert cleanup.read_state(tb.prefix)["controller_pid"] == ev["pid"] == tb.controller.pid
    assert ev["routes_ready_ms"] < 15000
    # the oracle said it had fallen back while telemetry aged, and was live again afterwards
    assert ev["oracle_during_outage"]["source"] == "static-fallback", ev
    assert ev["telemetry_resumed_ms"] is not None and ev["telemetry_resumed_ms"] < 10000
    assert ev["oracle_after"]["source"] == "telemetry", ev
    # the switches kept forwarding on the routes they held: nothing was lost
    assert [r["reason"] for r in out["records"] if r["status"] != "ok"] == []
    # telemetry.jsonl: polls stopped for the outage and resumed after it
    times = [json.loads(x)["t_s"] for x in (out["dir"] / TELEMETRY_SERIES).read_text().splitlines()]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) >= 2.5, gaps
    start = out["summary"]["run_start_epoch_s"]
    assert any(t > start + ev["done_t_s"] for t in times), "telemetry did not resume during the replay"
    assert tb.rest_get("/status")["ready"] is True


def test_switch_restart_routes_go_around_it_and_it_gets_its_routes_back(tb: Testbed, tmp_path: Path) -> None:
    old_pid = tb.switch_pids["a1"]
    run_dir = tmp_path / "run"
    seen: dict[str, Any] = {}

    def during() -> None:
        wait_for_event(run_dir, "switch_restart")
        seen["status"] = tb.rest_get("/status")

    out = faulted_replay(tb, run_dir, [{"kind": "switch_restart", "t_s": 2.5, "switch": "a1", "down_s": 1.0}],
                         during=during)
    ev = out["events"][0]
    assert old_pid in ev["pids_killed"] and ev["pid"] == tb.switch_pids["a1"] != old_pid
    assert switches.vswitchd_alive(ev["pid"]) and not system.process_alive(old_pid)
    changes = [c for c in seen["status"]["reroutes"] if c.get("switch") == "a1"]
    assert [c["up"] for c in changes][-2:] == [False, True], changes  # routed around it, then back
    assert [r["reason"] for r in out["records"] if r["status"] != "ok"] == []
    assert verify.flow_tables(tb)["a1"] == flow_entries(tb.topo)["a1"]
    assert out["envelope"]["switch_processes_died"] == []


@pytest.fixture(scope="module")
def shared_tb() -> Any:
    yield from running_testbed("g", switch_mode="shared")


def test_switch_restart_on_the_shared_open_vswitch_deletes_and_adds_its_bridge(
        shared_tb: Testbed, tmp_path: Path) -> None:
    tb = shared_tb
    assert not tb.per_switch
    bridge = tb.mn_name("a1")
    ends = [("a1", name) for name, _ in tb.switch_ports("a1")]
    nominal_kbit = [htb_rate_kbit(tb, n, i) for n, i in ends]
    run_dir = tmp_path / "run"
    seen: dict[str, Any] = {}

    def during() -> None:
        # while the bridge is gone: the switch does not exist in Open vSwitch
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and fabric_faults.shared_bridge_exists(tb, "a1"):
            time.sleep(0.02)
        seen["bridge_gone"] = not fabric_faults.shared_bridge_exists(tb, "a1")
        wait_for_event(run_dir, "switch_restart")
        seen["status"] = tb.rest_get("/status")

    out = faulted_replay(tb, run_dir, [{"kind": "switch_restart", "t_s": 2.5, "switch": "a1", "down_s": 1.0}],
                         during=during)
    ev = out["events"][0]
    print(f"shared switch_restart a1: down {ev['down_ms']:.0f} ms, routes ready {ev['routes_ready_ms']:.0f} ms "
          f"after the bridge was added again")
    assert ev["switch_mode"] == "shared" and ev["pids_killed"] == [] and ev["pid"] is None, ev
    assert seen["bridge_gone"] and fabric_faults.shared_bridge_exists(tb, "a1")
    assert ev["routes_ready_ms"] < 15000, ev
    changes = [c for c in seen["status"]["reroutes"] if c.get("switch") == "a1"]
    assert [c["up"] for c in changes][-2:] == [False, True], changes  # routed around it, then back
    assert [r["reason"] for r in out["records"] if r["status"] != "ok"] == []
    # the bridge as bring-up made it: same ports and numbers (the flow entries name them),
    # the controller's whole table, and its ends shaped at the links' rates
    assert verify.flow_tables(tb)["a1"] == flow_entries(tb.topo)["a1"]
    rows = system.run(["ovs-vsctl", "--format=csv", "--no-headings", "--columns=name,ofport",
                       "list", "Interface"]).stdout.split()
    assert sorted(r for r in rows if r.startswith(f"{bridge}-eth")) == \
        sorted(f"{name},{port}" for name, port in tb.switch_ports("a1"))
    assert [htb_rate_kbit(tb, n, i) for n, i in ends] == nominal_kbit
