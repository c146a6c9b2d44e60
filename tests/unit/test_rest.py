"""The REST API without root: routing, errors, oracle, metrics, loopback-only sockets."""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from controller import top
from controller.rest import Api, require_loopback, serve
from fabric.system import stop_child
from tests.helpers.controller import NOW, loaded_state

ROOT = Path(__file__).resolve().parents[2]
SCALE = 20_000.0




@pytest.fixture()
def api() -> Api:
    return Api(loaded_state(), clock=lambda: NOW)


@pytest.mark.parametrize("path,status,fragment", [
    ("/nope/x", 404, "unknown endpoint"),
    ("/nope", 404, "unknown endpoint"),
    ("/path", 400, "'src' is required"),
    ("/path?src=g0", 400, "'dst' is required"),
    ("/path?src=g0&dst=g0", 400, "same host"),
    ("/path?src=g0&dst=g99", 404, "unknown GPU host 'g99'"),
    ("/path?src=t0&dst=g1", 404, "unknown GPU host 't0'"),
    ("/path?src=g0&src=g1&dst=g2", 400, "exactly once"),
    ("/oracle?src=g0&dst=g3", 400, "'bytes' is required"),
    ("/oracle?src=g0&dst=g3&bytes=", 400, "'bytes' is required"),
    ("/oracle?src=g0&dst=g3&bytes=-5", 400, "bytes must be in 0.."),
    ("/oracle?src=g0&dst=g3&bytes=1.5", 400, "whole number"),
    ("/oracle?src=g0&dst=g3&bytes=1e6", 400, "whole number"),
    ("/oracle?src=g0&dst=g3&bytes=abc", 400, "whole number"),
    ("/oracle?src=g0&dst=g3&bytes=99999999999999999999", 400, "bytes must be in 0.."),
    ("/oracle?src=gX&dst=g3&bytes=10", 404, "unknown GPU host"),
    ("/oracle?src=g0&dst=g3&bytes=10&size=3", 400, "unknown query parameter 'size'"),
    ("/links?tier=7", 400, "tier must be in"),
    ("/links?tier=x", 400, "whole number"),
    ("/links?group=pod", 400, "group must be 'tier'"),
    ("/links?limit=0", 400, "limit must be in 1.."),
    ("/links?junk", 400, "malformed query"),
    ("/links/t0", 404, "/links/<src>/<dst>"),
    ("/links/t0/t1", 404, "no link from 't0' to 't1'"),
    ("/links/zz/t1", 404, "unknown node 'zz'"),
    ("/status/x", 404, "no sub-resources"),
    ("/?link=t0>t1", 400, "link must be SRC>DST"),
    ("/?link=zz", 400, "link must be SRC>DST"),
    ("/?pair=g0>g0", 400, "the same host"),
    ("/?pair=g0>g99", 404, "unknown GPU host 'g99'"),
    ("/?bytes=-1", 400, "bytes must be in 0.."),
    ("/?tab=1", 400, "unknown query parameter 'tab'"),
])
def test_malformed_queries_get_4xx_json_errors(api: Api, path: str, status: int, fragment: str) -> None:
    code, body = api.handle(path)
    assert code == status
    assert fragment in body["error"]


def test_links_busiest_first_grouped_and_filtered(api: Api) -> None:
    code, body = api.handle("/links")
    assert code == 200
    rows = body["links"]
    assert len(rows) == 2 * len(api.state.topo.links)
    assert (rows[0]["src"], rows[0]["dst"]) == ("t0", "a1")
    assert rows[0]["utilization"] == pytest.approx(0.9)
    assert rows[0]["load_gbps"] == pytest.approx(9e6 * SCALE / 1e9)
    assert rows[0]["queue"]["backlog_bytes"] == 9000
    assert all(r["utilization"] == 0 for r in rows[1:])
    code, body = api.handle("/links?group=tier")
    assert set(body["by_tier"]) == {"0", "1", "2"}
    assert body["by_tier"]["2"][0]["src"] == "t0"
    assert all(r["tier"] == 1 for r in body["by_tier"]["1"])
    code, body = api.handle("/links?tier=0&limit=3")
    assert len(body["links"]) == 3 and all(r["tier"] == 0 for r in body["links"])


def test_links_snapshot_is_what_the_telemetry_reader_expects(api: Api) -> None:
    from netkv.telemetry import TelemetrySnapshot

    _, body = api.handle("/links")
    snap = TelemetrySnapshot.from_json(json.loads(json.dumps(body)))
    assert snap.get("t0", "a1") is not None
    assert snap.get("t0", "a1").utilization == pytest.approx(0.9)  # type: ignore[union-attr]


