"""ControllerState arithmetic: rates, resets, ring buffer, poll rounds, drops, queues."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import topologies
from controller.queues import QueueReadError, parse_qdisc_json
from controller.state import ControllerState, QueueSample

SCALE = 20_000.0


def make_state(**kw: object) -> ControllerState:
    return ControllerState(topologies.build("tiny"), scale=SCALE, **kw)  # type: ignore[arg-type]


def feed(state: ControllerState, switch: str, port: int, t_s: float, *, rx: int = 0, tx: int = 0,
         rx_pkts: int = 0, tx_pkts: int = 0, rx_drop: int = 0, tx_drop: int = 0, rx_err: int = 0,
         tx_err: int = 0, duration_s: float | None = None) -> list:
    dpid = state.topo.node(switch).dpid
    return state.on_port_stats(dpid, port, t_s, rx_bytes=rx, tx_bytes=tx, rx_packets=rx_pkts,
                               tx_packets=tx_pkts, rx_dropped=rx_drop, tx_dropped=tx_drop,
                               rx_errors=rx_err, tx_errors=tx_err, duration_s=duration_s)


def test_rx_counter_of_upper_switch_measures_the_uplink_hop() -> None:
    state = make_state()
    topo = state.topo
    port = topo.port_to("t0", "v0")  # t0 receives what v0 sends up
    assert feed(state, "t0", port, 100.0, rx=1_000, rx_pkts=1) == []
    out = feed(state, "t0", port, 100.5, rx=1_000 + 625_000, rx_pkts=421)
    hop = {(r.src, r.dst): r for r in out}[("v0", "t0")]
    assert hop.rate_bps == pytest.approx(625_000 * 8 / 0.5)  # 10 Mbit/s emulated
    assert hop.load_gbps == pytest.approx(10e6 * SCALE / 1e9)  # 200 Gbit/s real
    link = topo.link_between("v0", "t0")
    assert hop.capacity_gbps == link.rate_gbps
    assert hop.utilization == pytest.approx(200.0 / link.rate_gbps)
    assert hop.packets == 420
    assert hop.clock == "controller" and hop.interval_s == pytest.approx(0.5)
    assert hop.port == f"t0:{port} rx"
    assert state.history("v0", "t0") == [hop]


def test_tx_counter_measures_the_hop_into_a_gpu() -> None:
    state = make_state()
    port = state.topo.port_to("v0", "g0")
    feed(state, "v0", port, 10.0, tx=0, rx=0)
    out = feed(state, "v0", port, 11.0, tx=1_000_000, rx=5)
    by_hop = {(r.src, r.dst): r for r in out}
    # the switch port toward g0 measures both directions: rx for g0->v0, tx for v0->g0
    assert by_hop[("v0", "g0")].rate_bps == pytest.approx(8e6)
    assert by_hop[("g0", "v0")].rate_bps == pytest.approx(40.0)


def test_switch_clock_is_preferred_over_receive_times() -> None:
    state = make_state()
    port = state.topo.port_to("t0", "v0")
    feed(state, "t0", port, 100.0, rx=0, duration_s=50.0)
    # the reply was delayed: received 0.7 s later, but the switch sampled 0.5 s apart
    out = feed(state, "t0", port, 100.7, rx=500_000, duration_s=50.5)
    assert out[0].clock == "switch"
    assert out[0].interval_s == pytest.approx(0.5)
    assert out[0].rate_bps == pytest.approx(8e6)


def test_counter_reset_gives_no_rate_and_starts_a_new_baseline() -> None:
    state = make_state()
    port = state.topo.port_to("t0", "v0")
    feed(state, "t0", port, 1.0, rx=10_000_000, rx_pkts=1000)
    assert feed(state, "t0", port, 2.0, rx=50, rx_pkts=1) == []
    assert state.counter_resets == 1
    out = feed(state, "t0", port, 3.0, rx=50 + 1250, rx_pkts=2)
    assert [r.rate_bps for r in out if (r.src, r.dst) == ("v0", "t0")] == [pytest.approx(10_000.0)]
    assert all(r.rate_bps >= 0 for r in state.latest())


def test_duration_going_backwards_is_a_reset_even_if_bytes_grew() -> None:
    state = make_state()
    port = state.topo.port_to("t0", "v0")
    feed(state, "t0", port, 1.0, rx=100, duration_s=500.0)
    assert feed(state, "t0", port, 2.0, rx=200, duration_s=0.5) == []
    assert state.counter_resets == 1


def test_ring_buffer_keeps_only_the_newest_samples() -> None:
    state = make_state(history_len=5)
    port = state.topo.port_to("t0", "v0")
    for i in range(21):
        feed(state, "t0", port, float(i), rx=i * 1000)
    hist = state.history("v0", "t0")
    assert len(hist) == 5
    assert [r.t_s for r in hist] == [16.0, 17.0, 18.0, 19.0, 20.0]


@pytest.mark.parametrize("kw", [{"poll_interval_s": 0.01}, {"poll_interval_s": 61.0},
                                {"history_len": 1}, {"history_len": 10**6}])
def test_bad_settings_are_refused_with_the_allowed_range(kw: dict) -> None:
    with pytest.raises(ValueError, match=r"\.\."):
        make_state(**kw)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale_is_refused(scale: float) -> None:
    with pytest.raises(ValueError, match="scale"):
        ControllerState(topologies.build("tiny"), scale=scale)


def test_a_switch_that_does_not_answer_is_counted_missing() -> None:
    state = make_state()
    t0, t1 = state.topo.node("t0").dpid, state.topo.node("t1").dpid
    state.begin_poll_round(10.0, [t0, t1])
    state.on_stats_reply(t0, 10.01)
    state.begin_poll_round(10.5, [t0, t1])  # t1 never answered round 1
    assert state.replies_missing == 1
    assert state.missing_by_switch == {"t1": 1}
    state.on_stats_reply(t0, 10.52)
    state.on_stats_reply(t1, 10.53)
    state.begin_poll_round(11.0, [t0, t1])
    assert state.replies_missing == 1
    assert state.replies_received == 3
    health = state.poller_health(11.0)
    assert health["replies_missing"] == 1 and health["missing_by_switch"] == {"t1": 1}
    assert health["reply_latency_ms_p50"] == pytest.approx(20.0)
    status = state.status(11.0)
    assert status["poller"]["replies_missing"] == 1  # type: ignore[index]


def test_late_and_unknown_replies_are_not_counted_as_answers() -> None:
    state = make_state()
    t0 = state.topo.node("t0").dpid
    state.begin_poll_round(1.0, [t0])
    state.begin_poll_round(2.0, [t0])
    state.on_stats_reply(t0, 2.1)
    state.on_stats_reply(t0, 2.2)  # a second reply for the same round
    assert state.replies_received == 1
    assert state.replies_late == 1
    assert state.replies_missing == 1


def test_a_disconnected_switch_is_not_counted_missing() -> None:
    state = make_state()
    t0 = state.topo.node("t0").dpid
    state.begin_poll_round(1.0, [t0])
    state.on_disconnect(t0, 1.1)
    state.begin_poll_round(2.0, [])
    assert state.replies_missing == 0


def test_poller_health_reports_stall_and_death() -> None:
    state = make_state(poll_interval_s=0.5)
    assert state.poller_health(0.0)["alive"] is False  # never started
    state.begin_poll_round(100.0, [])
    assert state.poller_health(100.2)["alive"] is True
    stalled = state.poller_health(103.0)  # > 3 intervals + 1 s
    assert stalled["stalled"] is True and stalled["alive"] is False
    state.begin_poll_round(103.0, [])
    state.on_poller_died(103.1, "RuntimeError('boom')")
    dead = state.poller_health(103.2)
    assert dead["alive"] is False and dead["last_error"] == "RuntimeError('boom')"


def test_drops_of_both_ends_are_charged_once_to_the_hop() -> None:
    state = make_state()
    topo = state.topo
    up = topo.port_to("t0", "a0")  # t0 transmits on it (hop t0->a0)
    down = topo.port_to("a0", "t0")  # a0 receives on it: measures hop t0->a0
    feed(state, "t0", up, 1.0, tx_drop=5)
    feed(state, "a0", down, 1.0, rx_drop=2)
    out = feed(state, "a0", down, 2.0, rx=1000, rx_drop=2)  # baseline of the drop counters
    assert {(r.src, r.dst): r.drops for r in out}[("t0", "a0")] == 0
    feed(state, "t0", up, 2.0, tx_drop=12, tx_err=1)  # 7 queue drops at the sender
    out = feed(state, "a0", down, 3.0, rx=2000, rx_drop=3)  # 1 receive drop
    rate = {(r.src, r.dst): r for r in out}[("t0", "a0")]
    assert rate.drops == 8 and rate.errors == 1
    out = feed(state, "a0", down, 4.0, rx=3000, rx_drop=3)
    assert {(r.src, r.dst): r.drops for r in out}[("t0", "a0")] == 0  # not charged twice
    assert state.totals()[("t0", "a0")] == (8, 1)


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 2**62), delta=st.integers(0, 2**40),
       interval_ms=st.integers(1, 60_000))
def test_rate_is_bytes_times_eight_over_interval(start: int, delta: int, interval_ms: int) -> None:
    state = make_state()
    port = state.topo.port_to("a0", "t1")
    feed(state, "a0", port, 0.0, rx=start)
    out = feed(state, "a0", port, interval_ms / 1000, rx=start + delta)
    rate = {(r.src, r.dst): r for r in out}[("t1", "a0")]
    assert rate.rate_bps == pytest.approx(delta * 8 / (interval_ms / 1000))
    assert rate.load_gbps == pytest.approx(rate.rate_bps * SCALE / 1e9)


def test_links_json_is_busiest_first_with_age() -> None:
    state = make_state()
    topo = state.topo
    for sw, nb, nbytes in (("t0", "v0", 100), ("a0", "t0", 1_000_000), ("a1", "t1", 10_000)):
        port = topo.port_to(sw, nb)
        feed(state, sw, port, 1.0, rx=0)
        feed(state, sw, port, 2.0, rx=nbytes)
    rows = state.links_json(2.25)
    utils = [float(r["utilization"]) for r in rows]  # type: ignore[arg-type]
    assert utils == sorted(utils, reverse=True)
    assert (rows[0]["src"], rows[0]["dst"]) == ("t0", "a0")
    assert rows[0]["age_ms"] == pytest.approx(250.0)
    for key in ("src", "dst", "t_s", "load_gbps", "capacity_gbps", "utilization", "drops", "errors", "tier"):
        assert key in rows[0]


def test_queue_samples_map_to_the_hop_their_interface_feeds() -> None:
    state = make_state(prefix="nc")
    port = state.topo.port_to("t0", "a1")
    assert state.egress_interface("t0", "a1") == f"nct0-eth{port}"
    assert state.egress_interface("g0", "v0") is None  # inside the host namespace
    used = state.on_queue_stats([
        QueueSample(f"nct0-eth{port}", 5.0, "htb", 4500, 3, 7, 100, 10_000),
        QueueSample("nct0-eth99", 5.0, "htb", 1, 1, 0, 0, 0),  # no such port
        QueueSample("eth0", 5.0, "htb", 1, 1, 0, 0, 0),
    ], 5.0)
    assert used == 1
    q = state.queues()[("t0", "a1")]
    assert q.backlog_bytes == 4500 and q.backlog_packets == 3 and q.drops_total == 7


def test_interface_names_need_a_prefix() -> None:
    state = make_state()
    with pytest.raises(ValueError, match="prefix"):
        state.interface_name("t0", 1)


TC_JSON = json.dumps([
    {"kind": "noqueue", "handle": "0:", "dev": "lo", "root": True, "bytes": 0, "packets": 0, "drops": 0,
     "overlimits": 0, "requeues": 0, "backlog": 0, "qlen": 0},
    {"kind": "htb", "handle": "1:", "dev": "nct0-eth3", "root": True, "bytes": 123456, "packets": 99,
     "drops": 4, "overlimits": 17, "requeues": 0, "backlog": 3028, "qlen": 2},
    {"kind": "pfifo", "handle": "10:", "dev": "nct0-eth3", "parent": "1:1", "bytes": 123456, "packets": 99,
     "drops": 4, "overlimits": 0, "requeues": 0, "backlog": 3028, "qlen": 2},
    {"kind": "htb", "handle": "1:", "dev": "nkt0-eth3", "root": True, "bytes": 1, "packets": 1,
     "drops": 0, "overlimits": 0, "requeues": 0, "backlog": 0, "qlen": 0},
])


def test_parse_qdisc_json_keeps_root_qdiscs_of_the_prefix_only() -> None:
    out = parse_qdisc_json(TC_JSON, 7.0, "nc")
    assert len(out) == 1
    q = out[0]
    assert (q.interface, q.kind, q.backlog_bytes, q.backlog_packets, q.drops_total, q.overlimits_total,
            q.sent_bytes_total, q.t_s) == ("nct0-eth3", "htb", 3028, 2, 4, 17, 123456, 7.0)
    assert parse_qdisc_json("", 1.0, "nc") == []


@pytest.mark.parametrize("text", ["{not json", '{"dev": "x"}'])
def test_parse_qdisc_json_rejects_garbage(text: str) -> None:
    with pytest.raises(QueueReadError):
        parse_qdisc_json(text, 1.0, "nc")


class _Boom(BaseException):
    pass


def test_poll_loop_survives_failed_rounds_and_reports_its_death(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The os-ken poll loop (no switch needed): a round that raises is counted
    and polling goes on; leaving the loop is logged at CRITICAL and visible in
    the state."""
    from controller import app

    state = make_state(poll_interval_s=0.05)
    sent: list[int] = []

    class FakeParser:
        @staticmethod
        def OFPPortStatsRequest(dp: object, flags: int, port: int) -> str:  # noqa: N802
            return "req"

    class FakeDatapath:
        def __init__(self, dpid: int, fail: bool) -> None:
            self.id, self.fail = dpid, fail
            self.ofproto_parser, self.ofproto = FakeParser, type("ofp", (), {"OFPP_ANY": 0xFFFFFFFF})

        def send_msg(self, msg: str) -> None:
            if self.fail and len(sent) == 0:
                sent.append(-1)
                raise OSError("socket closed")
            sent.append(self.id)

    ctl = app.NetKVController.__new__(app.NetKVController)
    ctl.state = state
    ctl.datapaths = {1: FakeDatapath(1, fail=True)}
    sleeps = []

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise _Boom()

    monkeypatch.setattr(app.hub, "sleep", fake_sleep)
    with caplog.at_level("ERROR", logger="netkv.controller"):
        with pytest.raises(_Boom):
            ctl._poll_loop()
    assert state.poll_round_failures == 1
    assert any("socket closed" in r.getMessage() or "socket closed" in str(r.exc_info) for r in caplog.records)
    assert state.poller_error == "_Boom()" and state.poller_died_s is not None
    assert state.polls_sent == 3 and sent == [-1, 1, 1]
    assert 0 <= sleeps[0] <= 0.05 and all(s >= 0 for s in sleeps)  # fixed schedule, never negative
    assert state.poller_health(state.last_poll_s or 0.0)["alive"] is False
    assert any(r.levelname == "CRITICAL" and "poller died" in r.getMessage() for r in caplog.records)


def test_a_barrier_reply_before_the_handshake_ends_still_marks_the_switch_ready() -> None:
    """The routes and their barrier are sent from the features handler; the
    switch can answer the barrier before os-ken's handshake has moved the
    datapath to MAIN_DISPATCHER.  os-ken delivers an event only to handlers
    registered for the datapath's state when it arrived, so the barrier's
    handler must be registered for CONFIG_DISPATCHER too."""
    from os_ken.controller import ofp_event
    from os_ken.controller.handler import CONFIG_DISPATCHER, MAIN_DISPATCHER

    from controller import app

    callers = app.NetKVController._on_barrier.callers  # type: ignore[attr-defined]
    dispatchers = callers[ofp_event.EventOFPBarrierReply].dispatchers
    assert CONFIG_DISPATCHER in dispatchers and MAIN_DISPATCHER in dispatchers
    state = make_state()
    dpid = next(iter(state.switch_by_dpid))
    state.on_routes_sent(dpid, 3, 1.0)
    state.on_routes_confirmed(dpid, 1.1)  # before on_connect: the handshake has not ended
    state.on_connect(dpid, 1.2)
    assert dpid in state.routes_confirmed
