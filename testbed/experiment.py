"""``netkv run``: replay a trace on the emulated fabric, once per scheduler,
under scripted congestion, and compare.

One run directory holds everything needed to read and to repeat it::

    runs/<time>-<scenario>/
      experiment.json      the full configuration (rerun: netkv run --config this)
      scenario.json        the congestion script as it was used
      <scheduler>/         one replay: config.json, records.jsonl, summary.json,
                           envelope.json, worker and iperf3 logs
      comparison.json      metrics per scheduler, read back from the records
      *.png                plots made from comparison.json and the records

The fabric is brought up once and kept for every scheduler; workers and the
background flows are started afresh for each replay so that every scheduler
meets the same congestion from the same start.  During each replay the
switch processes' CPU and the machine's are sampled: a replay whose busiest
switch process was busier than ``ENVELOPE_CPU_PCT`` of a core, or whose
machine was busier than ``ENVELOPE_MACHINE_PCT``, in 5% of its seconds (the
95th percentile) left the emulator's envelope, and its figures say so and
name the resource (``envelope.json``, the
comparison and the report), beside the fidelity that matters in the end: the
measured over ideal time of transfers on idle paths.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from netkv.records import percentile
from netkv.slo import FLAT_TTFT_SLO_MS

from . import scenario as scenario_mod
from .config import ConfigError, TestbedConfig
from .system import cpu_ticks

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SCHEDULERS = ("round_robin", "tuned_cache_load", "netkv")
DEFAULT_SCENARIO = "core-hotspot"
# The envelope, on the 95th percentile of one-second samples.  Calibrated by
# fidelity, not by saturation: on the per-switch emulator, replays whose machine
# p95 stayed at or below 79% kept idle-path transfers within 1.08-1.16x of
# ideal at p90, and replays at 82-90% (scenario hotspots) saw same-server
# transfers, which cross no loaded link, take 1.17-1.88x: CPU contention slows
# packets well before a core is saturated (docs/design.md, "Envelope").
ENVELOPE_CPU_PCT = 80.0  # the busiest switch process, % of one core
ENVELOPE_MACHINE_PCT = 80.0  # the whole machine, % of every core
# Time must keep up too.  Every time stamp of a record is wall-clock time: a
# request dispatched this long after its trace arrival, or a hole this long in
# the meter's once-a-second samples, means the replay's process stood still,
# and every TTFT spanning it carries the stall; the wall clock jumping past the
# monotonic one between two samples means the whole virtual machine was paused
# (the hypervisor snapshotting it: its monotonic clock stood still, its wall
# clock was stepped on afterwards).  Across 147 replays of 2026-12-03 the
# largest dispatch lag was 190 ms (machine p95 99.5% busy) and the largest
# hole 1.93 s, but for one replay (11.7 s, 10.8 s late); a later one had a
# 12.4 s hole during a "virtual machine fork" in the kernel's log
# (docs/design.md, "Envelope").
ENVELOPE_DISPATCH_LAG_MS = 500.0
ENVELOPE_SAMPLE_GAP_S = 3.0
ENVELOPE_CLOCK_JUMP_S = 0.5
TELEMETRY_SERIES = "telemetry.jsonl"  # per replay: the controller's link table at every poll


class ExperimentError(RuntimeError):
    """The experiment cannot run as configured; one clear line."""


@dataclass
class ExperimentConfig:
    schedulers: list[str] = field(default_factory=lambda: list(DEFAULT_SCHEDULERS), metadata={
        "help": "decode schedulers to compare, each replayed once on the same fabric"})
    scenario: str = field(default=DEFAULT_SCENARIO, metadata={
        "help": "congestion script: a name in scenarios/ or a path to a JSON file"})
    testbed: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "TestbedConfig fields (topology, scale, ...)"})
    replay: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "workers.run.ReplayConfig fields (trace_path, start_s, duration_s, rate_multiplier, ...)"})
    window_starts_s: list[float] = field(default_factory=list, metadata={
        "help": "several disjoint trace windows, each replayed by every scheduler on the same fabric "
                "(a campaign: one sub-run per window, figures with 95% intervals across windows); "
                "empty: the one window replay.start_s"})
    out_dir: str = field(default="", metadata={"help": "run directory (default runs/<time>-<scenario>)"})
    recorded: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "what produced the run (versions, git commit), written by the run; ignored when repeated"})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "ExperimentConfig":
        if not isinstance(data, dict):
            raise ExperimentError("experiment configuration must be a JSON object")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(data) - known, key=str)
        if bad:
            raise ExperimentError(f"unknown experiment setting {bad[0]!r}; known: {', '.join(sorted(known))}")
        for name, kind, label in (("scenario", str, "a string"), ("out_dir", str, "a string"),
                                  ("testbed", dict, "a JSON object"), ("replay", dict, "a JSON object"),
                                  ("recorded", dict, "a JSON object")):
            if name in data and not isinstance(data[name], kind):
                raise ExperimentError(f"experiment setting {name!r} must be {label}, got {data[name]!r}")
        schedulers = data.get("schedulers", [])
        if not isinstance(schedulers, list) or not all(isinstance(s, str) for s in schedulers):
            raise ExperimentError(f"experiment setting 'schedulers' must be a list of names, got {schedulers!r}")
        return cls(**data)


# -- measuring the emulator itself ------------------------------------------------------
class EmulatorMeter:
    """Samples, once a second while a replay runs, the CPU of every switch
    process (``{name: pid}``, testbed.net.Testbed.switch_processes) and of the
    machine as a whole (/proc/stat).

    On the userspace datapath the switch processes forward every emulated
    packet, and the hosts' TCP stacks, the workers and the traffic generators
    need CPU too: a replay ran inside the emulator's envelope when neither the
    busiest switch process nor the machine was busy in 95% of its seconds
    (:func:`envelope_verdict`).  On the kernel datapath forwarding happens in
    the kernel: the machine figure is the one that matters there."""

    def __init__(self, switch_pids: dict[str, int], interval_s: float = 1.0, *,
                 pids_source: Callable[[], dict[str, int]] | None = None) -> None:
        # pids_source: the switch processes now (a switch_restart event replaces
        # one; while it is down it is absent, and that is not a death)
        self.pids_source = pids_source
        self.pids = dict(switch_pids)
        self.interval_s = interval_s
        # one row per second: (epoch s, {switch: % of a core}, machine busy %,
        # monotonic s).  Where the wall clock advanced far more than the
        # monotonic one between two samples, the whole virtual machine was
        # paused (the guest's monotonic clock stands still meanwhile; its wall
        # clock is stepped forward afterwards, and every wall-clock time stamp
        # with it)
        self.samples: list[tuple[float, dict[str, float], float | None, float]] = []
        self.died: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.hz = os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="emulator-meter", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        last = {name: cpu_ticks(pid) for name, pid in self.pids.items()}
        last_machine, last_t = machine_ticks(), time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            dt = now - last_t
            row: dict[str, float] = {}
            current = self.pids_source() if self.pids_source is not None else self.pids
            for name, pid in list(self.pids.items()):
                if current.get(name) != pid:  # restarting (absent) or restarted: a new baseline, not a death
                    now_pid = current.get(name)
                    last[name] = None if now_pid is None else cpu_ticks(now_pid)
                    if now_pid is not None:
                        self.pids[name] = now_pid
                    continue
                ticks = cpu_ticks(pid)
                before = last.get(name)
                if ticks is None or before is None:
                    if name not in self.died:
                        self.died.append(name)
                    last[name] = None
                    continue
                row[name] = 100.0 * (ticks - before) / self.hz / dt
                last[name] = ticks
            machine = machine_ticks()
            busy = machine[0] - last_machine[0]
            all_ticks = machine[1] - last_machine[1]
            self.samples.append((time.time(), row, 100.0 * busy / all_ticks if all_ticks > 0 else None,
                                 time.monotonic()))
            last_machine, last_t = machine, now

    def stop(self, window_epoch_s: tuple[float, float] | None = None, *,
             dispatch_lag_ms: float | None = None) -> dict[str, Any]:
        """Figures over the samples inside ``window_epoch_s`` (the replay's
        requests: from the replay clock's start, after the workers are up, to
        its end), or over all; the whole series is kept beside them.
        ``dispatch_lag_ms``: the replay's largest dispatch lag, judged too."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        t_first = self.samples[0][0] if self.samples else time.time()
        judged = [x for x in self.samples if window_epoch_s is None
                  # a sample covers the second before its time stamp
                  or window_epoch_s[0] + self.interval_s <= x[0] <= window_epoch_s[1]]
        per_switch: dict[str, list[float]] = {}
        for _, row, _, _ in judged:
            for name, pct in row.items():
                per_switch.setdefault(name, []).append(pct)
        sum_pct = [sum(row.values()) for _, row, _, _ in judged]
        machine = [m for _, _, m, _ in judged if m is not None]
        p95 = {name: float(_p95(v) or 0.0) for name, v in per_switch.items() if v}
        busiest = max(p95, key=lambda n: p95[n]) if p95 else None
        out: dict[str, Any] = {
            "switch_processes": len(self.pids),
            "samples": len(judged),
            "samples_outside_window": len(self.samples) - len(judged),
            # the busiest single switch process: the one that saturates first
            "busiest_switch": busiest,
            "switch_cpu_pct_mean": _mean(per_switch[busiest]) if busiest else None,
            "switch_cpu_pct_p95": _round1(p95[busiest]) if busiest else None,
            "switch_cpu_pct_max": _round1(max(per_switch[busiest])) if busiest else None,
            # every switch process together, % of one core
            "switch_cpu_sum_pct_mean": _mean(sum_pct),
            "switch_cpu_sum_pct_p95": _round1(_p95(sum_pct)),
            # the whole machine (every core), % of its capacity
            "machine_busy_pct_mean": _mean(machine),
            "machine_busy_pct_p95": _round1(_p95(machine)),
            "switch_processes_died": list(self.died),
            "envelope_cpu_pct": ENVELOPE_CPU_PCT,
            "envelope_machine_pct": ENVELOPE_MACHINE_PCT,
            # every sample: [s since the first, switch processes' sum, busiest one, machine busy], judged or not
            "series": [[round(t - t_first, 2), round(sum(row.values()), 1),
                        round(max(row.values(), default=0.0), 1), None if m is None else round(m, 1)]
                       for t, row, m, _ in self.samples],
        }
        pairs = list(zip(judged, judged[1:]))
        out["sample_gap_s_max"] = _round1(max((b[0] - a[0] for a, b in pairs), default=None))
        out["wall_clock_jump_s_max"] = _round1(max((b[0] - a[0] - (b[3] - a[3]) for a, b in pairs), default=None))
        if dispatch_lag_ms is not None:
            out["dispatch_lag_ms_max"] = round(float(dispatch_lag_ms), 1)
        out.update(envelope_verdict(out["switch_cpu_pct_p95"], out["machine_busy_pct_p95"], self.died,
                                    sample_gap_s=out["sample_gap_s_max"], clock_jump_s=out["wall_clock_jump_s_max"],
                                    dispatch_lag_ms=dispatch_lag_ms))
        return out


