"""The network cost oracle against real transfers (root: Mininet, Open vSwitch, os-ken, iperf3).

Two cross-rack GPU pairs of the tiny fabric have equally long paths through
different aggregation switches.  A background UDP iperf3 flow loads one of
them; the controller's ``/oracle`` (TelemetryOracle over the controller's own
samples) must rank the idle path cheaper, and its estimate for a payload must
be within 25% of the time a real TCP transfer of that payload (scaled down by
the testbed's factor) takes on each path.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from bench.telemetry import iperf_server, iperf_udp_client, rest_get, tcp_transfer_s, udp_wire_factor
from fabric.net import Testbed
from netkv.serving.config import wire_bytes
from tests.helpers.fabric import cross_pair, running_testbed

pytestmark = pytest.mark.root
POLL_INTERVAL_S = 0.5
TOLERANCE = 0.25


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    yield from running_testbed("o", poll_interval_s=POLL_INTERVAL_S)


def oracle(tb: Testbed, src: str, dst: str, real_bytes: int) -> dict[str, Any]:
    return rest_get(tb.rest_url, f"/oracle?src={src}&dst={dst}&bytes={real_bytes}")


def settle(tb: Testbed) -> None:
    """Wait until every hop has a sample taken entirely after now."""
    t = time.time()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = rest_get(tb.rest_url, "/links")["links"]
        if len(rows) == 2 * len(tb.topo.links) and all(r["t_s"] - r["interval_s"] >= t for r in rows):
            return
        time.sleep(0.1)
    raise AssertionError("telemetry did not refresh within 10 s")


def test_oracle_ranks_idle_path_cheaper_and_predicts_transfer_times(tb: Testbed) -> None:
    topo = tb.topo
    busy, idle = cross_pair(tb, "a1"), cross_pair(tb, "a0")
    assert len(topo.path(*busy)) == len(topo.path(*idle)), "the two paths must be equally long"
    narrow_busy = min(topo.path_links(*busy), key=lambda l: l.rate_gbps)
    cap_mbps = tb.emulated_mbps(narrow_busy)
    # background: 60% of the busy path's bottleneck (wire rate), for longer than both transfers
    bg_payload_mbps = 0.6 * cap_mbps / udp_wire_factor()
    # payload: ~3 s on the idle path's bottleneck
    idle_mbps = min(tb.emulated_mbps(l) for l in topo.path_links(*idle))
    emu_bytes = int(idle_mbps * 1e6 / 8 * 3.0)
    real_bytes = emu_bytes * int(tb.config.scale)
    assert wire_bytes(real_bytes, tb.config.scale) == emu_bytes

    server = iperf_server(tb, busy[1], 5211)
    bg = iperf_udp_client(tb, busy[0], busy[1], 5211, bg_payload_mbps, 40.0)
    try:
        time.sleep(0.5)
        settle(tb)
        est_busy = oracle(tb, *busy, real_bytes)
        est_idle = oracle(tb, *idle, real_bytes)
        for est in (est_busy, est_idle):
            assert est["telemetry"]["source"] == "telemetry", est
        print(f"ranking: busy {busy} {est_busy['telemetry']['transfer_ms']:.0f} ms "
              f"({est_busy['telemetry']['available_gbps']:.1f} Gbit/s free), idle {idle} "
              f"{est_idle['telemetry']['transfer_ms']:.0f} ms ({est_idle['telemetry']['available_gbps']:.1f} Gbit/s); "
              f"static both {est_busy['static']['transfer_ms']:.0f} ms")
        assert est_idle["telemetry"]["transfer_ms"] < est_busy["telemetry"]["transfer_ms"]
        assert est_busy["static"]["transfer_ms"] == pytest.approx(est_idle["static"]["transfer_ms"])

        results = {}
        for name, (src, dst), port in (("idle", idle, 5212), ("busy", busy, 5213)):
            settle(tb)  # the previous transfer's load has left the samples
            est = oracle(tb, src, dst, real_bytes)
            measured_ms = 1000 * tcp_transfer_s(tb, src, dst, emu_bytes, port)
            predicted_ms = est["telemetry"]["transfer_ms"]
            static_ms = est["static"]["transfer_ms"]
            err = (predicted_ms - measured_ms) / measured_ms
            results[name] = (predicted_ms, measured_ms, static_ms)
            print(f"{name} {src}->{dst}: {emu_bytes} emulated bytes ({real_bytes} real); telemetry oracle "
                  f"{predicted_ms:.0f} ms, measured {measured_ms:.0f} ms ({100 * err:+.1f}%), static {static_ms:.0f} ms")
            assert abs(err) <= TOLERANCE, (name, predicted_ms, measured_ms)
        # on the loaded path the telemetry estimate beats the static one
        p, m, s = results["busy"]
        assert abs(p - m) < abs(s - m)
        assert results["busy"][1] > 1.5 * results["idle"][1], "the background flow must slow the busy path"
    finally:
        if bg.poll() is None:
            bg.terminate()
        bg.wait(timeout=10)
        if server.poll() is None:
            server.terminate()
        server.wait(timeout=10)
