"""The frontend of a replay: trace in, worker processes driven, records out.

It runs in the caller's process (the testbed CLI or ``python -m
workers.run``), not on the emulated network: it talks to every worker over
one Unix-domain control socket in the run directory (filesystem paths work
across network namespaces), so the KV payloads are the only traffic on the
data network.

An instance is one GPU host, or with tensor parallelism (the perf model's
``tp`` > 1) ``tp`` GPU hosts of one server named by its rank-0 host
(:mod:`netkv.placement`); there is one worker process per instance, on its
rank-0 host, and the scheduler sees one candidate per decode instance, priced
by :class:`netkv.oracle.TensorParallelOracle` (a transfer is ``tp`` rank
flows and costs its slowest).

Per request, at its arrival time:

1. choose the prefill instance (:class:`netkv.prefill.PrefillChooser`, on
   mirrors of every prefill's prefix cache and its predicted pending work);
2. build a :class:`netkv.request.DecodeView` of every live decode instance from
   the frontend's bookkeeping (waiting / decoding counts, reserved KV tokens,
   a mirror of the prefix blocks it holds) and ask the scheduler under test;
3. send ``expect`` to the decode worker and ``prefill`` to the prefill worker.

Reports from the workers fill in the request's record; a record is written
the moment its request finishes or fails, exactly once.  A worker whose
control connection ends (it exited or was killed), or whose process a
watchdog finds exited (every ``WORKER_POLL_S``), fails every unfinished
request that depends on it, with a reason naming the worker and the stage the
request was in, and is left out of later choices; it is chosen again once a
restarted worker of that host says hello (with an empty prefix cache).  After the last
arrival, requests not finished within ``drain_timeout_s`` fail with the stage
they were stuck in.  Every worker process is then told to stop and, if it
does not, ended by its pid.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netkv import perfmodel
from netkv.oracle import StaticOracle, TensorParallelOracle
from netkv.placement import make_placement, tier_mix
from netkv.prefill import PrefillChoiceError, PrefillChooser, PrefillInstance, PrefixCache
from netkv.records import RecordWriter, empty_record, summarize, validate_file
from netkv.request import DecodeView, Request
from netkv.schedulers import NoEligibleDecode, create
from netkv.slo import SloConfig
from netkv.traces import TraceIssue
from topologies import catalog

from .launch import Launcher
from .protocol import CONTROL_SOCKET_NAME, MAX_LINE_BYTES, UNIX_PATH_MAX, ProtocolError, decode, encode
from .run import ReplayConfig

STOP_GRACE_S = 5.0
KILL_GRACE_S = 2.0
# How often the watchdog polls the worker processes: a dead worker is noticed
# within this (its control socket closing usually tells sooner).
WORKER_POLL_S = 0.2
# how long a worker whose connection just ended is given to finish exiting, so that
# its exit code is known when its requests are failed
WORKER_EXIT_GRACE_S = 0.05


class ReplayError(RuntimeError):
    """The replay could not run (workers did not start, bad run directory...)."""


STATUS_INTERVAL_S = 0.5  # how often a replay tells the controller its progress (for the fabric view)


def post_status(url: str, report: dict[str, Any], timeout_s: float = 1.0) -> None:
    """POST one progress report (schema ReplayReport, controller/openapi.py) to the
    controller's /replay; raises OSError when it does not answer 200."""
    req = urllib.request.Request(url, data=json.dumps(report).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        resp.read()


class GcClock:
    """Wall time CPython's cyclic garbage collector has run in this process
    since :meth:`start` (``gc.callbacks``), so that a decision's record can
    say how much of its time was a collection's pause rather than its own."""

    def __init__(self) -> None:
        self.total_s = 0.0
        self._began: float | None = None

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        elif self._began is not None:
            self.total_s += time.perf_counter() - self._began
            self._began = None

    def start(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def stop(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


class DecisionTimer:
    """Times one scheduling decision from its construction to :meth:`fields`:
    wall and thread CPU time (their difference is time the thread was off the
    CPU), and what else the wall time held: collections, and the thread's
    context switches (involuntary: the kernel gave the CPU to another process;
    voluntary: it blocked, as on the interpreter lock another thread held)."""

    def __init__(self, gc_clock: GcClock) -> None:
        self.gc_clock = gc_clock
        self.gc_before_s = gc_clock.total_s
        self.usage = resource.getrusage(resource.RUSAGE_THREAD)
        self.cpu_started = time.thread_time()
        self.started = time.perf_counter()

    def fields(self) -> dict[str, Any]:
        """The record's decision_* fields, as of now."""
        wall_us = (time.perf_counter() - self.started) * 1e6
        cpu_us = (time.thread_time() - self.cpu_started) * 1e6
        now = resource.getrusage(resource.RUSAGE_THREAD)
        return {"decision_us": wall_us, "decision_cpu_us": cpu_us,
                "decision_gc_us": (self.gc_clock.total_s - self.gc_before_s) * 1e6,
                "decision_preemptions": now.ru_nivcsw - self.usage.ru_nivcsw,
                "decision_waits": now.ru_nvcsw - self.usage.ru_nvcsw}


class DecisionPriority:
    """Runs each decode decision at real-time priority (SCHED_FIFO at its
    lowest level) and gives the frontend's thread its normal scheduling back
    after it.

    Here the router shares two cores with the emulated fabric: switch
    processes, workers and the kernel's htb and veth work.  A production router
    has its own host, so a switch process preempting a decision is the
    emulator's cost, not the scheduler's; it was what held NetKV's decision p99
    above 0.5 ms in a long replay (docs/schedulers.md).  At SCHED_FIFO no
    normal process preempts the decision; the hypervisor still can (steal).
    The two system calls cost about 2 us per decision, outside the timed part.
    Setting it needs CAP_SYS_NICE: without it, decisions run at normal
    priority and :attr:`applied` is false (the summary's ``decision_realtime``)."""

    def __init__(self, wanted: str) -> None:
        self.applied = False
        self.refusal = ""  # why real time was wanted and not applied
        if wanted != "realtime":
            return
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            self.applied = True
        except OSError as exc:
            self.refusal = f"cannot run decisions at SCHED_FIFO ({exc.strerror}); they run at normal priority"

    def __enter__(self) -> "DecisionPriority":
        if self.applied:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.applied:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


@dataclass
class Flight:
    """A request between its dispatch and its record."""

    req: Request
    rec: dict[str, Any]
    prefill: str
    decode: str
    predicted_prefill_ms: float
    reserved_tokens: int
    prefilled: bool = False
    sent: bool = False
    admitted: bool = False
    done_msg: dict[str, Any] | None = None

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
    name: str
    cache: PrefixCache
    queued: int = 0
    active: int = 0
    reserved_tokens: int = 0
    alive: bool = True
    flights: set[str] = field(default_factory=set)


class Frontend:
    def __init__(
        self,
        config: ReplayConfig,
        launcher: Launcher,
        run_dir: Path,
        *,
        oracle: Any = None,
        scheduler: Any = None,
        topology: Any = None,
        status_url: str | None = None,
        on_start: Any = None,
    ) -> None:
        config.validate()
        self.on_start = on_start  # called with self once the replay clock starts
        self.loop: asyncio.AbstractEventLoop | None = None
        # workers found dead: {"host", "t_s", "how", "failed"}, in order
        self.losses: list[dict[str, Any]] = []
        self.background: set[asyncio.Task[None]] = set()  # tasks nobody awaits, kept referenced
        self.status_url = status_url  # where progress is POSTed (the controller's /replay), or None
        self.status_failures = 0
        self.sent_since_report: list[dict[str, Any]] = []  # KV transfers that ended since the last report
        self.cfg = config
        self.launcher = launcher
        self.run_dir = run_dir
        self.topo = topology if topology is not None else catalog.build(config.topology, config.topology_params)
        self.perf = perfmodel.build(config.model, config.gpu, config.perf_overrides)
        # An instance is perf.tp GPU hosts of one server, named by its rank-0 host (netkv.placement).
        self.placement = make_placement(self.topo, config.placement, tp=self.perf.tp)
        if config.oracle == "telemetry" and oracle is None:
            raise ReplayError('oracle "telemetry" needs a telemetry oracle: pass oracle= to replay()')
        self.oracle = oracle if oracle is not None else StaticOracle(self.topo)
        if self.placement.tp > 1:  # a transfer is tp rank flows; it costs its slowest
            self.oracle = TensorParallelOracle(self.oracle, {i: self.placement.ranks_of(i)
                                                             for i in self.placement.instances},
                                               self.perf.rank_flow_bytes)
        warm = getattr(self.oracle, "warm", None)
        if warm is not None:
            warm(self.placement.prefill)  # the paths from every prefill: start-up work, not a decision's
        self.scheduler = scheduler if scheduler is not None else create(
            config.scheduler, config.scheduler_config, kv_bytes_per_token=self.perf.kv_bytes_per_token,
            seed=config.seed,
        )
        self.chooser = PrefillChooser(self.perf, config.prefill_policy)
        self.prefills = {h: PrefillInstance(h, PrefixCache(self.perf.prefix_cache_blocks)) for h in self.placement.prefill}
        self.decodes = {h: DecodeState(h, PrefixCache(self.perf.prefix_cache_blocks)) for h in self.placement.decode}
        self.prefill_flights: dict[str, set[str]] = {h: set() for h in self.placement.prefill}
        self.flights: dict[str, Flight] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.writers: dict[str, asyncio.StreamWriter] = {}
        self.hello: dict[str, asyncio.Event] = {}
        self.addrs: dict[str, tuple[str, int]] = {}
        self.rank_addrs: dict[str, list[tuple[str, int]]] = {}  # tp > 1: every rank's KV listener of a decode
        self.late_reports = 0
        self.max_dispatch_lag_ms = 0.0
        self.t0 = 0.0
        self.writer: RecordWriter | None = None
        self.written: set[str] = set()  # request ids that have their record
        self.all_done = asyncio.Event()
        self.dispatched_all = False
        self.progress: Any = None
        self.sock_path = run_dir.resolve() / CONTROL_SOCKET_NAME
        self.stopping = False
        self.gc_clock = GcClock()  # collections inside decisions (decision_gc_us)
        self.decision_priority = DecisionPriority(config.decision_priority)

    # -- time ------------------------------------------------------------------
    def ms(self, epoch_s: float) -> float:
        return (epoch_s - self.t0) * 1000.0

    # -- records ---------------------------------------------------------------
    def _finish(self, rid: str, reason: str = "") -> None:
        flight = self.flights.pop(rid)
        if not flight.prefilled:
            inst = self.prefills[flight.prefill]
            inst.pending_ms = max(0.0, inst.pending_ms - flight.predicted_prefill_ms)
            inst.queue_len -= 1
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
        assert self.writer is not None
        self.writer.write(rec)
        self.written.add(str(rec["request_id"]))
        if self.progress is not None:
            self.progress.update(1)
        if self.dispatched_all and not self.flights:
            self.all_done.set()

    def _account_for_the_rest(self, requests: list[Request], why: str) -> None:
        """One failed record for each request of the window that has none yet:
        those in flight keep what their record already holds, those not yet
        dispatched say so."""
        for rid in list(self.flights):
            if rid not in self.written:
                self._finish(rid, f"{why} while in flight")
        for req in requests:
            if req.request_id not in self.written:
                self._fail_undispatched(req, f"{why} before dispatch")

    def _fail_undispatched(self, req: Request, reason: str, **extra: Any) -> None:
        rec = empty_record(req.request_id, self.cfg.scheduler, req.arrival_ms, req.input_tokens, req.output_tokens)
        rec.update(extra)
        rec["reason"] = reason
        self._write(rec)

    # -- dispatch -------------------------------------------------------------
    def dispatch(self, req: Request) -> None:
        lag_ms = self.ms(time.time()) - req.arrival_ms
        self.max_dispatch_lag_ms = max(self.max_dispatch_lag_ms, lag_ms)
        try:
            choice = self.chooser.choose(req.hash_ids, req.input_tokens, list(self.prefills.values()))
        except PrefillChoiceError as exc:
            self._fail_undispatched(req, f"no prefill: {exc}")
            return
        with self.decision_priority:
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
            try:
                decision = self.scheduler.choose(req, choice.name, views, self.oracle, time.time()) if views else None
                refusal = None
            except NoEligibleDecode as exc:
                decision, refusal = None, exc
            timing = timer.fields()
        if not views:
            self._fail_undispatched(req, "no decode: no live decode instance", prefill=choice.name)
            return
        if refusal is not None:
            self._fail_undispatched(req, f"no eligible decode: {refusal}", prefill=choice.name,
                                    views_build_us=views_build_us, **timing)
            return
        if decision is None:
            raise ReplayError(f"scheduler {self.cfg.scheduler!r} returned no decision")
        if decision.decode not in self.decodes or not self.decodes[decision.decode].alive:
            raise ReplayError(f"scheduler chose {decision.decode!r}, which is not a live decode instance")
        kv_bytes = int(decision.bytes_to_send)
        wire_bytes = math.ceil(kv_bytes / self.cfg.scale_factor)
        tp_expect: dict[str, Any] = {}
        tp_prefill: dict[str, Any] = {}
        if self.placement.tp > 1:
            wire_bytes, tp_expect, tp_prefill = self._rank_flows(decision.decode, kv_bytes)
        rec = empty_record(req.request_id, self.cfg.scheduler, req.arrival_ms, req.input_tokens, req.output_tokens)
        est = decision.estimate
        rec.update(
            prefill=choice.name, decode=decision.decode,
            tier_distance=self.topo.tier_distance(choice.name, decision.decode),
            views_build_us=views_build_us, **timing, score_terms={k: float(v) for k, v in decision.score_terms.items()},
            estimate_transfer_ms=None if est is None else float(est.transfer_ms),
            tokens_sent=int(decision.tokens_to_send), kv_bytes=kv_bytes, bytes_sent=wire_bytes,
        )
        need = req.input_tokens + req.output_tokens
        flight = Flight(req, rec, choice.name, decision.decode, choice.predicted_prefill_ms, need)
        self.flights[req.request_id] = flight
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
        self._send(decision.decode, {"t": "expect", "id": req.request_id, "input_tokens": req.input_tokens,
                                     "output_tokens": req.output_tokens, "wire_bytes": wire_bytes, **tp_expect})
        self._send(choice.name, {"t": "prefill", "id": req.request_id, "input_tokens": req.input_tokens,
                                 "hash_ids": list(req.hash_ids), "decode": decision.decode,
                                 "addr": list(self.addrs[decision.decode]), "wire_bytes": wire_bytes, **tp_prefill})

    def _rank_flows(self, decode: str, kv_bytes: int) -> tuple[int, dict[str, Any], dict[str, Any]]:
        """Tensor parallelism: the transfer as tp flows, rank i to rank i, each
        of its rank's share (perf.rank_flow_bytes) scaled to the wire.  Returns
        the wire bytes of all flows together and the rank fields of the
        ``expect`` and the ``prefill`` message."""
        rank_wire = [math.ceil(b / self.cfg.scale_factor) for b in self.perf.rank_flow_bytes(kv_bytes)]
        return (sum(rank_wire), {"rank_wire_bytes": rank_wire},
                {"rank_addrs": [list(a) for a in self.rank_addrs[decode]], "rank_wire_bytes": rank_wire})

    def _send(self, host: str, msg: dict[str, Any]) -> None:
        writer = self.writers.get(host)
        if writer is not None and not writer.is_closing():
            writer.write(encode(msg))

    # -- reports ---------------------------------------------------------------
    def on_report(self, host: str, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        rid = msg.get("id")
        flight = self.flights.get(rid) if isinstance(rid, str) else None
        if flight is None:
            self.late_reports += 1  # the request already has its record (failed earlier)
            return
        rec = flight.rec
        if kind == "prefilled":
            flight.prefilled = True
            inst = self.prefills[flight.prefill]
            inst.pending_ms = max(0.0, inst.pending_ms - flight.predicted_prefill_ms)
            inst.queue_len -= 1
            rec["prefill_start_ms"] = self.ms(msg["start_s"])
            rec["prefill_end_ms"] = self.ms(msg["end_s"])
            rec["queue_wait_ms"] = rec["prefill_start_ms"] - rec["arrival_ms"]
            rec["prefill_cached_tokens"] = int(msg["cached_tokens"])
        elif kind == "sent":
            flight.sent = True
            if self.status_url is not None:
                self.sent_since_report.extend(self._transfers(flight))
            self.prefill_flights[flight.prefill].discard(rid)  # type: ignore[arg-type]
            rec["transfer_start_ms"] = self.ms(msg["start_s"])
            if flight.done_msg is not None:
                self._complete(flight, flight.done_msg)
        elif kind == "send_failed":
            # A decode killed mid-transfer resets the connection before its exit code
            # is known: give it the control connection's grace, then name the death.
            task = asyncio.get_running_loop().create_task(
                self._transfer_failed(flight.req.request_id, flight.decode, str(msg.get("reason", ""))))
            self.background.add(task)
            task.add_done_callback(self.background.discard)
        elif kind == "admitted":
            flight.admitted = True
            d = self.decodes[flight.decode]
            d.queued -= 1
            d.active += 1
        elif kind == "done":
            if not flight.admitted:
                self.on_report(host, {"t": "admitted", "id": rid})
            if flight.sent:
                self._complete(flight, msg)
            else:
                flight.done_msg = msg  # the sender's report is still on its way
        elif kind == "rejected":
            self._finish(flight.req.request_id, f"rejected by decode {host}: {msg.get('reason', '')}")
        else:
            raise ProtocolError(f"{host} sent an unknown report {kind!r}")

    async def _transfer_failed(self, rid: str, decode_host: str, reason: str) -> None:
        """A failed transfer whose decode worker died is that worker's loss (every
        request it held fails naming it); any other failure is the transfer's."""
        await asyncio.sleep(WORKER_EXIT_GRACE_S)
        proc = self.procs.get(decode_host)
        if proc is not None and proc.poll() is not None and self.alive(decode_host):
            self.worker_lost(decode_host, "failed transfer")
        if rid in self.flights:
            self._finish(rid, f"transfer failed: {reason}")

    def _complete(self, flight: Flight, msg: dict[str, Any]) -> None:
        rec = flight.rec
        rec["transfer_end_ms"] = self.ms(msg["transfer_end_s"])
        rec["decode_admit_ms"] = self.ms(msg["admit_s"])
        rec["first_token_ms"] = self.ms(msg["first_token_s"])
        rec["completion_ms"] = self.ms(msg["completion_s"])
        rec["ttft_ms"] = rec["first_token_ms"] - rec["arrival_ms"]
        rec["tbt_mean_ms"] = msg.get("tbt_mean_ms")
        rec["tbt_p99_ms"] = msg.get("tbt_p99_ms")
        self._finish(flight.req.request_id)

    def alive(self, host: str) -> bool:
        return self.prefills[host].alive if host in self.prefills else self.decodes[host].alive

    def role_of(self, host: str) -> str:
        return "prefill" if host in self.prefills else "decode"

    def worker_lost(self, host: str, seen_by: str = "control connection") -> None:
        """The worker of ``host`` is gone: every request that still needs it
        fails with the reason and the stage it was in; it is not chosen again
        until a restarted worker says hello.  Called once per loss (by the
        control connection's end or the watchdog, whichever is first)."""
        if self.stopping or not self.alive(host):
            return  # told to stop (every request has its record), or already handled
        now = time.time()
        self.writers.pop(host, None)
        proc = self.procs.get(host)
        rc = proc.poll() if proc is not None else None
        how = f"exited with code {rc}" if rc is not None else "closed its control connection"
        if host in self.prefills:
            self.prefills[host].alive = False
            affected = sorted(self.prefill_flights[host])
            what = f"prefill worker {host} {how}"
        else:
            self.decodes[host].alive = False
            affected = sorted(self.decodes[host].flights)
            what = f"decode worker {host} {how}"
        print(f"netkv replay: worker {host} {how}; failing {len(affected)} request(s)", file=sys.stderr)
        failed = 0
        for rid in affected:
            if rid in self.flights:
                self._finish(rid, f"{what} ({self.flights[rid].stage()})")
                failed += 1
        self.losses.append({"host": host, "t_s": now, "how": f"{seen_by}: {how}", "failed": failed})

    async def watchdog(self) -> None:
        """Polls every worker process; one that exited while counted alive is
        lost (its control connection may close later, or, if it hangs, never)."""
        while True:
            await asyncio.sleep(WORKER_POLL_S)
            for host, proc in list(self.procs.items()):
                if proc.poll() is not None and self.alive(host) and not self.stopping:
                    self.worker_lost(host, "watchdog")

    # -- faults (called from other threads: the testbed's fault runner) ----------------
    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` in the frontend's event loop (the thread that decides),
        wait for it and return its result."""
        assert self.loop is not None

        async def run() -> Any:
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    def kill_worker(self, host: str) -> int:
        """SIGKILL the worker of ``host`` by its pid; returns the pid."""
        proc = self.procs[host]
        proc.kill()
        return int(proc.pid)

    def restart_worker(self, host: str, timeout_s: float) -> tuple[int, float]:
        """Start the worker of ``host`` again and wait for its hello; returns
        (pid, time of the hello)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(self._restart(host, timeout_s), self.loop).result(timeout_s + 5)

    async def _restart(self, host: str, timeout_s: float) -> tuple[int, float]:
        if self.alive(host):
            raise ReplayError(f"worker {host} is still alive")
        old = self.procs[host]
        if old.poll() is None:
            old.kill()
        await asyncio.get_running_loop().run_in_executor(None, old.wait)
        self.hello[host] = asyncio.Event()
        role = self.role_of(host)
        proc = self.procs[host] = self.launcher.popen(host, self._argv(host, role), self.run_dir / "logs" / f"{host}.log")
        try:
            await asyncio.wait_for(self.hello[host].wait(), timeout=timeout_s)
        except asyncio.TimeoutError:
            raise ReplayError(f"restarted worker {host} did not connect within {timeout_s:g} s") from None
        return int(proc.pid), time.time()

    def _welcome_back(self, host: str) -> None:
        """A restarted worker said hello: it starts empty, and is chosen again."""
        if host in self.prefills:
            self.prefills[host] = PrefillInstance(host, PrefixCache(self.perf.prefix_cache_blocks))
            self.prefill_flights[host] = set()
        else:
            self.decodes[host] = DecodeState(host, PrefixCache(self.perf.prefix_cache_blocks))

    # -- control socket -----------------------------------------------------
    async def on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host: str | None = None
        try:
            line = await reader.readline()
            if not line:
                return
            hello = decode(line)
            host = str(hello.get("host"))
            if hello.get("t") != "hello" or host not in self.hello or host in self.writers:
                raise ProtocolError(f"unexpected first control message {hello!r}")
            if not self.alive(host):
                self._welcome_back(host)
            self.writers[host] = writer
            self.hello[host].set()
            while True:
                line = await reader.readline()
                if not line:
                    break
                self.on_report(host, decode(line))
        except (ConnectionError, ProtocolError, ValueError) as exc:
            print(f"netkv replay: control connection of {host or '?'} failed: {exc}", file=sys.stderr)
        finally:
            writer.close()
            if host is not None and self.writers.get(host) is writer:
                await asyncio.sleep(WORKER_EXIT_GRACE_S)  # let the process finish exiting so its code is known
                self.worker_lost(host)

    # -- processes ---------------------------------------------------------------
    def _argv(self, host: str, role: str) -> list[str]:
        argv = [sys.executable, "-m", f"workers.{role}", "--host", host, "--control", str(self.sock_path),
                "--model", self.cfg.model, "--gpu", self.cfg.gpu, "--perf-json", json.dumps(self.cfg.perf_overrides)]
        if role == "decode":
            ip, port = self.addrs[host]
            argv += ["--listen-ip", ip, "--listen-port", str(port), "--max-batch", str(self.cfg.decode_max_batch)]
        if self.placement.tp > 1:
            argv += ["--ranks-json", json.dumps(self._ranks_arg(host, role))]
        return argv

    def _ranks_arg(self, instance: str, role: str) -> list[dict[str, Any]]:
        """The worker's --ranks-json: each rank host, the namespace its sockets
        are opened in (rank 0: the worker's own) and, for a decode, its listener."""
        netns_path = getattr(self.launcher, "netns_path", None)
        if netns_path is None:
            raise ReplayError(f"tp={self.placement.tp} needs a launcher that names each GPU host's network "
                              f"namespace (netns_path); {type(self.launcher).__name__} does not")
        out: list[dict[str, Any]] = []
        for rank, host in enumerate(self.placement.ranks_of(instance)):
            entry: dict[str, Any] = {"host": host, "netns": None if rank == 0 else netns_path(host)}
            if role == "decode":
                ip, port = self.rank_addrs[instance][rank]
                entry.update(ip=ip, port=port)
            out.append(entry)
        return out

    async def start_workers(self) -> None:
        logs = self.run_dir / "logs"
        logs.mkdir(exist_ok=True)
        for host in self.placement.decode:
            self.addrs[host] = self.launcher.data_addr(host)
            if self.placement.tp > 1:
                self.rank_addrs[host] = [self.launcher.data_addr(h) for h in self.placement.ranks_of(host)]
        for host in self.placement.instances:  # one worker per instance, on its rank-0 host
            self.hello[host] = asyncio.Event()
            role = self.placement.role_of(host)
            self.procs[host] = self.launcher.popen(host, self._argv(host, role), logs / f"{host}.log")
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while not all(e.is_set() for e in self.hello.values()):
            dead = [h for h, p in self.procs.items() if p.poll() is not None and not self.hello[h].is_set()]
            if dead:
                raise ReplayError(f"worker {dead[0]} exited with code {self.procs[dead[0]].returncode} "
                                  f"before connecting:\n{self._log_tail(dead[0])}")
            if time.monotonic() > deadline:
                late = [h for h, e in self.hello.items() if not e.is_set()]
                raise ReplayError(f"{len(late)} worker(s) did not connect within startup_timeout_s="
                                  f"{self.cfg.startup_timeout_s}: {', '.join(late[:8])}\n{self._log_tail(late[0])}")
            await asyncio.sleep(0.05)

    def _log_tail(self, host: str, lines: int = 15) -> str:
        path = self.run_dir / "logs" / f"{host}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def stop_workers(self) -> None:
        self.stopping = True
        for host in list(self.writers):
            self._send(host, {"t": "stop"})
        deadline = time.monotonic() + STOP_GRACE_S
        while any(p.poll() is None for p in self.procs.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + KILL_GRACE_S
        while any(p.poll() is None for p in self.procs.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # -- progress for the controller's fabric view ----------------------------
    def _transfers(self, flight: Flight) -> list[dict[str, Any]]:
        """The flows of one KV transfer: one, or tp rank to rank (tensor parallelism)."""
        kv_bytes = int(flight.rec.get("kv_bytes") or 0)
        if self.placement.tp == 1:
            return [{"src": flight.prefill, "dst": flight.decode, "bytes": kv_bytes}]
        return [{"src": p, "dst": d, "bytes": b} for p, d, b in zip(
            self.placement.ranks_of(flight.prefill), self.placement.ranks_of(flight.decode),
            self.perf.rank_flow_bytes(kv_bytes))]

    def status_report(self, total: int, finished: bool = False) -> dict[str, Any]:
        """Requests with a record so far, and the KV transfers in flight at any moment
        since the previous report: those under way now (prefilled, not yet sent) and
        those that ended in between (most take milliseconds, reports come every 0.5 s)."""
        flying = [t for f in self.flights.values() if f.prefilled and not f.sent for t in self._transfers(f)]
        flying += self.sent_since_report
        self.sent_since_report = []
        return {"scheduler": self.cfg.scheduler, "requests_done": len(self.written), "requests_total": total,
                "transfers_in_flight": [] if finished else flying, "finished": finished}

    def _post_status(self, report: dict[str, Any]) -> None:
        assert self.status_url is not None
        try:
            post_status(self.status_url, report)
        except OSError as exc:
            # the view is a convenience: the replay goes on, and says so once
            self.status_failures += 1
            if self.status_failures == 1:
                print(f"replay: could not report progress to {self.status_url}: {exc}", file=sys.stderr)

    async def report_status(self, total: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await loop.run_in_executor(None, self._post_status, self.status_report(total))
            await asyncio.sleep(STATUS_INTERVAL_S)

    # -- the run ---------------------------------------------------------------
    async def replay_requests(self, requests: list[Request]) -> None:
        for req in requests:
            delay = self.t0 + req.arrival_ms / 1000.0 - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.dispatch(req)
        self.dispatched_all = True
        if not self.flights:
            self.all_done.set()
        last_arrival_s = self.t0 + (requests[-1].arrival_ms / 1000.0 if requests else 0.0)
        wait_s = last_arrival_s + self.cfg.drain_timeout_s - time.time()
        try:
            await asyncio.wait_for(self.all_done.wait(), timeout=max(0.0, wait_s))
        except asyncio.TimeoutError:
            for rid in sorted(self.flights):
                stage = self.flights[rid].stage()
                self._finish(rid, f"not finished within drain_timeout_s={self.cfg.drain_timeout_s:g} "
                                  f"after the last arrival ({stage})")

    async def main(self, requests: list[Request]) -> None:
        server = await asyncio.start_unix_server(self.on_connection, path=str(self.sock_path), limit=MAX_LINE_BYTES)
        reporter: asyncio.Task[None] | None = None
        try:
            await self.start_workers()
            self.t0 = time.time()
            self.loop = asyncio.get_running_loop()
            watchdog = asyncio.create_task(self.watchdog())
            if self.status_url is not None:
                reporter = asyncio.create_task(self.report_status(len(requests)))
            if self.on_start is not None:
                self.on_start(self)
            await self.replay_requests(requests)
            watchdog.cancel()
        finally:
            self.dispatched_all = True
            if self.status_url is not None:
                if reporter is not None:
                    reporter.cancel()
                self._post_status(self.status_report(len(requests), finished=True))
            await self.stop_workers()
            server.close()
            for writer in list(self.writers.values()):
                writer.close()
            await asyncio.sleep(0.1)  # let the connection handlers see EOF

    def run(self) -> dict[str, Any]:
        run_dir = self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        records_path = run_dir / "records.jsonl"
        if records_path.exists():
            raise ReplayError(f"{records_path} already exists: use a fresh run directory")
        sock_dir = None
        if len(str(self.sock_path).encode()) > UNIX_PATH_MAX:
            # A deep run directory (a sweep's point / window / scheduler): a Unix
            # socket path must be short, so the socket goes to a private directory.
            import tempfile

            sock_dir = Path(tempfile.mkdtemp(prefix="netkv-ctl-"))
            self.sock_path = sock_dir / CONTROL_SOCKET_NAME
        if self.sock_path.exists():
            self.sock_path.unlink()
        self.cfg.write(run_dir / "config.json")
        load = self.cfg.window()
        _write_skipped(run_dir / "trace_skipped.txt", load.skipped)
        requests = load.requests
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.progress = tqdm(total=len(requests), unit="req", desc=f"replay {self.cfg.scheduler}")
        self.writer = RecordWriter(records_path)
        if self.decision_priority.refusal:
            print(f"netkv: note: {self.decision_priority.refusal}", file=sys.stderr)
        self.gc_clock.start()
        try:
            asyncio.run(self.main(requests))
        except BaseException as exc:
            # Ctrl-C, SIGTERM, or a crash of the frontend itself: every request
            # of the window still gets its one record before the error goes on.
            self._account_for_the_rest(requests, f"run interrupted ({type(exc).__name__}: {exc})")
            raise
        finally:
            self.gc_clock.stop()
            self.writer.close()
            if self.progress is not None:
                self.progress.close()
            if self.sock_path.exists():
                self.sock_path.unlink()
            if sock_dir is not None:
                sock_dir.rmdir()
        # One record per replayed request, checked from the file.
        problems = validate_file(records_path, [r.request_id for r in requests])
        run_info = {
            "run_start_epoch_s": self.t0,
            "placement": self.placement.as_dict(),
            "tier_pairs": tier_mix(self.topo, self.placement),
            "perf": self.perf.describe(),
            "workers": {h: {"pid": p.pid, "returncode": p.returncode,
                            "data_addr": list(self.addrs[h]) if h in self.addrs else None}
                        for h, p in self.procs.items()},
        }
        if self.placement.tp > 1:
            run_info["rank_data_addrs"] = {h: [list(a) for a in addrs] for h, addrs in self.rank_addrs.items()}
        (run_dir / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
        summary = summarize(records_path, self.cfg.ttft_slo_ms, SloConfig.from_dict(self.cfg.slo))
        summary.update(
            run_dir=str(run_dir), run_start_epoch_s=self.t0, scheduler=self.cfg.scheduler,
            trace_lines_skipped=len(load.skipped), late_reports=self.late_reports,
            max_dispatch_lag_ms=self.max_dispatch_lag_ms, problems=problems,
            decision_realtime=self.decision_priority.applied,
        )
        if self.status_url is not None:
            summary["status_report_failures"] = self.status_failures
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def _write_skipped(path: Path, skipped: list[TraceIssue]) -> None:
    if skipped:
        path.write_text("".join(f"{issue}\n" for issue in skipped))