def metered_replay(tb: Any, cfg: Any, launcher: Any, run_dir: Path, *,
                   oracle: Any = None, on_start: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """One replay (workers.run.replay) with the emulator's CPU measured
    around it; the envelope is judged over the replay clock's window (the
    workers' start-up is not part of it).  ``on_start``: called with the
    frontend once the replay clock starts (the fault runner).  Returns
    (summary, envelope)."""
    from workers.run import replay

    meter = EmulatorMeter(tb.switch_processes(), pids_source=tb.switch_processes)
    meter.start()
    summary: dict[str, Any] = {}
    try:
        summary = replay(cfg, launcher, run_dir, oracle=oracle, topology=tb.topo, status_url=tb.rest_url + "/replay",
                         on_start=on_start)
    finally:
        start = summary.get("run_start_epoch_s")
        envelope = meter.stop((float(start), time.time()) if start else None,
                              dispatch_lag_ms=summary.get("max_dispatch_lag_ms"))
    return summary, envelope


def envelope_verdict(switch_p95: float | None, machine_p95: float | None, died: list[str], *,
                     sample_gap_s: float | None = None, clock_jump_s: float | None = None,
                     dispatch_lag_ms: float | None = None) -> dict[str, Any]:
    """``within_envelope`` (None without samples) and ``limiting_resource``:
    which resource ran out (a switch process died, the busiest switch process,
    the machine's CPU, time itself: the virtual machine paused, seen as the
    wall clock jumping past the monotonic one, or the replay's own process
    stalled, seen as a hole in the meter's samples or a request dispatched
    late), or None."""
    if died:
        return {"within_envelope": False, "limiting_resource": f"switch process died: {', '.join(died)}"}
    stalls = []
    if clock_jump_s is not None and clock_jump_s >= ENVELOPE_CLOCK_JUMP_S:
        stalls.append(f"virtual machine paused (wall clock jumped {clock_jump_s:.1f} s past the monotonic clock)")
    elif sample_gap_s is not None and sample_gap_s >= ENVELOPE_SAMPLE_GAP_S:
        stalls.append(f"replay process stalled (no meter sample for {sample_gap_s:.1f} s)")
    if dispatch_lag_ms is not None and dispatch_lag_ms >= ENVELOPE_DISPATCH_LAG_MS:
        stalls.append(f"replay process stalled (a request dispatched {dispatch_lag_ms:.0f} ms after its arrival)")
    if switch_p95 is None and machine_p95 is None:
        return {"within_envelope": False if stalls else None, "limiting_resource": "; ".join(stalls) or None}
    limits = stalls
    if switch_p95 is not None and switch_p95 >= ENVELOPE_CPU_PCT:
        limits.append(f"switch process CPU (p95 {switch_p95:.0f}% of a core)")
    if machine_p95 is not None and machine_p95 >= ENVELOPE_MACHINE_PCT:
        limits.append(f"machine CPU (p95 {machine_p95:.0f}% busy)")
    return {"within_envelope": not limits, "limiting_resource": "; ".join(limits) or None}


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return 0, 0
    values = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _p95(values: list[float]) -> float | None:
    s = sorted(values)
    return s[int(0.95 * (len(s) - 1))] if s else None


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 1) if values else None


