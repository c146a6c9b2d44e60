"""The serving model without processes: the router's ledger and the decode
instance's batcher, driven with explicit times (netkv/serving)."""

from __future__ import annotations

import math
from typing import Any

import pytest

import topologies
from netkv import perfmodel
from netkv.request import Request
from netkv.schedulers import Decision, Scheduler
from netkv.serving.config import ReplayConfig
from netkv.serving.decode import DecodeBatcher, Done, Expect
from netkv.serving.ledger import Ledger, LedgerError
from netkv.serving.prefill import PrefillCompute

T0 = 1_000.0  # epoch s of the replay clock's origin


def req(i: int, *, input_tokens: int = 1024, output_tokens: int = 4, hashes: tuple[int, ...] = (1, 2)) -> Request:
    return Request(f"r{i}", 10.0 * i, input_tokens, output_tokens, hashes)


def ledger(records: list[dict[str, Any]], **cfg: Any) -> Ledger:
    config = ReplayConfig(topology="tiny", scheduler=cfg.pop("scheduler", "round_robin"), **cfg)
    led = Ledger(config, topologies.build("tiny"), records.append)
    led.t0 = T0
    return led


def at(ms: float) -> float:
    return T0 + ms / 1000.0


def test_a_request_goes_through_and_leaves_the_books_as_they_were() -> None:
    records: list[dict[str, Any]] = []
    led = ledger(records, scale_factor=1000.0)
    r = req(0)
    order = led.dispatch(r, at(0.5))
    assert order is not None and order.request is r
    assert order.prefill in led.placement.prefill and order.decode in led.placement.decode
    assert order.kv_bytes == r.input_tokens * led.perf.kv_bytes_per_token
    assert [(f.src, f.dst, f.kv_bytes) for f in order.flows] == [(order.prefill, order.decode, order.kv_bytes)]
    assert order.wire_bytes == order.flows[0].wire_bytes == math.ceil(order.kv_bytes / 1000.0)
    d = led.decodes[order.decode]
    p = led.prefills[order.prefill]
    assert (d.queued, d.active, d.reserved_tokens) == (1, 0, r.input_tokens + r.output_tokens)
    assert p.queue_len == 1 and p.pending_ms > 0
    assert led.max_dispatch_lag_ms == pytest.approx(0.5)

    led.prefilled(r.request_id, at(1), at(30), cached_tokens=0)
    assert p.queue_len == 0 and p.pending_ms == 0
    assert led.flights[r.request_id].stage() == "KV transfer in progress"
    led.sent(r.request_id, at(30))
    led.admitted(r.request_id)
    assert (d.queued, d.active) == (0, 1)
    assert records == []
    led.done(Done(r.request_id, at(40), at(40), at(55), at(85), 10.0, 10.0))
    (rec,) = records
    assert rec["status"] == "ok" and rec["reason"] == ""
    assert rec["ttft_ms"] == pytest.approx(55.0) and rec["queue_wait_ms"] == pytest.approx(1.0)
    assert rec["transfer_start_ms"] == pytest.approx(30.0) and rec["transfer_end_ms"] == pytest.approx(40.0)
    assert rec["bytes_sent"] == order.wire_bytes and rec["kv_bytes"] == order.kv_bytes
    assert rec["tier_distance"] == led.topo.tier_distance(order.prefill, order.decode)
    assert rec["decision_us"] >= 0 and rec["decision_cpu_us"] >= 0
    assert (d.queued, d.active, d.reserved_tokens) == (0, 0, 0) and not led.flights
    assert led.written == {r.request_id}


def test_a_decode_report_that_overtakes_the_senders_waits_for_it() -> None:
    records: list[dict[str, Any]] = []
    led = ledger(records)
    r = req(0)
    assert led.dispatch(r, at(0)) is not None
    led.prefilled(r.request_id, at(1), at(2), 0)
    led.done(Done(r.request_id, at(3), at(3), at(4), at(5), None, None))
    assert records == [] and led.flights[r.request_id].admitted
    led.sent(r.request_id, at(2))
    assert [x["status"] for x in records] == ["ok"]


def test_reports_after_a_record_are_counted_late_not_applied() -> None:
    records: list[dict[str, Any]] = []
    led = ledger(records)
    r = req(0)
    led.dispatch(r, at(0))
    led.rejected(r.request_id, "g1", "needs 10 KV tokens")
    assert records[0]["reason"] == "rejected by decode g1: needs 10 KV tokens"
    led.prefilled(r.request_id, at(1), at(2), 0)
    led.sent(r.request_id, at(2))
    led.done(Done(r.request_id, at(3), at(3), at(4), at(5), None, None))
    assert led.late_reports == 3 and len(records) == 1


