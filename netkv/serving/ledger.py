"""The router's side of the serving model: dispatch, bookkeeping and records.

Both engines drive one :class:`Ledger` per replay.  Per request, at its
arrival time, :meth:`Ledger.dispatch`

1. chooses the prefill instance (:class:`netkv.serving.prefill.PrefillChooser`,
   on mirrors of every prefill's prefix cache and its predicted pending work);
2. builds a :class:`netkv.request.DecodeView` of every live decode instance
   from the ledger's own bookkeeping (waiting / decoding counts, reserved KV
   tokens, a mirror of the prefix blocks it holds) and asks the scheduler under
   test, timed (:mod:`netkv.serving.timing`);
3. returns an :class:`Order`: run the prefill on P, then move the KV bytes
   from P to D, then decode on D.

The engine carries the order out (the emulator: worker processes and TCP
through the emulated fabric; an in-process engine: the pure
:class:`~netkv.serving.prefill.PrefillCompute` and
:class:`~netkv.serving.decode.DecodeBatcher` over simulated flows) and tells
the ledger what happened, in wall-clock epoch seconds: :meth:`prefilled`,
:meth:`sent`, :meth:`admitted`, :meth:`done`, :meth:`rejected`,
:meth:`fail`, :meth:`instance_lost`.  Those fill in the request's record; a
record is handed to ``on_record`` the moment its request finishes or fails,
exactly once (:mod:`netkv.records` is the format).

Nothing here reads a clock except the decision's timer: every time is passed
in, so the bookkeeping is tested without processes (tests/unit/test_ledger.py).

A scheduler may run processes of its own (``sglang-router:<policy>``): the
ledger calls its ``start(prefills, decodes)`` once when it is built, and the
engine calls :meth:`Ledger.close` when the replay is over.
"""

from __future__ import annotations

import contextlib
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable

from netkv import perfmodel
from netkv.oracle import StaticOracle, TensorParallelOracle
from netkv.placement import Placement, make_placement
from netkv.records import empty_record
from netkv.request import DecodeView, Request
from netkv.schedulers import Decision, NoEligibleDecode, Scheduler, create
from netkv.schedulers.remote import SchedulerFault
from topologies import Topology

from .config import ReplayConfig, wire_bytes
from .decode import Done
from .prefill import PrefillChoiceError, PrefillChooser, PrefillInstance, PrefixCache
from .timing import DecisionTimer, GcClock

OVER_CONTEXT = "longer than the model's context"

# Record times are epoch seconds minus the replay's t0: at today's epoch a
# double resolves 0.24 us, so a prefill that starts the instant its request
# arrives (the trace's exact arrival_ms) can read a fraction of a microsecond
# early.  A start earlier than arrival by less than this is that rounding.
CLOCK_RESOLUTION_MS = 1e-3


class LedgerError(RuntimeError):
    """The scheduler broke its contract (no decision, or a decode that is not live)."""


@dataclass(frozen=True)
class Flow:
    """One flow of a KV transfer: ``tp`` of them, rank i to rank i, for a
    tensor-parallel transfer, else one.  ``kv_bytes`` real, ``wire_bytes`` on
    the emulated wire (real / scale factor, rounded up)."""

    src: str
    dst: str
    kv_bytes: int
    wire_bytes: int


@dataclass(frozen=True)
class Order:
    """What the engine must do for one dispatched request."""

    request: Request
    prefill: str  # the prefill instance (its rank-0 host)
    decode: str  # the decode instance (its rank-0 host)
    kv_bytes: int
    wire_bytes: int  # every flow's wire bytes together
    flows: tuple[Flow, ...]


@dataclass
class Flight:
    """A request between its dispatch and its record."""

    order: Order
    rec: dict[str, Any]
    predicted_prefill_ms: float
    reserved_tokens: int
    prefilled: bool = False
    sent: bool = False
    admitted: bool = False
    done: Done | None = None  # the decode's report, when it came before the sender's

    @property
    def prefill(self) -> str:
        return self.order.prefill

    @property
    def decode(self) -> str:
        return self.order.decode

    def stage(self) -> str:
        if not self.prefilled:
            return "waiting for or in prefill"
        if not self.sent:
            return "KV transfer in progress"
        if not self.admitted:
            return "KV sent, not admitted to decode (payload incomplete or no room)"
        return "decoding"