def test_link_history(api: Api) -> None:
    code, body = api.handle("/links/t0/a1?limit=5")
    assert code == 200
    assert body["interface"].startswith("nct0-eth")
    assert len(body["history"]) == 1
    assert body["history"][0]["rate_bps"] == pytest.approx(9e6)


def test_path_reports_installed_path_and_alternatives(api: Api) -> None:
    code, body = api.handle("/path?src=g0&dst=g3")
    assert code == 200
    topo = api.state.topo
    assert body["nodes"] == topo.path("g0", "g3")
    assert body["alternatives"] and body["nodes"] not in body["alternatives"]
    assert [(h["src"], h["dst"]) for h in body["hops"]] == topo.path_hops("g0", "g3")
    assert all(h["age_ms"] == pytest.approx(200.0) for h in body["hops"])


def test_oracle_uses_the_controllers_samples(api: Api) -> None:
    topo = api.state.topo
    # the two cross-rack paths g0->g2 / g0->g3 / g1->.. go through a0 or a1; find a pair on each
    pairs = {}
    for src in ("g0", "g1"):
        for dst in ("g2", "g3"):
            pairs[topo.path(src, dst)[3]] = (src, dst)
    assert set(pairs) == {"a0", "a1"}, "tiny must spread pairs over both aggregation switches"
    size = 10**9
    busy = api.handle(f"/oracle?src={pairs['a1'][0]}&dst={pairs['a1'][1]}&bytes={size}")[1]
    idle = api.handle(f"/oracle?src={pairs['a0'][0]}&dst={pairs['a0'][1]}&bytes={size}")[1]
    assert busy["telemetry"]["source"] == "telemetry" and idle["telemetry"]["source"] == "telemetry"
    assert busy["telemetry"]["telemetry_age_ms"] == pytest.approx(200.0)
    # t0->a1 has 20 of 200 Gbit/s free: the estimate is ~10x the idle one
    assert busy["telemetry"]["available_gbps"] == pytest.approx(20.0)
    assert idle["telemetry"]["available_gbps"] == pytest.approx(200.0)
    assert busy["telemetry"]["transfer_ms"] > 5 * idle["telemetry"]["transfer_ms"]
    assert busy["static"]["transfer_ms"] == pytest.approx(idle["static"]["transfer_ms"])
    assert busy["static"]["source"] == "static"


def test_oracle_falls_back_to_static_when_telemetry_is_old() -> None:
    state = loaded_state()
    api = Api(state, clock=lambda: NOW + 60.0)
    _, body = api.handle("/oracle?src=g0&dst=g3&bytes=1000")
    assert body["telemetry"]["source"] == "static-fallback"
    assert "old" in body["telemetry"]["reason"]