def test_a_lost_instance_fails_its_requests_with_their_stage_and_is_chosen_again_once_back() -> None:
    records: list[dict[str, Any]] = []
    led = ledger(records)
    orders = [led.dispatch(req(i), at(i)) for i in range(4)]
    assert all(o is not None for o in orders)
    lost = orders[0].decode  # type: ignore[union-attr]
    led.prefilled(orders[0].request.request_id, at(5), at(6), 0)  # type: ignore[union-attr]
    failed = led.instance_lost(lost, f"decode worker {lost} exited with code -9")
    mine = [o for o in orders if o is not None and o.decode == lost]
    assert failed == len(mine) == len(records)
    assert {r["reason"] for r in records} == {
        f"decode worker {lost} exited with code -9 (KV transfer in progress)",
        f"decode worker {lost} exited with code -9 (waiting for or in prefill)"}
    for _ in range(4):
        o = led.dispatch(req(10 + _), at(20))
        assert o is not None and o.decode != lost
    led.instance_back(lost)
    assert led.alive(lost) and led.decodes[lost].queued == 0
    chosen = {o.decode for o in (led.dispatch(req(20 + i), at(30)) for i in range(4)) if o is not None}
    assert lost in chosen


def test_every_request_of_the_window_ends_as_exactly_one_record() -> None:
    records: list[dict[str, Any]] = []
    led = ledger(records)
    window = [req(i) for i in range(6)]
    for r in window[:3]:
        led.dispatch(r, at(r.arrival_ms))
    led.prefilled("r1", at(40), at(41), 0)
    led.fail_unfinished("not finished within drain_timeout_s=1")
    assert sorted(r["reason"] for r in records) == [
        "not finished within drain_timeout_s=1 (KV transfer in progress)",
        "not finished within drain_timeout_s=1 (waiting for or in prefill)",
        "not finished within drain_timeout_s=1 (waiting for or in prefill)"]
    led.account_for_the_rest(window, "run interrupted (KeyboardInterrupt: )")
    assert sorted(r["request_id"] for r in records) == [r.request_id for r in window]
    assert [r["reason"] for r in records[3:]] == ["run interrupted (KeyboardInterrupt: ) before dispatch"] * 3


class _Stub(Scheduler):
    name = "stub"
    doc = "answers what the test says"

    def __init__(self, answer: Any) -> None:
        super().__init__({}, kv_bytes_per_token=1)
        self.answer = answer

    def choose(self, request: Request, prefill: str, decodes: Any, oracle: Any, now_s: float) -> Decision:
        return self.answer  # type: ignore[no-any-return]


def test_a_scheduler_that_breaks_the_contract_stops_the_replay() -> None:
    topo = topologies.build("tiny")
    cfg = ReplayConfig(topology="tiny", scheduler="round_robin")
    with pytest.raises(LedgerError, match="returned no decision"):
        Ledger(cfg, topo, lambda rec: None, scheduler=_Stub(None)).dispatch(req(0), at(0))
    bogus = Decision("g0", {}, 0, 0, None)  # a prefill host, not a decode instance
    with pytest.raises(LedgerError, match="not a live decode instance"):
        Ledger(cfg, topo, lambda rec: None, scheduler=_Stub(bogus)).dispatch(req(0), at(0))


def test_tensor_parallel_orders_are_rank_flows_scaled_each() -> None:
    records: list[dict[str, Any]] = []
    config = ReplayConfig(scheduler="round_robin", model="llama-3.1-70b", perf_overrides={"tp": 4},
                          scale_factor=7.0)
    led = Ledger(config, topologies.build("fattree"), records.append)
    order = led.dispatch(req(0, input_tokens=2048), T0)
    assert order is not None
    ranks_p, ranks_d = led.placement.ranks_of(order.prefill), led.placement.ranks_of(order.decode)
    assert [(f.src, f.dst) for f in order.flows] == list(zip(ranks_p, ranks_d))
    assert [f.kv_bytes for f in order.flows] == led.perf.rank_flow_bytes(order.kv_bytes)
    assert [f.wire_bytes for f in order.flows] == [math.ceil(f.kv_bytes / 7.0) for f in order.flows]
    assert order.wire_bytes == sum(f.wire_bytes for f in order.flows)


# -- the instances ------------------------------------------------------------------------
def perf(**overrides: Any) -> perfmodel.PerfModel:
    return perfmodel.build(perfmodel.DEFAULT_MODEL, perfmodel.DEFAULT_GPU, overrides)


def test_the_batcher_admits_in_order_within_slots_and_memory() -> None:
    pm = perf()
    cap = pm.kv_capacity_tokens
    b = DecodeBatcher(pm, max_batch=2)
    assert b.expect("huge", Expect(cap, 1, 10)).rejected == f"needs {cap + 1} KV tokens, instance capacity is {cap}"
    big, small = cap // 2 + 1, 10
    for rid, n in (("a", big), ("b", big), ("c", small)):
        assert b.expect(rid, Expect(n - 1, 1, 5)).parts is None  # waits for its bytes
    assert b.kv_arrived("a", 0, 1.0, 5, "p").parts is not None
    assert b.kv_arrived("b", 0, 2.0, 5, "p").rejected is None
    bad = b.kv_arrived("c", 0, 3.0, 4, "p")
    assert bad.rejected == "KV payload of 4 bytes, expected 5"
    assert b.expect("d", Expect(small - 1, 1, 5)).parts is None
    b.kv_arrived("d", 0, 3.5, 5, "p")
    assert [a.request_id for a in b.admit(4.0)] == ["a"]  # b does not fit beside a; d must not overtake b
    assert b.admit(4.1) == [] and [rid for rid, _, _ in b.ready] == ["b", "d"]
    (done,) = b.end_step(5.0)  # a has one output token: done after one step
    assert done == Done("a", 1.0, 4.0, 5.0, 5.0, None, None) and b.reserved_tokens == 0
    assert [a.request_id for a in b.admit(5.0)] == ["b", "d"]
    assert b.step_ms() == pm.decode_step_ms(2, (big - 1) + (small - 1))