def _round1(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# -- the launcher and the telemetry source the replay uses ------------------------------------
class MininetLauncher:
    """workers.launch.Launcher over a running Testbed: each worker runs inside
    its GPU host's namespaces, listens on the host's emulated address, and its
    pid is recorded for the testbed's sweep."""

    def __init__(self, testbed: Any) -> None:
        self.tb = testbed

    def data_addr(self, host: str) -> tuple[str, int]:
        return self.tb.data_addr(host)  # type: ignore[no-any-return]

    def netns_path(self, host: str) -> str | None:
        """The GPU host's network namespace, where a tensor-parallel worker on
        another rank host of its instance opens this rank's sockets."""
        return f"/proc/{self.tb.host_pid(host)}/ns/net"

    def popen(self, host: str, argv: list[str], log_path: Path) -> subprocess.Popen:  # type: ignore[type-arg]
        from workers.launch import worker_env

        with open(log_path, "ab") as log:
            return self.tb.popen(host, argv, kind="worker", marker="workers.", stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
                                 env=worker_env())  # type: ignore[no-any-return]


class RestTelemetryPoller:
    """A netkv.telemetry.TelemetrySource fed by the controller's ``/links``.

    A thread fetches the table once per polling interval and the source
    returns the latest copy, so a scheduler's decision never waits for HTTP.
    Each sample keeps the time the switch was measured, so the oracle sees its
    true age (and falls back to the static estimate when it is too old).
    ``on_update``, if set, is called with each new snapshot before the source
    hands it out (the oracle's ``prepare``): in the polling thread until
    :meth:`deliver_in` names the replay's event loop, then in that loop's
    thread, between two of its callbacks.  So the refresh runs in the thread
    that decides, never inside a decision and never holding the interpreter
    lock while a decision waits for it (in the polling thread it did: a
    decision of 0.2 ms of CPU could take 5 ms, the interpreter's switch
    interval).  Its duration is kept (``telemetry_refresh_ms_*``)."""

    def __init__(self, testbed: Any, interval_s: float, series_path: Path | None = None) -> None:
        from netkv.telemetry import TelemetrySnapshot

        self.tb = testbed
        self.interval_s = interval_s
        # Every fetched table is also appended here, one line per poll
        # (``{"t_s", "links": [[src, dst, utilization, load_gbps, drops], ...]}``),
        # so that a report can draw link utilisation over time.
        self._series = series_path.open("a") if series_path is not None else None
        self.latest = TelemetrySnapshot()
        self.on_update: Callable[[Any], None] | None = None
        self.fetches = 0
        self.refresh_ms: list[float] = []  # on_update's duration, per snapshot handed over in the loop
        self._loop: Any = None  # see deliver_in
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="telemetry", daemon=True)

    def __call__(self) -> Any:
        return self.latest

    def start(self) -> "RestTelemetryPoller":
        self._fetch()
        self._thread.start()
        return self

    def _fetch(self) -> None:
        from netkv.telemetry import TelemetrySnapshot

        body = self.tb.rest_get("/links", timeout_s=max(1.0, self.interval_s))
        if body is None:
            self.failures += 1
            return
        try:
            snap = TelemetrySnapshot.from_json(body)
        except ValueError:
            self.failures += 1
            return
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._publish, snap, True)
            except RuntimeError:  # the loop has closed: the replay is over
                self._loop = None
                self._publish(snap)
        else:
            self._publish(snap)
        self.fetches += 1
        if self._series is not None:
            rows = [[x.src, x.dst, round(x.utilization, 4), round(x.load_gbps, 3), x.drops]
                    for x in snap.samples.values()]
            self._series.write(json.dumps({"t_s": round(time.time(), 3), "links": rows}) + "\n")
            self._series.flush()

    def _publish(self, snap: Any, in_loop: bool = False) -> None:
        if self.on_update is not None:
            began = time.perf_counter()
            self.on_update(snap)
            if in_loop:  # the ones that can hold up a decision
                self.refresh_ms.append((time.perf_counter() - began) * 1e3)
        self.latest = snap

    def deliver_in(self, loop: Any) -> None:
        """Hand new snapshots over in ``loop``'s thread from now on (an asyncio
        loop: the replay's frontend, which makes every decision there)."""
        self._loop = loop

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._fetch()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=5)
        if self._series is not None:
            self._series.close()
        def pct(q: float) -> float | None:
            value = percentile(self.refresh_ms, q)
            return None if value is None else round(value, 3)

        return {"telemetry_fetches": self.fetches, "telemetry_fetch_failures": self.failures,
                "telemetry_refreshes": len(self.refresh_ms), "telemetry_refresh_ms_p50": pct(50),
                "telemetry_refresh_ms_p99": pct(99), "telemetry_refresh_ms_max": pct(100)}


