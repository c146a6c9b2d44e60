"""The emulator's frontend: the serving model's ledger driving worker processes.

It runs in the caller's process (the testbed CLI or ``python -m
workers.run``), not on the emulated network.  The router's side of the
serving model, dispatch, bookkeeping and records, is
:class:`netkv.serving.ledger.Ledger`; this class is the emulator's side of it:
it starts one worker process per instance (through a :class:`Launcher`),
talks to every worker over one Unix-domain control socket in the run
directory (filesystem paths work across network namespaces, so the KV
payloads are the only traffic on the data network), paces the trace's
arrivals on the wall clock, sends each :class:`~netkv.serving.ledger.Order`
as an ``expect`` to the decode worker and a ``prefill`` to the prefill worker
(:mod:`workers.protocol`), and hands the workers' reports to the ledger.

An instance is one GPU host, or with tensor parallelism (the perf model's
``tp`` > 1) ``tp`` GPU hosts of one server named by its rank-0 host
(:mod:`netkv.placement`); there is one worker process per instance, on its
rank-0 host.

A worker whose control connection ends (it exited or was killed), or whose
process a watchdog finds exited (every ``WORKER_POLL_S``), fails every
unfinished request that depends on it, with a reason naming the worker and the
stage the request was in, and is left out of later choices; it is chosen again
once a restarted worker of that host says hello (with an empty prefix cache).
After the last arrival, requests not finished within ``drain_timeout_s`` fail
with the stage they were stuck in.  Every worker process is then told to stop
and, if it does not, ended by its pid.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from controller.client import ControllerClient, ControllerUnavailable
from netkv.perfmodel import PerfModel
from netkv.placement import Placement, tier_mix
from netkv.records import RecordWriter, summarize, validate_file
from netkv.request import Request
from netkv.schedulers import Scheduler
from netkv.serving.config import ReplayConfig
from netkv.serving.decode import Done
from netkv.serving.ledger import Flight, Ledger, Order
from netkv.serving.timing import DecisionPriority
from netkv.slo import SloConfig
from netkv.traces import TraceIssue
from topologies import Topology, catalog

from .launch import Launcher
from .protocol import CONTROL_SOCKET_NAME, MAX_LINE_BYTES, UNIX_PATH_MAX, ProtocolError, decode, encode

STOP_GRACE_S = 5.0
KILL_GRACE_S = 2.0
# How often the watchdog polls the worker processes: a dead worker is noticed
# within this (its control socket closing usually tells sooner).
WORKER_POLL_S = 0.2
# how long a worker whose connection just ended is given to finish exiting, so that
# its exit code is known when its requests are failed
WORKER_EXIT_GRACE_S = 0.05
STATUS_INTERVAL_S = 0.5  # how often a replay tells the controller its progress (for the fabric view)


class ReplayError(RuntimeError):
    """The replay could not run (workers did not start, bad run directory...)."""


def flows_json(flight: Flight) -> list[dict[str, Any]]:
    """The flows of one KV transfer as the fabric view shows them (real bytes)."""
    return [{"src": f.src, "dst": f.dst, "bytes": f.kv_bytes} for f in flight.order.flows]


class Frontend:
    def __init__(
        self,
        config: ReplayConfig,
        launcher: Launcher,
        run_dir: Path,
        *,
        oracle: Any = None,
        scheduler: Scheduler | None = None,
        topology: Topology | None = None,
        status_url: str | None = None,
        on_start: Callable[["Frontend"], None] | None = None,
    ) -> None:
        config.validate()
        self.cfg = config
        self.launcher = launcher
        self.run_dir = run_dir
        self.on_start = on_start  # called with self once the replay clock starts
        self.topo = topology if topology is not None else catalog.build(config.topology, config.topology_params)
        self.decision_priority = DecisionPriority(config.decision_priority)
        self.ledger = Ledger(config, self.topo, self._on_record, oracle=oracle, scheduler=scheduler,
                             decide_in=self.decision_priority)
        self.loop: asyncio.AbstractEventLoop | None = None
        # workers found dead: {"host", "t_s", "how", "failed"}, in order
        self.losses: list[dict[str, Any]] = []
        self.background: set[asyncio.Task[None]] = set()  # tasks nobody awaits, kept referenced
        # where progress is POSTed (the controller's /replay), or None
        self.status = None if status_url is None else ControllerClient(status_url)
        self.status_failures = 0
        self.sent_since_report: list[dict[str, Any]] = []  # KV transfers that ended since the last report
        self.procs: dict[str, subprocess.Popen] = {}  # type: ignore[type-arg]
        self.writers: dict[str, asyncio.StreamWriter] = {}
        self.hello: dict[str, asyncio.Event] = {}
        self.addrs: dict[str, tuple[str, int]] = {}
        self.rank_addrs: dict[str, list[tuple[str, int]]] = {}  # tp > 1: every rank's KV listener of a decode
        self.writer: RecordWriter | None = None
        self.all_done = asyncio.Event()
        self.dispatched_all = False
        self.progress: Any = None
        self.sock_path = run_dir.resolve() / CONTROL_SOCKET_NAME
        self.stopping = False
        # A launcher across servers (lab.emulator.MininetLauncher) puts each
        # worker's time stamps on this machine's clock; on one machine there is one clock.
        self.to_head_s: Callable[[str, float], float] | None = self.launcher_hook("to_head_s")
        self.launcher_info: dict[str, Any] = {}  # what the launcher's finish() returned, for run.json

    def launcher_hook(self, name: str) -> Any:
        """An optional method of the launcher (workers.launch), or None."""
        return getattr(self.launcher, name, None)

    # -- the serving model's figures ------------------------------------------------
    @property
    def placement(self) -> Placement:
        return self.ledger.placement

    @property
    def perf(self) -> PerfModel:
        return self.ledger.perf

    @property
    def t0(self) -> float:
        return self.ledger.t0

    def alive(self, host: str) -> bool:
        return self.ledger.alive(host)

    def role_of(self, host: str) -> str:
        return self.ledger.role_of(host)

    # -- records ---------------------------------------------------------------
    def _on_record(self, rec: dict[str, Any]) -> None:
        assert self.writer is not None
        self.writer.write(rec)
        if self.progress is not None:
            self.progress.update(1)
        if self.dispatched_all and not self.ledger.flights:
            self.all_done.set()

    # -- dispatch -------------------------------------------------------------
    def dispatch(self, req: Request) -> None:
        order = self.ledger.dispatch(req, time.time())
        if order is not None:
            self._carry_out(order)

    def _carry_out(self, order: Order) -> None:
        """Tell the decode worker what comes and the prefill worker what to do.
        With tensor parallelism the messages carry each rank's flow size and
        the decode instance's listener of each rank (rank 0 first)."""
        req = order.request
        tp_expect: dict[str, Any] = {}
        tp_prefill: dict[str, Any] = {}
        if self.placement.tp > 1:
            rank_wire = [f.wire_bytes for f in order.flows]
            tp_expect = {"rank_wire_bytes": rank_wire}
            tp_prefill = {"rank_addrs": [list(a) for a in self.rank_addrs[order.decode]], "rank_wire_bytes": rank_wire}
        self._send(order.decode, {"t": "expect", "id": req.request_id, "input_tokens": req.input_tokens,
                                  "output_tokens": req.output_tokens, "wire_bytes": order.wire_bytes, **tp_expect})
        self._send(order.prefill, {"t": "prefill", "id": req.request_id, "input_tokens": req.input_tokens,
                                   "hash_ids": list(req.hash_ids), "decode": order.decode,
                                   "addr": list(self.addrs[order.decode]), "wire_bytes": order.wire_bytes,
                                   **tp_prefill})

    def _send(self, host: str, msg: dict[str, Any]) -> None:
        writer = self.writers.get(host)
        if writer is not None and not writer.is_closing():
            writer.write(encode(msg))

    # -- reports ---------------------------------------------------------------
    def on_report(self, host: str, msg: dict[str, Any]) -> None:
        """One worker report (workers.protocol), handed to the ledger, its
        time stamps put on this machine's clock first (a worker on another
        server reports that server's)."""
        if self.to_head_s is not None:
            msg = on_head_clock(msg, host, self.to_head_s)
        kind = msg["t"]
        rid = msg.get("id")
        ledger = self.ledger
        if kind == "prefilled":
            ledger.prefilled(rid, msg["start_s"], msg["end_s"], int(msg["cached_tokens"]))
        elif kind == "sent":
            flight = ledger.sent(rid, msg["start_s"])
            if flight is not None and self.status is not None:
                self.sent_since_report.extend(flows_json(flight))
        elif kind == "send_failed":
            if rid in ledger.flights:
                # A decode killed mid-transfer resets the connection before its exit code
                # is known: give it the control connection's grace, then name the death.
                task = asyncio.get_running_loop().create_task(
                    self._transfer_failed(str(rid), ledger.flights[str(rid)].decode, str(msg.get("reason", ""))))
                self.background.add(task)
                task.add_done_callback(self.background.discard)
            else:
                ledger.late_reports += 1
        elif kind == "admitted":
            ledger.admitted(rid)
        elif kind == "done":
            ledger.done(Done(str(rid), msg["transfer_end_s"], msg["admit_s"], msg["first_token_s"],
                             msg["completion_s"], msg.get("tbt_mean_ms"), msg.get("tbt_p99_ms")))
        elif kind == "rejected":
            ledger.rejected(rid, host, str(msg.get("reason", "")))
        else:
            raise ProtocolError(f"{host} sent an unknown report {kind!r}")

    async def _transfer_failed(self, rid: str, decode_host: str, reason: str) -> None:
        """A failed transfer whose decode worker died is that worker's loss (every
        request it held fails naming it); any other failure is the transfer's."""
        await asyncio.sleep(WORKER_EXIT_GRACE_S)
        proc = self.procs.get(decode_host)
        if proc is not None and proc.poll() is not None and self.alive(decode_host):
            self.worker_lost(decode_host, "failed transfer")
        if rid in self.ledger.flights:
            self.ledger.fail(rid, f"transfer failed: {reason}")

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
        what = f"{self.role_of(host)} worker {host} {how}"
        affected = len(self.ledger.prefill_flights[host]) if host in self.ledger.prefills \
            else len(self.ledger.decodes[host].flights)
        print(f"netkv replay: worker {host} {how}; failing {affected} request(s)", file=sys.stderr)
        failed = self.ledger.instance_lost(host, what)
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

    def _argv(self, host: str, role: str) -> list[str]:
        control = self.launcher_hook("control_path")
        sock = str(self.sock_path) if control is None else str(control(host, str(self.sock_path)))
        argv = [sys.executable, "-m", f"workers.{role}", "--host", host, "--control", sock,
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
                self.ledger.instance_back(host)  # a restarted worker starts empty, and is chosen again
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

    # -- progress for the controller's fabric view ----------------------------
    def status_report(self, total: int, finished: bool = False) -> dict[str, Any]:
        """Requests with a record so far, and the KV transfers in flight at any moment
        since the previous report: those under way now (prefilled, not yet sent) and
        those that ended in between (most take milliseconds, reports come every 0.5 s)."""
        flying = [t for f in self.ledger.flights.values() if f.prefilled and not f.sent for t in flows_json(f)]
        flying += self.sent_since_report
        self.sent_since_report = []
        return {"scheduler": self.cfg.scheduler, "requests_done": len(self.ledger.written), "requests_total": total,
                "transfers_in_flight": [] if finished else flying, "finished": finished}

    def _post_status(self, report: dict[str, Any]) -> None:
        assert self.status is not None
        try:
            self.status.request("", report, timeout_s=1.0)
        except ControllerUnavailable as exc:
            # the view is a convenience: the replay goes on, and says so once
            self.status_failures += 1
            if self.status_failures == 1:
                print(f"replay: could not report progress: {exc}", file=sys.stderr)

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
        if not self.ledger.flights:
            self.all_done.set()
        last_arrival_s = self.t0 + (requests[-1].arrival_ms / 1000.0 if requests else 0.0)
        wait_s = last_arrival_s + self.cfg.drain_timeout_s - time.time()
        try:
            await asyncio.wait_for(self.all_done.wait(), timeout=max(0.0, wait_s))
        except asyncio.TimeoutError:
            self.ledger.fail_unfinished(f"not finished within drain_timeout_s={self.cfg.drain_timeout_s:g} "
                                        f"after the last arrival")

    async def main(self, requests: list[Request]) -> None:
        server = await asyncio.start_unix_server(self.on_connection, path=str(self.sock_path), limit=MAX_LINE_BYTES)
        reporter: asyncio.Task[None] | None = None
        try:
            await self.start_workers()
            self.ledger.t0 = time.time()
            self.loop = asyncio.get_running_loop()
            watchdog = asyncio.create_task(self.watchdog())
            if self.status is not None:
                reporter = asyncio.create_task(self.report_status(len(requests)))
            if self.on_start is not None:
                self.on_start(self)
            await self.replay_requests(requests)
            watchdog.cancel()
        finally:
            self.dispatched_all = True
            if self.status is not None:
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
        prepare = self.launcher_hook("prepare")
        if prepare is not None:
            prepare()  # across servers: the clocks measured, or the replay refused before any record
        self.writer = RecordWriter(records_path)
        if self.decision_priority.refusal:
            print(f"netkv: note: {self.decision_priority.refusal}", file=sys.stderr)
        self.ledger.gc_clock.start()
        try:
            asyncio.run(self.main(requests))
        except BaseException as exc:
            # Ctrl-C, SIGTERM, or a crash of the frontend itself: every request
            # of the window still gets its one record before the error goes on.
            self.ledger.account_for_the_rest(requests, f"run interrupted ({type(exc).__name__}: {exc})")
            raise
        finally:
            self.ledger.gc_clock.stop()
            self.ledger.close()  # a scheduler's own processes (sglang-router:<policy>) end with the replay
            self.writer.close()
            if self.progress is not None:
                self.progress.close()
            if self.sock_path.exists():
                self.sock_path.unlink()
            if sock_dir is not None:
                sock_dir.rmdir()
            finish = self.launcher_hook("finish")
            if finish is not None:
                self.launcher_info = dict(finish())
        # One record per replayed request, checked from the file.
        problems = validate_file(records_path, [r.request_id for r in requests])
        # a timeline across servers that was not kept to its bound makes the records' times doubtful
        problems += [f"clock: {p}" for p in (self.launcher_info.get("clocks") or {}).get("problems", [])]
        run_info = {
            "run_start_epoch_s": self.t0,
            "placement": self.placement.as_dict(),
            "tier_pairs": tier_mix(self.topo, self.placement),
            "perf": self.perf.describe(),
            "workers": {h: {"pid": p.pid, "returncode": p.returncode,
                            "data_addr": list(self.addrs[h]) if h in self.addrs else None}
                        for h, p in self.procs.items()},
        }
        run_info.update(self.launcher_info)
        if self.placement.tp > 1:
            run_info["rank_data_addrs"] = {h: [list(a) for a in addrs] for h, addrs in self.rank_addrs.items()}
        (run_dir / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
        summary = summarize(records_path, self.cfg.ttft_slo_ms, SloConfig.from_dict(self.cfg.slo))
        summary.update(
            run_dir=str(run_dir), run_start_epoch_s=self.t0, scheduler=self.cfg.scheduler,
            trace_lines_skipped=len(load.skipped), late_reports=self.ledger.late_reports,
            max_dispatch_lag_ms=self.ledger.max_dispatch_lag_ms, problems=problems,
            requests_over_model_context=self.ledger.over_context, model_context=self.cfg.model_context,
            decision_realtime=self.decision_priority.applied,
        )
        if self.status is not None:
            summary["status_report_failures"] = self.status_failures
        clocks = self.launcher_info.get("clocks")
        if clocks is not None:  # across servers: each server's offset, and what went wrong with the clocks
            summary["clocks"] = {"bound_s": clocks["bound_s"], "problems": clocks["problems"],
                                 "servers": {name: {k: v for k, v in info.items() if k != "series"}
                                             for name, info in clocks["servers"].items()}}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def on_head_clock(msg: dict[str, Any], host: str, to_head_s: Callable[[str, float], float]) -> dict[str, Any]:
    """A worker report with every time stamp (a number under a key ending in
    ``_s``, workers.protocol) put on the head's clock."""
    return {k: to_head_s(host, float(v)) if k.endswith("_s") and isinstance(v, (int, float))
            and not isinstance(v, bool) else v for k, v in msg.items()}


def _write_skipped(path: Path, skipped: list[TraceIssue]) -> None:
    if skipped:
        path.write_text("".join(f"{issue}\n" for issue in skipped))