def test_the_batcher_counts_tokens_and_time_between_them() -> None:
    b = DecodeBatcher(perf(), max_batch=8)
    b.expect("x", Expect(100, 3, 7))
    b.kv_arrived("x", 0, 0.5, 7, "p")
    b.admit(1.0)
    assert b.end_step(1.010) == [] and b.end_step(1.030) == []
    (done,) = b.end_step(1.060)
    assert (done.first_token_s, done.completion_s) == (1.010, 1.060)
    assert done.tbt_mean_ms == pytest.approx(25.0) and done.tbt_p99_ms == pytest.approx(29.9)


def test_a_tensor_parallel_payload_is_ready_with_its_last_rank() -> None:
    b = DecodeBatcher(perf(), max_batch=4, ranks=2)
    b.expect("x", Expect(100, 1, 10, [6, 4]))
    assert b.kv_arrived("x", 1, 2.0, 4, "p1").parts is None
    ready = b.kv_arrived("x", 0, 1.5, 6, "p0")
    assert ready.rejected is None and ready.parts == {1: (2.0, 4, "p1"), 0: (1.5, 6, "p0")}
    assert b.ready[0][2] == 2.0  # transfer_end: the last rank's
    b.expect("y", Expect(100, 1, 10, [6, 4]))
    b.kv_arrived("y", 0, 3.0, 6, "p0")
    assert b.kv_arrived("y", 1, 3.0, 5, "p1").rejected == "KV payload of [6, 5] bytes per rank, expected [6, 4]"


def test_prefill_compute_charges_only_the_uncached_tokens() -> None:
    pm = perf()
    pc = PrefillCompute(pm)
    cached, t_ms = pc.start((1, 2, 3), 3 * 512)
    assert cached == 0 and t_ms == pm.prefill_ms(3 * 512, 0)
    pc.finish((1, 2, 3))
    cached, t_ms = pc.start((1, 2, 4), 3 * 512)
    assert cached == 2 * 512 and t_ms == pm.prefill_ms(512, 2 * 512)


def test_a_request_longer_than_the_models_context_is_refused_with_the_reason() -> None:
    records: list[dict[str, Any]] = []
    led = ledger(records, model="opt-13b")
    assert led.dispatch(req(0, input_tokens=2040, output_tokens=8), at(0)) is not None  # 2,048: fits exactly
    assert led.dispatch(req(1, input_tokens=3000, output_tokens=4), at(1)) is None
    assert records[-1]["reason"] == "longer than the model's context: 3004 tokens, opt-13b serves 2048"
    assert led.over_context == 1
    served = ledger([], model="opt-13b", model_context="ignore")  # the network-heavy stress point
    assert served.dispatch(req(1, input_tokens=3000, output_tokens=4), at(1)) is not None
    assert served.over_context == 0


def test_a_prefill_that_starts_as_its_request_arrives_has_no_negative_wait() -> None:
    """At today's epoch a double resolves 0.24 us: t0 + arrival can read a
    hair before the trace's arrival_ms.  That rounding is not a wait; a start
    clearly before the arrival is kept as it is (it would be a bug to see)."""
    records: list[dict[str, Any]] = []
    config = ReplayConfig(topology="tiny", scheduler="round_robin")
    led = Ledger(config, topologies.build("tiny"), records.append)
    led.t0 = 1_796_000_000.123456  # an epoch of this decade
    r = Request("r0", 242.4402899001725, 1024, 4, (1, 2))
    arrival_s = led.t0 + r.arrival_ms / 1000.0
    assert led.ms(arrival_s) < r.arrival_ms  # the rounding this is about
    order = led.dispatch(r, arrival_s)
    assert order is not None
    led.prefilled(r.request_id, arrival_s, arrival_s + 0.01, cached_tokens=0)
    rec = led.flights[r.request_id].rec
    assert rec["queue_wait_ms"] == 0.0 and rec["prefill_start_ms"] == r.arrival_ms

    r2 = Request("r1", 500.0, 1024, 4, (3, 4))
    assert led.dispatch(r2, led.t0 + 0.5) is not None
    led.prefilled(r2.request_id, led.t0 + 0.499, led.t0 + 0.6, cached_tokens=0)
    assert led.flights[r2.request_id].rec["queue_wait_ms"] == pytest.approx(-1.0, abs=1e-3)