# -- running -------------------------------------------------------------------------------
def provenance() -> dict[str, Any]:
    """Versions of what a run stands on, and the project's git commit."""
    import platform
    import sys
    from importlib import metadata

    def first_line(argv: list[str]) -> str | None:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=REPO_ROOT)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None

    def package(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    try:
        from mininet.net import VERSION as mininet_version
    except ImportError:
        mininet_version = None
    commit = first_line(["git", "rev-parse", "HEAD"])
    dirty = first_line(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "git_commit": commit,
        "git_dirty": None if commit is None else bool(dirty),
        "open_vswitch": first_line(["ovs-vswitchd", "--version"]),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "os_ken": package("os-ken"),
        "mininet": mininet_version,
        "iperf3": first_line(["iperf3", "--version"]),
        "recorded_epoch_s": round(time.time(), 3),
    }


def _default_out_dir(scenario_name: str) -> Path:
    return REPO_ROOT / "runs" / (time.strftime("%Y%m%d-%H%M%S") + f"-{scenario_name}")


def _check_windows(exp: ExperimentConfig, base: Any) -> list[float]:
    """The campaign's window starts, checked: finite, >= 0, a window length
    set, pairwise disjoint in trace time, and none overlapping the window the
    tuned baseline was tuned on (when the trace is the one it was tuned on)."""
    from netkv.schedulers.baselines import tuning_window_s

    starts = exp.window_starts_s
    if not isinstance(starts, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               and math.isfinite(v) and v >= 0 for v in starts):
        raise ExperimentError(f"window_starts_s must be a list of finite numbers >= 0 (seconds), got {starts!r}")
    if not starts:
        return []
    if base.duration_s is None:
        raise ExperimentError("window_starts_s needs a window length: set replay duration_s")
    length = float(base.duration_s)
    ordered = sorted(float(v) for v in starts)
    for a, b in zip(ordered, ordered[1:]):
        if b < a + length:
            raise ExperimentError(f"windows starting at {a:g} s and {b:g} s overlap (each is {length:g} s long)")
    tuned = tuning_window_s(Path(base.trace_path))
    if tuned is not None:
        for a in ordered:
            if a < tuned[1] and tuned[0] < a + length:
                raise ExperimentError(f"the window starting at {a:g} s overlaps the tuning window "
                                      f"[{tuned[0]:g}, {tuned[1]:g}) s of tuned_cache_load; choose another")
    return [float(v) for v in starts]


def prepare(exp: ExperimentConfig) -> tuple[TestbedConfig, Any, scenario_mod.Scenario, Path]:
    """Check everything that can be checked before a network is built."""
    from dataclasses import replace

    from netkv import perfmodel
    from netkv.placement import make_placement
    from netkv.schedulers import SCHEDULERS
    from netkv.traces import TraceError
    from workers.run import ReplayConfig, ReplayConfigError

    tb_cfg = TestbedConfig.from_json(exp.testbed)
    topo = tb_cfg.validate()
    if not exp.schedulers:
        raise ExperimentError("give at least one scheduler")
    for name in exp.schedulers:
        if name not in SCHEDULERS:
            raise ExperimentError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    if len(set(exp.schedulers)) != len(exp.schedulers):
        raise ExperimentError("a scheduler is listed twice")
    managed = {"topology", "topology_params", "scale_factor", "scheduler"}
    overlap = sorted(set(exp.replay) & managed)
    if overlap:
        raise ExperimentError(f"replay setting {overlap[0]!r} is set by the experiment itself "
                              f"(use the testbed options or --schedulers)")
    try:
        base = ReplayConfig.from_dict({**exp.replay, "topology": tb_cfg.topology,
                                       "topology_params": dict(tb_cfg.params),
                                       "scale_factor": tb_cfg.scale, "scheduler": exp.schedulers[0]})
    except ReplayConfigError as exc:
        raise ExperimentError(str(exc)) from None
    # The instances must fit the fabric (a TP model needs servers that hold whole instances).
    make_placement(topo, base.placement, tp=perfmodel.build(base.model, base.gpu, base.perf_overrides).tp)
    if not Path(base.trace_path).is_file():
        raise ExperimentError(f"trace not found: {base.trace_path}")
    try:  # a malformed line or an empty window is found here, before any network exists
        window = base.window()
    except TraceError as exc:
        raise ExperimentError(str(exc)) from None
    if not window.requests:
        end = "end" if base.duration_s is None else f"{base.start_s + base.duration_s:g}"
        raise ExperimentError(f"the trace window [{base.start_s:g}, {end}) s of {base.trace_path} "
                              f"holds no request")
    for start in _check_windows(exp, base):
        try:
            if not replace(base, start_s=start).window().requests:
                raise ExperimentError(f"the trace window [{start:g}, {start + float(base.duration_s or 0):g}) s "
                                      f"of {base.trace_path} holds no request")
        except TraceError as exc:
            raise ExperimentError(str(exc)) from None
    scen = scenario_mod.load(exp.scenario, topo)
    if scen.events:
        from netkv.placement import PlacementError, make_placement

        from .faults import FaultError, check_workers

        try:
            check_workers(scen.events, make_placement(topo, base.placement).hosts, f"scenario {scen.name}")
        except (FaultError, PlacementError) as exc:
            raise ExperimentError(str(exc)) from None
    out = Path(exp.out_dir) if exp.out_dir else _default_out_dir(scen.name)
    if out.exists() and any(out.iterdir()):
        raise ExperimentError(f"run directory {out} exists and is not empty; choose another --out")
    return tb_cfg, base, scen, out


def window_dir_name(index: int, start_s: float) -> str:
    """Sub-run directory of one window of a campaign."""
    return f"w{index}-{start_s:g}s"


def run_experiment(exp: ExperimentConfig, *, quiet: bool = False) -> dict[str, Any]:
    """Bring the fabric up once, replay every window with every scheduler,
    bring it down, and write the comparison (one window) or the campaign
    (several windows: one ordinary run directory per window, each repeatable
    alone, and campaign.json across them)."""
    from dataclasses import replace

    from .net import Testbed
    from .report import write_report

    tb_cfg, base, scen, out = prepare(exp)
    out.mkdir(parents=True, exist_ok=True)
    exp.out_dir = str(out)
    exp.recorded = provenance()
    (out / "experiment.json").write_text(json.dumps(exp.to_json(), indent=2) + "\n")
    (out / "scenario.json").write_text(json.dumps(scen.to_json(), indent=2) + "\n")

    def say(text: str) -> None:
        if not quiet:
            print(f"netkv: {text}", flush=True)

    windows = [(out / window_dir_name(i, start), replace(exp, window_starts_s=[], out_dir=str(out / window_dir_name(i, start)),
                                                       replay={**exp.replay, "start_s": start}),
                replace(base, start_s=start))
               for i, start in enumerate(exp.window_starts_s)] or [(out, exp, base)]
    tb = Testbed(tb_cfg)
    load_bg = scen.load_mbps_hops(tb.topo, tb_cfg.scale)
    say(f"run directory {out}")
    say(f"scenario {scen.name}: {len(scen.flows)} background flows, {load_bg:.0f} Mbit/s x hops "
        f"on the emulator when all run")
    try:
        report = tb.up()
        say(f"fabric up in {report.up_s:.1f} s ({report.datapath} datapath, "
            f"{report.pings_ok}/{report.pings_total} pairs reachable)")
        say(f"live fabric view {tb.rest_url}/ (the replay shows there while it runs)")
        bringup = json.dumps({"config": tb_cfg.to_json(), "bringup": report.as_dict()}, indent=2, default=str) + "\n"
        for k, (w_dir, w_exp, w_base) in enumerate(windows):
            if w_dir != out:
                say(f"window {k + 1}/{len(windows)}: trace [{w_base.start_s:g}, "
                    f"{w_base.start_s + float(w_base.duration_s or 0):g}) s -> {w_dir.name}/")
                w_dir.mkdir()
                (w_dir / "experiment.json").write_text(json.dumps(w_exp.to_json(), indent=2) + "\n")
                (w_dir / "scenario.json").write_text(json.dumps(scen.to_json(), indent=2) + "\n")
            (w_dir / "testbed.json").write_text(bringup)
            _replay_schedulers(tb, report.datapath, w_exp.schedulers, w_base, scen, w_dir, say)
    finally:
        tb.down()
    if len(windows) == 1 and windows[0][0] == out:
        comparison = write_report(out)
        say(f"comparison: {out / 'comparison.json'}; plots: {', '.join(p.name for p in sorted(out.glob('*.png')))}")
        return comparison
    from .campaign import write_campaign

    campaign = write_campaign(out)
    say(f"campaign: {out / 'campaign.json'}; plots: {', '.join(p.name for p in sorted(out.glob('*.png')))}")
    return campaign


def _replay_schedulers(tb: Any, datapath: str, schedulers: list[str], base: Any, scen: scenario_mod.Scenario,
                       out: Path, say: Any) -> None:
    """One window: every scheduler in turn on the running fabric, each with
    the scenario's background flows started afresh."""
    from dataclasses import replace

    for name in schedulers:
        cfg = replace(base, scheduler=name)
        run_dir = out / name
        run_dir.mkdir()
        say(f"replaying with {name} ...")
        summary, envelope = replay_under_scenario(tb, cfg, scen, run_dir, datapath=datapath)
        flag = "" if envelope["within_envelope"] is not False else "  [OUTSIDE the emulator's envelope]"
        say(f"{name}: {summary['ok']}/{summary['requests']} ok, mean TTFT "
            f"{_fmt(summary.get('ttft_mean_ms'))} ms, p99 {_fmt(summary.get('ttft_p99_ms'))} ms; "
            f"busiest switch process p95 {_fmt(envelope['switch_cpu_pct_p95'])}% of a core, machine "
            f"p95 {_fmt(envelope['machine_busy_pct_p95'])}% busy{flag}")
        if envelope.get("limiting_resource"):
            say(f"{name}: the emulator ran short of: {envelope['limiting_resource']}")
        if scen.events:
            bad = [r for r in envelope.get("fault_events", []) if not str(r.get("outcome", "")).startswith("ok")]
            say(f"{name}: {len(scen.events)} fault events ({run_dir / 'events.jsonl'})"
                + (f"; {len(bad)} did not go as planned: {bad[0].get('outcome')}" if bad else ""))


def replay_under_scenario(tb: Any, cfg: Any, scen: scenario_mod.Scenario, run_dir: Path, *,
                          datapath: str = "", on_start: Callable[[Any], None] | None = None
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One replay on the running fabric: the oracle (telemetry from the
    controller, or static), the scenario's background flows and its fault
    events, the emulator's CPU measured around it.  ``on_start``: also called
    with the frontend when the replay clock starts.  Writes envelope.json (with
    the telemetry poller's counts and the fault runner's records) and returns
    (summary, envelope)."""
    from netkv.oracle import StaleOracle, StaticOracle, TelemetryOracle

    from .faults import FaultRunner

    poller = None
    if cfg.oracle == "telemetry":
        poller = RestTelemetryPoller(tb, tb.config.poll_interval_s, series_path=run_dir / TELEMETRY_SERIES)
        oracle: Any = (StaleOracle(tb.topo, poller, cfg.telemetry_delay_ms) if cfg.telemetry_delay_ms
                       else TelemetryOracle(tb.topo, poller))
        poller.on_update = oracle.prepare  # hop figures and tables computed in the polling thread
        poller.start()
    else:
        oracle = StaticOracle(tb.topo)
    runner = scenario_mod.ScenarioRunner(tb, scen, run_dir / "background")
    faults = FaultRunner(tb, scen.events, run_dir, oracle=oracle, telemetry=poller) if scen.events else None
    runner.start()
    polled: dict[str, Any] = {}
    fault_records: list[dict[str, Any]] = []
    def started(frontend: Any) -> None:
        if poller is not None and frontend.loop is not None:
            poller.deliver_in(frontend.loop)
        if on_start is not None:
            on_start(frontend)
        if faults is not None:
            faults.attach(frontend)

    try:
        summary, envelope = metered_replay(tb, cfg, MininetLauncher(tb), run_dir, oracle=oracle, on_start=started)
    finally:
        if faults is not None:
            fault_records = faults.stop()
        runner.stop()
        if poller is not None:
            polled = poller.stop()
    envelope.update(polled)
    envelope["background_flows_started"] = runner.started_flows
    envelope["datapath"] = datapath or tb.report.datapath
    if faults is not None:
        envelope["fault_events"] = fault_records
    (run_dir / "envelope.json").write_text(json.dumps(envelope, indent=2) + "\n")
    return summary, envelope


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f}"


# -- command line ------------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="replay a trace once per scheduler under scripted congestion and compare",
        description="Bring the fabric up, then for each scheduler: start the scenario's background "
                    "flows, replay the trace window through 64 worker processes that move real KV "
                    "bytes over TCP, and write one record per request. Ends with a comparison "
                    "(comparison.json and plots) in the run directory, beside the full configuration "
                    "(experiment.json) that `netkv run --config` repeats.",
        epilog="Replay settings (--set KEY=VALUE, value as JSON): see `python -m workers.run --help`.")
    add_run_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("schedulers", help="list the decode schedulers",
                       description="Every registered decode scheduler with its one-line description.")
    p.set_defaults(func=cmd_schedulers)

    p = sub.add_parser("scenarios", help="list the congestion scenarios",
                       description="Scenarios in scenarios/ with their description and flows.")
    p.add_argument("--topology", default="fattree", help="topology to check them against")
    p.set_defaults(func=cmd_scenarios)


def add_run_options(p: Any) -> None:
    """The testbed and experiment options `netkv run` and `netkv sweep` share."""
    from .cli import add_testbed_options

    add_testbed_options(p)
    g = p.add_argument_group("experiment")
    g.add_argument("--experiment", type=Path, metavar="FILE",
                   help="repeat a run: its experiment.json (options given here override it)")
    g.add_argument("--schedulers", help=f"comma-separated (default: {','.join(DEFAULT_SCHEDULERS)}); "
                                        f"`netkv schedulers` lists them")
    g.add_argument("--scenario", help=f"congestion script name or JSON path (default: {DEFAULT_SCENARIO}; "
                                      f"known: {', '.join(scenario_mod.names())})")
    g.add_argument("--trace", help="Mooncake-format JSONL trace (default: traces/mooncake_conversation.jsonl "
                                   "in the repository)")
    g.add_argument("--start-s", type=float, help="window start in the trace, seconds (default 0)")
    g.add_argument("--duration-s", type=float, help="window length, seconds of trace time (default 60)")
    g.add_argument("--rate-multiplier", type=float, help="replay speed-up of arrivals (default 1)")
    g.add_argument("--max-requests", type=int, help="replay at most this many requests of the window")
    g.add_argument("--window-starts-s", metavar="S,S,...",
                   help="a campaign: several disjoint trace windows (comma-separated starts, seconds), each "
                        "replayed by every scheduler; figures get 95%% intervals across windows")
    g.add_argument("--oracle", choices=("static", "telemetry"),
                   help="network cost oracle the schedulers consult (default: telemetry)")
    g.add_argument("--ttft-slo-ms", type=float, help="TTFT SLO for attainment figures")
    g.add_argument("--set", dest="replay_set", action="append", metavar="KEY=VALUE",
                   help="any other replay setting, value as JSON (repeatable)")
    g.add_argument("--out", help="run directory (default: runs/<time>-<scenario>)")
    g.add_argument("--quiet", action="store_true", help="no progress lines")


DEFAULT_REPLAY = {"oracle": "telemetry", "duration_s": 60.0, "rate_multiplier": 1.0, "ttft_slo_ms": FLAT_TTFT_SLO_MS}


def experiment_from_args(args: argparse.Namespace) -> ExperimentConfig:
    from .cli import CliError, config_from_args

    if args.experiment:
        try:
            exp = ExperimentConfig.from_json(json.loads(args.experiment.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise CliError(f"cannot read experiment {args.experiment}: {exc}") from None
        exp.out_dir = ""
        exp.recorded = {}
        if args.config is None:
            base_tb = TestbedConfig.from_json(exp.testbed)
            for f in fields(TestbedConfig):
                if getattr(args, f.name, None) is None:
                    setattr(args, f.name, getattr(base_tb, f.name) if f.name != "params" else
                            [f"{k}={v}" for k, v in base_tb.params.items()] or None)
    else:
        exp = ExperimentConfig(replay=dict(DEFAULT_REPLAY))
    exp.testbed = config_from_args(args).to_json()
    if args.schedulers:
        exp.schedulers = [s.strip() for s in args.schedulers.split(",") if s.strip()]
    if args.scenario:
        exp.scenario = args.scenario
    for key, value in (("trace_path", args.trace), ("start_s", args.start_s), ("duration_s", args.duration_s),
                       ("rate_multiplier", args.rate_multiplier), ("max_requests", args.max_requests),
                       ("oracle", args.oracle), ("ttft_slo_ms", args.ttft_slo_ms)):
        if value is not None:
            exp.replay[key] = str(Path(value).resolve()) if key == "trace_path" else value
    for item in args.replay_set or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CliError(f"--set {item!r} is not KEY=VALUE")
        try:
            exp.replay[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            exp.replay[key.strip()] = raw
    if args.window_starts_s:
        try:
            exp.window_starts_s = [float(v) for v in args.window_starts_s.split(",") if v.strip()]
        except ValueError:
            raise CliError(f"--window-starts-s {args.window_starts_s!r} is not a comma-separated list of seconds") \
                from None
    if args.out:
        exp.out_dir = str(Path(args.out).resolve())
    return exp


def cmd_run(args: argparse.Namespace) -> int:
    from .system import require_root

    exp = experiment_from_args(args)
    try:
        prepare(exp)  # every check that needs no network, before root is even asked for
    except (scenario_mod.ScenarioError, ConfigError) as exc:
        raise ExperimentError(str(exc)) from None
    require_root()
    from .cli import install_stop_handlers

    install_stop_handlers()
    result = run_experiment(exp, quiet=args.quiet)
    if args.quiet:
        print(json.dumps(result))
        return 0 if result.get("nothing_lost", True) else 1
    if exp.window_starts_s:
        from .campaign import render_campaign

        print(render_campaign(result))
        return 0 if result["nothing_lost"] else 1
    from .report import render_table

    print(render_table(result))
    bad = [s for s, m in result.get("schedulers", {}).items() if m.get("problems")]
    return 1 if bad else 0


def cmd_schedulers(args: argparse.Namespace) -> int:
    from netkv.schedulers import describe

    for name, text in describe().items():
        print(f"{name:22s} {text}")
    return 0


def cmd_scenarios(args: argparse.Namespace) -> int:
    import topologies

    topo = topologies.build(args.topology)
    for name in scenario_mod.names():
        try:
            scen = scenario_mod.load(name, topo)
        except scenario_mod.ScenarioError as exc:
            print(f"{name:16s} (does not fit {args.topology}: {exc})")
            continue
        events = f", {len(scen.events)} fault events" if scen.events else ""
        print(f"{name:16s} {len(scen.flows)} flows{events}, {scen.load_mbps_hops(topo, TestbedConfig().scale):.0f} "
              f"Mbit/s x hops at the default scale: {scen.description}")
    return 0