def test_metrics_exposition(api: Api) -> None:
    status, ctype, data = api.respond("/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    text = data.decode()
    lines = text.splitlines()
    samples = [l for l in lines if not l.startswith("#")]
    for line in samples:
        name_labels, value = line.rsplit(" ", 1)
        float(value)
        assert name_labels.startswith("netkv_")
    busy = [l for l in samples if l.startswith('netkv_link_load_bits_per_second{src="t0",dst="a1",tier="2"}')]
    assert len(busy) == 1 and float(busy[0].split()[-1]) == pytest.approx(9e6 * SCALE)
    assert any(l.startswith('netkv_link_utilization_ratio{src="t0",dst="a1"') and l.endswith(" 0.9") for l in samples)
    assert any(l.startswith("netkv_link_telemetry_age_seconds{") for l in samples)
    assert any(l.startswith('netkv_queue_backlog_bytes{src="t0",dst="a1"') and l.endswith(" 9000") for l in samples)
    for family in ("netkv_poll_rounds_total", "netkv_poll_replies_missing_total", "netkv_poller_up"):
        assert f"# TYPE {family} " in text
    # every sample's family is declared once
    declared = [l.split()[2] for l in lines if l.startswith("# TYPE")]
    assert len(declared) == len(set(declared))


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.2", "::", "localhost-ish", ""])
def test_api_refuses_to_bind_non_loopback(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        require_loopback(host)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine that is not loopback (None if it has none)."""
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in out.splitlines():
        addr = line.split()[3].split("/")[0]
        if not addr.startswith("127."):
            return addr
    return None


def connect_result(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=2):
            return "connected"
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return f"error: {exc}"


def test_http_server_answers_on_loopback_only() -> None:
    port = free_port()
    server = serve(loaded_state(), "127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as resp:
            assert resp.status == 200 and json.loads(resp.read())["topology"] == "tiny"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/oracle?src=g0&dst=g1&bytes=-1", timeout=5)
        assert err.value.code == 400 and "bytes" in json.loads(err.value.read())["error"]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/status", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 405
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain")
        other = non_loopback_ipv4()
        if other is None:
            pytest.skip("this machine has no non-loopback IPv4 address to try")
        assert connect_result(other, port) == "refused"
    finally:
        server.shutdown()


def test_controller_process_listens_on_loopback_only() -> None:
    """The real controller (os-ken OpenFlow listener + API), no switches needed."""
    other = non_loopback_ipv4()
    of_port, rest_port = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "controller", "--topology", "tiny", "--scale", "20000",
                             "--of-port", str(of_port), "--rest-port", str(rest_port), "--poll-interval-s", "0.1",
                             "--queue-interval-s", "0"],
                            cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/status", timeout=1) as resp:
                    status = json.loads(resp.read())
                if connect_result("127.0.0.1", of_port) == "connected":
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert status is not None, "controller API never answered"
        assert connect_result("127.0.0.1", of_port) == "connected"
        # the poller runs even with no switch connected
        time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/status", timeout=2) as resp:
            poller = json.loads(resp.read())["poller"]
        assert poller["alive"] is True and poller["rounds"] >= 3
        if other is None:
            pytest.skip("this machine has no non-loopback IPv4 address to try")
        assert connect_result(other, of_port) == "refused"
        assert connect_result(other, rest_port) == "refused"
    finally:
        stop_child(proc, grace_s=10)


def test_controller_refuses_non_loopback_listen_address() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "controller", "--topology", "tiny", "--scale", "20000",
                           "--of-host", "0.0.0.0"], cwd=str(ROOT), env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "loopback" in done.stderr


def test_top_renders_busiest_first_by_tier(api: Api) -> None:
    snap = {"status": api.handle("/status")[1], "links": api.handle("/links?group=tier")[1]}
    text = top.render(snap, limit=2, width=0)
    lines = text.splitlines()
    tier_lines = [i for i, l in enumerate(lines) if l.startswith("tier ")]
    assert [lines[i].split()[1] for i in tier_lines] == ["2", "1", "0"]  # core side first
    assert lines[tier_lines[0] + 2].startswith("t0>a1")  # busiest row of tier 2
    assert "90.0" in lines[tier_lines[0] + 2]
    assert "more (use --limit 0)" in text


def test_top_json_and_errors(api: Api) -> None:
    port = free_port()
    server = serve(api.state, "127.0.0.1", port)
    try:
        out = io.StringIO()
        args = argparse.Namespace(url=f"http://127.0.0.1:{port}", interval_s=None, tier=2, limit=10,
                                  once=False, json=True, timeout_s=2.0)
        assert top.run(args, out) == 0
        snap = json.loads(out.getvalue())
        assert {r["tier"] for r in snap["links"]["links"]} == {2}
        out = io.StringIO()
        args.json, args.once = False, True
        assert top.run(args, out) == 0 and "t0>a1" in out.getvalue()
    finally:
        server.shutdown()
    dead = argparse.Namespace(url=f"http://127.0.0.1:{free_port()}", interval_s=None, tier=None, limit=10,
                              once=True, json=False, timeout_s=1.0)
    assert top.run(dead, io.StringIO()) == 1
    dead.limit = -1
    assert top.run(dead, io.StringIO()) == 2


def test_top_add_parser_wires_a_telemetry_command() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers()
    top.add_parser(sub)
    args = ap.parse_args(["telemetry", "--once", "--url", "http://127.0.0.1:1"])
    assert args.func is top.run and args.once and args.url == "http://127.0.0.1:1"


# -- a link's configured rate (POST /links/<a>/<b>) ------------------------------------

def post_rate(api: Api, path: str, body: object) -> tuple[int, Any]:
    status, _, data = api.respond_post(path, json.dumps(body).encode())
    return status, json.loads(data)


def test_a_rerated_link_is_priced_and_measured_at_its_configured_rate(api: Api) -> None:
    size = 10**9
    before = api.handle(f"/oracle?src=g0&dst=g2&bytes={size}")[1]
    status, answer = post_rate(api, "/links/t0/v0", {"rate_gbps": 10})  # either order
    assert status == 200, answer
    assert answer == {"link": ["v0", "t0"], "rate_gbps": 10.0, "previous_gbps": 400.0, "topology_gbps": 400.0}
    assert api.handle("/links/v0/t0")[1]["capacity_gbps"] == 10.0
    assert api.handle("/links/t0/v0")[1]["capacity_gbps"] == 10.0
    path = api.handle("/path?src=g0&dst=g2")[1]
    assert path["bottleneck_gbps"] == 10.0
    assert [h["capacity_gbps"] for h in path["hops"] if {h["src"], h["dst"]} == {"v0", "t0"}] == [10.0]
    after = api.handle(f"/oracle?src=g0&dst=g2&bytes={size}")[1]
    for kind in ("static", "telemetry"):
        assert after[kind]["available_gbps"] <= 10.0, after[kind]
        assert after[kind]["transfer_ms"] > before[kind]["transfer_ms"] + 150, (before[kind], after[kind])
    #     # new samples of the link: utilisation against the configured rate
    state = api.state
    t0 = state.topo.node("t0")  # v0 -> t0 is counted where it enters t0
    port = state.topo.port_to("t0", "v0")
    for t_s, rx in ((NOW - 0.1, 0), (NOW, int(2e6 / 8 * 0.1))):  # 2 emulated Mbit/s for 0.1 s
        state.on_port_stats(t0.dpid, port, t_s, rx_bytes=rx, tx_bytes=0, rx_packets=0, tx_packets=0,
                            rx_dropped=0, tx_dropped=0, rx_errors=0, tx_errors=0)
    latest = {(r.src, r.dst): r for r in state.latest()}[("v0", "t0")]
    assert latest.t_s == NOW and latest.capacity_gbps == 10.0 and latest.load_gbps > 0
    assert latest.utilization == pytest.approx(latest.load_gbps / 10.0)
    # the topology's rate again ends the change
    assert post_rate(api, "/links/v0/t0", {"rate_gbps": 400})[1]["previous_gbps"] == 10.0
    assert state.capacity_overrides_gbps == {}
    assert api.handle(f"/oracle?src=g0&dst=g2&bytes={size}")[1]["static"] == before["static"]


def test_the_oracle_answers_for_links_out_of_service(api: Api) -> None:
    state = api.state
    v1 = state.topo.node("v1")
    state.on_port_status(v1.dpid, state.topo.port_to("v1", "t1"), False, NOW)
    answer = api.handle("/oracle?src=g0&dst=g2&bytes=1000")[1]
    assert answer["static"]["available_gbps"] < 1e-6, answer  # no path out of that server
    state.on_port_status(v1.dpid, state.topo.port_to("v1", "t1"), True, NOW)
    assert api.handle("/oracle?src=g0&dst=g2&bytes=1000")[1]["static"]["available_gbps"] == 200.0


@pytest.mark.parametrize("path,body,status,fragment", [
    ("/links/v0/t0", {"rate_gbps": 0}, 400, "finite number > 0"),
    ("/links/v0/t0", {"rate_gbps": -3}, 400, "finite number > 0"),
    ("/links/v0/t0", {"rate_gbps": "fast"}, 400, "finite number > 0"),
    ("/links/v0/t0", {"rate_gbps": True}, 400, "finite number > 0"),
    ("/links/v0/t0", {"rate_gbps": 40, "speed": 1}, 400, "must be {\"rate_gbps\": number}"),
    ("/links/v0/t0", [40], 400, "must be {\"rate_gbps\": number}"),
    ("/links/v0/zz", {"rate_gbps": 40}, 404, "unknown node 'zz'"),
    ("/links/v0/t1", {"rate_gbps": 40}, 404, "no link between 'v0' and 't1'"),
    ("/links/v0", {"rate_gbps": 40}, 405, "POST is only for"),
    ("/links/v0/t0/x", {"rate_gbps": 40}, 405, "POST is only for"),
])
def test_bad_link_rates_get_a_clear_4xx_and_change_nothing(
        api: Api, path: str, body: object, status: int, fragment: str) -> None:
    got, answer = post_rate(api, path, body)
    assert got == status and fragment in answer["error"], answer
    assert api.state.capacity_overrides_gbps == {}


def test_a_link_rate_body_that_is_not_json_is_refused(api: Api) -> None:
    status, _, data = api.respond_post("/links/v0/t0", b"{")
    assert status == 400 and "not JSON" in json.loads(data)["error"]