@dataclass
class DecodeState:
    """The router's mirror of one decode instance."""

    name: str
    cache: PrefixCache
    queued: int = 0
    active: int = 0
    reserved_tokens: int = 0
    alive: bool = True
    flights: set[str] = field(default_factory=set)


class Ledger:
    def __init__(
        self,
        config: ReplayConfig,
        topology: Topology,
        on_record: Callable[[dict[str, Any]], None],
        *,
        oracle: Any = None,
        scheduler: Scheduler | None = None,
        decide_in: ContextManager[Any] | None = None,
    ) -> None:
        """``oracle``: required when ``config.oracle == "telemetry"``, else a
        :class:`netkv.oracle.StaticOracle` of the topology.  ``scheduler``
        replaces ``netkv.schedulers.create(config.scheduler, ...)``.
        ``decide_in``: a reusable context manager every decision runs in (the
        emulator's real-time priority)."""
        config.validate()
        self.cfg = config
        self.topo = topology
        self.on_record = on_record
        self.perf = perfmodel.build(config.model, config.gpu, config.perf_overrides)
        # An instance is perf.tp GPU hosts of one server, named by its rank-0 host (netkv.placement).
        self.placement: Placement = make_placement(topology, config.placement, tp=self.perf.tp)
        if config.oracle == "telemetry" and oracle is None:
            raise LedgerError('oracle "telemetry" needs a telemetry oracle: pass oracle=')
        self.oracle = oracle if oracle is not None else StaticOracle(topology)
        if self.placement.tp > 1:  # a transfer is tp rank flows; it costs its slowest
            self.oracle = TensorParallelOracle(self.oracle, {i: self.placement.ranks_of(i)
                                                             for i in self.placement.instances},
                                               self.perf.rank_flow_bytes)
        warm = getattr(self.oracle, "warm", None)
        if warm is not None:
            # the paths from every prefill to every decode: start-up work, not a decision's
            warm(self.placement.prefill, self.placement.decode)
        self.scheduler = scheduler if scheduler is not None else create(
            config.scheduler, config.scheduler_config, kv_bytes_per_token=self.perf.kv_bytes_per_token,
            seed=config.seed,
        )
        self.decide_in: ContextManager[Any] = decide_in if decide_in is not None else contextlib.nullcontext()
        self.gc_clock = GcClock()  # collections inside decisions (decision_gc_us); the engine starts it
        self.chooser = PrefillChooser(self.perf, config.prefill_policy)
        self.prefills = {h: PrefillInstance(h, PrefixCache(self.perf.prefix_cache_blocks))
                         for h in self.placement.prefill}
        self.decodes = {h: DecodeState(h, PrefixCache(self.perf.prefix_cache_blocks)) for h in self.placement.decode}
        self.prefill_flights: dict[str, set[str]] = {h: set() for h in self.placement.prefill}
        self.flights: dict[str, Flight] = {}
        self.written: set[str] = set()  # request ids that have their record
        self.late_reports = 0  # reports about requests that already have their record
        self.over_context = 0  # requests refused for being longer than the model's context
        self.max_dispatch_lag_ms = 0.0
        self.t0 = 0.0  # epoch seconds of the replay clock's origin; the engine sets it
        # a scheduler with processes of its own starts them now, before the replay's clock (an object
        # given as the scheduler that only has choose(), as tests give, has no hooks)
        start = getattr(self.scheduler, "start", None)
        if start is not None:
            start(list(self.placement.prefill), list(self.placement.decode))

    def close(self) -> None:
        """The replay is over: the scheduler ends what it started (the engine calls this)."""
        close = getattr(self.scheduler, "close", None)
        if close is not None:
            close()

    # -- time ------------------------------------------------------------------
    def ms(self, epoch_s: float) -> float:
        return (epoch_s - self.t0) * 1000.0

    # -- instances -------------------------------------------------------------
    def alive(self, host: str) -> bool:
        return self.prefills[host].alive if host in self.prefills else self.decodes[host].alive

    def role_of(self, host: str) -> str:
        return "prefill" if host in self.prefills else "decode"

    def instance_lost(self, host: str, what: str) -> int:
        """The instance ``host`` is gone (``what`` says how, e.g. "decode worker
        g3 exited with code -9"): every request that still needs it fails with
        that and the stage it was in, and it is not chosen again until
        :meth:`instance_back`.  Returns how many requests failed."""
        if host in self.prefills:
            self.prefills[host].alive = False
            affected = sorted(self.prefill_flights[host])
        else:
            self.decodes[host].alive = False
            affected = sorted(self.decodes[host].flights)
        failed = 0
        for rid in affected:
            if rid in self.flights:
                self.fail(rid, f"{what} ({self.flights[rid].stage()})")
                failed += 1
        return failed

    def instance_back(self, host: str) -> None:
        """A restarted instance is back: it starts empty, and is chosen again."""
        if host in self.prefills:
            self.prefills[host] = PrefillInstance(host, PrefixCache(self.perf.prefix_cache_blocks))
            self.prefill_flights[host] = set()
        else:
            self.decodes[host] = DecodeState(host, PrefixCache(self.perf.prefix_cache_blocks))

    # -- dispatch -------------------------------------------------------------
    def dispatch(self, req: Request, now_s: float) -> Order | None:
        """Choose P and D for ``req`` at ``now_s`` (epoch s) and book it; None
        when it failed at once (its record is written)."""
        self.max_dispatch_lag_ms = max(self.max_dispatch_lag_ms, self.ms(now_s) - req.arrival_ms)
        context = self.perf.model.max_context_tokens
        if self.cfg.model_context == "enforce" and req.input_tokens + req.output_tokens > context:
            self.over_context += 1
            self.fail_undispatched(req, f"{OVER_CONTEXT}: {req.input_tokens + req.output_tokens} tokens, "
                                        f"{self.perf.model.name} serves {context}")
            return None
        try:
            choice = self.chooser.choose(req.hash_ids, req.input_tokens, list(self.prefills.values()))
        except PrefillChoiceError as exc:
            self.fail_undispatched(req, f"no prefill: {exc}")
            return None
        with self.decide_in:
            views_started = time.perf_counter()
            views = [
                DecodeView(
                    d.name, d.queued, d.active, self.cfg.decode_max_batch,
                    max(0, self.perf.kv_capacity_tokens - d.reserved_tokens), d.cache.snapshot(),
                    self.cfg.decode_max_queue, used_kv_tokens=max(0, d.reserved_tokens),
                )
                for d in self.decodes.values() if d.alive
            ]
            views_build_us = (time.perf_counter() - views_started) * 1e6
            timer = DecisionTimer(self.gc_clock)
            fault = None
            try:
                decision = self.scheduler.choose(req, choice.name, views, self.oracle, now_s) if views else None
                refusal = None
            except NoEligibleDecode as exc:
                decision, refusal = None, exc
            except SchedulerFault as exc:  # a scheduler in another process: this request fails, the replay goes on
                decision, refusal, fault = None, None, exc
            timing = timer.fields()
        if not views:
            self.fail_undispatched(req, "no decode: no live decode instance", prefill=choice.name)
            return None
        if refusal is not None:
            self.fail_undispatched(req, f"no eligible decode: {refusal}", prefill=choice.name,
                                   views_build_us=views_build_us, **timing)
            return None
        if fault is not None:
            self.fail_undispatched(req, f"scheduler fault: {fault}", prefill=choice.name,
                                   views_build_us=views_build_us, **timing)
            return None
        self._check(decision, req, views)
        assert decision is not None
        order = self._order(req, choice.name, decision.decode, int(decision.bytes_to_send))
        rec = empty_record(req.request_id, self.cfg.scheduler, req.arrival_ms, req.input_tokens, req.output_tokens)
        est = decision.estimate
        rec.update(
            prefill=choice.name, decode=decision.decode,
            tier_distance=self.topo.tier_distance(choice.name, decision.decode),
            views_build_us=views_build_us, **timing, score_terms={k: float(v) for k, v in decision.score_terms.items()},
            estimate_transfer_ms=None if est is None else float(est.transfer_ms),
            tokens_sent=int(decision.tokens_to_send), kv_bytes=order.kv_bytes, bytes_sent=order.wire_bytes,
        )
        need = req.input_tokens + req.output_tokens
        self.flights[req.request_id] = Flight(order, rec, choice.predicted_prefill_ms, need)
        inst = self.prefills[choice.name]
        inst.cache.insert(req.hash_ids)
        inst.pending_ms += choice.predicted_prefill_ms
        inst.queue_len += 1
        self.prefill_flights[choice.name].add(req.request_id)
        d = self.decodes[decision.decode]
        d.cache.insert(req.hash_ids)
        d.queued += 1
        d.reserved_tokens += need
        d.flights.add(req.request_id)
        return order

    def _check(self, decision: object, req: Request, views: list[DecodeView]) -> None:
        """The scheduler's contract (docs/schedulers.md): a Decision naming a live
        decode it was shown that can admit the request, and a payload no larger
        than the whole request's KV cache.  A breach stops the replay."""
        who = f"scheduler {self.cfg.scheduler!r}"
        if decision is None:
            raise LedgerError(f"{who} returned no decision")
        if not isinstance(decision, Decision):
            raise LedgerError(f"{who} returned {type(decision).__name__}, not a netkv.schedulers.Decision")
        view = next((v for v in views if v.name == decision.decode), None)
        if view is None:
            raise LedgerError(f"{who} chose {decision.decode!r}, which is not a live decode instance")
        if not view.eligible(req):
            raise LedgerError(f"{who} chose {decision.decode!r}, which cannot admit request {req.request_id} "
                              f"(no batch slot or queue room, or short of KV memory)")
        full = req.input_tokens * self.perf.kv_bytes_per_token
        sent = decision.bytes_to_send
        if isinstance(sent, bool) or not isinstance(sent, numbers.Integral) or not 0 <= sent <= full:
            raise LedgerError(f"{who} would send {sent!r} bytes for request {req.request_id}; a whole number in "
                              f"[0, {full}] (its whole KV cache) is allowed")

    def _order(self, req: Request, prefill: str, decode: str, kv_bytes: int) -> Order:
        """The transfer as flows: one, or (tensor parallelism) tp flows, rank i
        to rank i, each of its rank's share (perf.rank_flow_bytes), each
        scaled to the wire on its own."""
        scale = self.cfg.scale_factor
        if self.placement.tp == 1:
            flows: tuple[Flow, ...] = (Flow(prefill, decode, kv_bytes, wire_bytes(kv_bytes, scale)),)
        else:
            flows = tuple(Flow(p, d, b, wire_bytes(b, scale)) for p, d, b in zip(
                self.placement.ranks_of(prefill), self.placement.ranks_of(decode),
                self.perf.rank_flow_bytes(kv_bytes)))
        return Order(req, prefill, decode, kv_bytes, sum(f.wire_bytes for f in flows), flows)

    # -- what the engine reports (epoch seconds) --------------------------------
    def _flight(self, rid: object) -> Flight | None:
        flight = self.flights.get(rid) if isinstance(rid, str) else None
        if flight is None:
            self.late_reports += 1  # the request already has its record (failed earlier)
        return flight

    def _prefill_left(self, flight: Flight) -> None:
        """The request no longer waits for or runs on its prefill instance."""
        inst = self.prefills[flight.prefill]
        inst.pending_ms = max(0.0, inst.pending_ms - flight.predicted_prefill_ms)
        inst.queue_len -= 1

    def prefilled(self, rid: object, start_s: float, end_s: float, cached_tokens: int) -> None:
        flight = self._flight(rid)
        if flight is None:
            return
        flight.prefilled = True
        self._prefill_left(flight)
        rec = flight.rec
        start_ms = self.ms(start_s)
        if -CLOCK_RESOLUTION_MS < start_ms - rec["arrival_ms"] < 0.0:
            start_ms = rec["arrival_ms"]  # the epoch clock's rounding, not a prefill before its arrival
        rec["prefill_start_ms"] = start_ms
        rec["prefill_end_ms"] = self.ms(end_s)
        rec["queue_wait_ms"] = start_ms - rec["arrival_ms"]
        rec["prefill_cached_tokens"] = int(cached_tokens)

    def sent(self, rid: object, start_s: float) -> Flight | None:
        """The sender wrote the last byte of the KV payload (every rank's flow);
        returns the flight, None when the request already has its record."""
        flight = self._flight(rid)
        if flight is None:
            return None
        flight.sent = True
        self.prefill_flights[flight.prefill].discard(flight.order.request.request_id)
        flight.rec["transfer_start_ms"] = self.ms(start_s)
        if flight.done is not None:
            self._complete(flight, flight.done)
        return flight

    def admitted(self, rid: object) -> None:
        flight = self._flight(rid)
        if flight is None or flight.admitted:
            return
        flight.admitted = True
        d = self.decodes[flight.decode]
        d.queued -= 1
        d.active += 1

    def done(self, done: Done) -> None:
        """The decode finished the request.  Its report may overtake the
        sender's (two processes, two connections): then the record waits for
        :meth:`sent`."""
        flight = self._flight(done.request_id)
        if flight is None:
            return
        if not flight.admitted:
            self.admitted(done.request_id)
        if flight.sent:
            self._complete(flight, done)
        else:
            flight.done = done

    def rejected(self, rid: object, host: str, reason: str) -> None:
        if self._flight(rid) is not None:
            self.fail(str(rid), f"rejected by decode {host}: {reason}")

    def _complete(self, flight: Flight, done: Done) -> None:
        rec = flight.rec
        rec["transfer_end_ms"] = self.ms(done.transfer_end_s)
        rec["decode_admit_ms"] = self.ms(done.admit_s)
        rec["first_token_ms"] = self.ms(done.first_token_s)
        rec["completion_ms"] = self.ms(done.completion_s)
        rec["ttft_ms"] = rec["first_token_ms"] - rec["arrival_ms"]
        rec["tbt_mean_ms"] = done.tbt_mean_ms
        rec["tbt_p99_ms"] = done.tbt_p99_ms
        self._finish(flight.order.request.request_id, "")

    # -- records ---------------------------------------------------------------
    def fail(self, rid: str, reason: str) -> None:
        """The request in flight ends as failed, with ``reason``."""
        self._finish(rid, reason)

    def _finish(self, rid: str, reason: str) -> None:
        flight = self.flights.pop(rid)
        if not flight.prefilled:
            self._prefill_left(flight)
        self.prefill_flights[flight.prefill].discard(rid)
        d = self.decodes[flight.decode]
        d.flights.discard(rid)
        if flight.admitted:
            d.active -= 1
        else:
            d.queued -= 1
        d.reserved_tokens -= flight.reserved_tokens
        rec = flight.rec
        rec["status"] = "failed" if reason else "ok"
        rec["reason"] = reason
        self._write(rec)

    def _write(self, rec: dict[str, Any]) -> None:
        self.written.add(str(rec["request_id"]))
        self.on_record(rec)

    def fail_undispatched(self, req: Request, reason: str, **extra: Any) -> None:
        rec = empty_record(req.request_id, self.cfg.scheduler, req.arrival_ms, req.input_tokens, req.output_tokens)
        rec.update(extra)
        rec["reason"] = reason
        self._write(rec)

    def fail_unfinished(self, why: str) -> None:
        """Every request still in flight fails with ``why`` and its stage."""
        for rid in sorted(self.flights):
            self.fail(rid, f"{why} ({self.flights[rid].stage()})")

    def account_for_the_rest(self, requests: Iterable[Request], why: str) -> None:
        """One failed record for each request of the window that has none yet:
        those in flight keep what their record already holds, those not yet
        dispatched say so."""
        for rid in list(self.flights):
            if rid not in self.written:
                self.fail(rid, f"{why} while in flight")
        for req in requests:
            if req.request_id not in self.written:
                self.fail_undispatched(req, f"{why} before dispatch")
