"""Real worker processes on 127.0.0.1 (LocalLauncher), no root.

Replays requests from the real Mooncake trace through prefill and decode
worker processes that push real KV bytes over real TCP, and checks the
records: every request ends exactly once, ok records are complete and
consistent, a killed worker fails exactly the requests that depended on it.
Also: placement and the prefill chooser (pure functions).
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from netkv import perfmodel
from netkv.placement import PlacementError, make_placement, tier_mix
from netkv.records import read_records, validate_file
from netkv.serving.config import ReplayConfig, ReplayConfigError
from netkv.serving.prefill import PrefillChoiceError, PrefillChooser, PrefillInstance, PrefixCache
from netkv.serving.timing import DecisionPriority, GcClock
from tests.helpers.replay import FAST, HOSTS, TRACE, base_config
from topologies import catalog
from workers.launch import LocalLauncher
from workers.run import replay

RSS_LIMIT_KB = 40 * 1024


class SamplingLauncher(LocalLauncher):
    """LocalLauncher that remembers each host's process and samples worker RSS."""

    def __init__(self) -> None:
        super().__init__()
        self.by_host: dict[str, subprocess.Popen] = {}
        self.max_rss_kb = 0
        self.last_start = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def popen(self, host: str, argv: list[str], log_path: Path) -> subprocess.Popen:
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
        proc = super().popen(host, argv, log_path)
        self.by_host[host] = proc
        self.last_start = time.monotonic()
        return proc

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            for proc in list(self.by_host.values()):
                try:
                    status = Path(f"/proc/{proc.pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmRSS:"):
                        self.max_rss_kb = max(self.max_rss_kb, int(line.split()[1]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: keep run directories short.
    path = Path(tempfile.mkdtemp(prefix="nkw-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)




@pytest.fixture(scope="module")
def good_run(short_dir: Path) -> tuple[ReplayConfig, Path, dict[str, Any], SamplingLauncher]:
    cfg = base_config(max_requests=24, rate_multiplier=4.0, scheduler="netkv", ttft_slo_ms=2000.0)
    launcher = SamplingLauncher()
    try:
        summary = replay(cfg, launcher, short_dir / "ok")
    finally:
        launcher.close()
    return cfg, short_dir / "ok", summary, launcher


def test_every_request_ends_ok_exactly_once(good_run: tuple[ReplayConfig, Path, dict[str, Any], SamplingLauncher]) -> None:
    cfg, run_dir, summary, _ = good_run
    recs = read_records(run_dir / "records.jsonl")
    assert [r["request_id"] for r in recs].count("L1") == 1
    assert sorted(r["request_id"] for r in recs) == sorted(f"L{i}" for i in range(1, 25))
    assert [r["status"] for r in recs] == ["ok"] * 24, [r["reason"] for r in recs]
    assert summary["problems"] == [] and summary["ok"] == 24 and summary["failed"] == 0
    assert validate_file(run_dir / "records.jsonl", [f"L{i}" for i in range(1, 25)]) == []
    assert 0 <= summary["ttft_slo_attainment"] <= 1
    if os.geteuid() == 0:  # root may run decisions at SCHED_FIFO, and this replay asked for it (the default)
        assert summary["decision_realtime"] is True


def test_records_are_consistent_with_the_trace_and_model(
    good_run: tuple[ReplayConfig, Path, dict[str, Any], SamplingLauncher],
) -> None:
    cfg, run_dir, _, _ = good_run
    lines = TRACE.read_text().splitlines()[:24]
    pm = perfmodel.build(cfg.model, cfg.gpu, cfg.perf_overrides)
    recs = {r["request_id"]: r for r in read_records(run_dir / "records.jsonl")}
    cpu_ahead: list[str] = []
    for i, line in enumerate(lines, 1):
        src = json.loads(line)
        rec = recs[f"L{i}"]
        assert rec["arrival_ms"] == pytest.approx(src["timestamp"] / cfg.rate_multiplier)
        assert (rec["input_tokens"], rec["output_tokens"]) == (src["input_length"], src["output_length"])
        assert rec["prefill"] in ("g0", "g8", "g16", "g32") and rec["decode"] in ("g1", "g9", "g17", "g33")
        assert rec["kv_bytes"] == rec["tokens_sent"] * pm.kv_bytes_per_token
        assert rec["bytes_sent"] == math.ceil(rec["kv_bytes"] / cfg.scale_factor)
        # the prefill really computed: at least the model's time for its uncached tokens
        uncached = rec["input_tokens"] - rec["prefill_cached_tokens"]
        assert rec["prefill_end_ms"] - rec["prefill_start_ms"] >= pm.prefill_ms(uncached, rec["prefill_cached_tokens"]) - 1.0
        # decoding produced output_tokens - 1 gaps of at least one model step each (the
        # step schedule is kept on its grid, so one late step shortens the next: allow 2 ms)
        if rec["output_tokens"] > 1:
            gaps = rec["output_tokens"] - 1
            assert rec["tbt_mean_ms"] * gaps >= pm.decode_step_ms(1, rec["input_tokens"]) * gaps - 2.0
            assert rec["completion_ms"] - rec["first_token_ms"] == pytest.approx(
                rec["tbt_mean_ms"] * (rec["output_tokens"] - 1), rel=1e-6)
        assert rec["ttft_ms"] >= rec["transfer_end_ms"] - rec["arrival_ms"]
        # the decision's wall time, its CPU time and the time to build the views
        assert rec["decision_us"] > 0 and rec["views_build_us"] > 0
        assert rec["decision_cpu_us"] > 0
        # CPU time is within the wall time, except that the kernel's thread CPU
        # clock runs ahead of the wall clock now and then: on this VM by more than
        # 50 us in about 1 of 10,000 short intervals, by 352 us at most seen
        # (`python -m bench clocks`, docs/schedulers.md); a wrong clock or unit
        # would be off by far more than 2 ms
        overshoot_us = rec["decision_cpu_us"] - rec["decision_us"]
        assert overshoot_us <= 2000.0
        if overshoot_us > 50.0:
            cpu_ahead.append(rec["request_id"])
        # what else the wall time held: collections (within it) and context switches
        assert 0 <= rec["decision_gc_us"] <= rec["decision_us"] + 50.0
        assert rec["decision_preemptions"] >= 0 and rec["decision_waits"] >= 0
    assert len(cpu_ahead) <= 2, f"thread CPU clock ahead of wall by > 50 us in {cpu_ahead}"
    # every request shares block 0, so the prefill caches were hit
    assert any(r["prefill_cached_tokens"] >= 512 for r in recs.values())
    topo = catalog.build("fattree")
    assert all(r["tier_distance"] == topo.tier_distance(r["prefill"], r["decode"]) for r in recs.values())


def test_run_directory_repeats_the_run(good_run: tuple[ReplayConfig, Path, dict[str, Any], SamplingLauncher]) -> None:
    cfg, run_dir, _, _ = good_run
    assert ReplayConfig.load(run_dir / "config.json") == cfg
    run = json.loads((run_dir / "run.json").read_text())
    assert sorted(run["workers"]) == sorted(HOSTS)
    assert all(w["returncode"] is not None for w in run["workers"].values())  # all ended
    assert json.loads((run_dir / "summary.json").read_text())["ok"] == 24
    assert not (run_dir / "ctl.sock").exists()


def test_workers_are_light_and_reuse_kv_connections(
    good_run: tuple[ReplayConfig, Path, dict[str, Any], SamplingLauncher],
) -> None:
    _, run_dir, _, launcher = good_run
    assert 0 < launcher.max_rss_kb < RSS_LIMIT_KB
    recs = read_records(run_dir / "records.jsonl")
    for decode in ("g1", "g9", "g17", "g33"):
        senders = {r["prefill"] for r in recs if r["decode"] == decode}
        accepted = (run_dir / "logs" / f"{decode}.log").read_text().count("KV connection from")
        assert accepted == len(senders), decode  # one kept-open connection per (P, D) pair


def test_killed_workers_fail_exactly_their_requests(short_dir: Path, tmp_path: Path) -> None:
    # 30 real trace lines plus one malformed line, skipped and reported.
    lines = TRACE.read_text().splitlines()[:30]
    trace = tmp_path / "trace.jsonl"
    bad = '{"timestamp": 0, "input_length": "lots", "output_length": 5, "hash_ids": [1]}'
    trace.write_text("\n".join(lines[:5] + [bad] + lines[5:]) + "\n")
    # Round-robin choices make the load deterministic: at t=0 prefill g8 gets L2, L7 and
    # L11 (7,322 + 4,834 + 17,450 tokens, ~0.6 s of compute) and
    # decode g9 gets every fourth request.
    cfg = base_config(trace_path=str(trace), max_requests=30, rate_multiplier=4.0, on_trace_error="skip",
                      prefill_policy="round_robin")
    launcher = SamplingLauncher()
    killed: list[str] = []

    def killer() -> None:
        # kill when the first KV payload reaches g9: g9 then decodes, g8 still has prefills queued
        deadline = time.monotonic() + 30
        log = short_dir / "kill" / "logs" / "g9.log"
        while time.monotonic() < deadline:
            if log.exists() and "KV connection from" in log.read_text():
                break
            time.sleep(0.01)
        for host in ("g8", "g9"):  # a prefill and a decode, mid-run
            launcher.by_host[host].kill()  # SIGKILL, by the pid we started
            killed.append(host)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        summary = replay(cfg, launcher, short_dir / "kill")
    finally:
        thread.join()
        launcher.close()
    run_dir = short_dir / "kill"
    assert killed == ["g8", "g9"]
    expected = [f"L{i}" for i in range(1, 32) if i != 6]
    assert validate_file(run_dir / "records.jsonl", expected) == []
    assert summary["problems"] == []
    assert (run_dir / "trace_skipped.txt").read_text().startswith(f"{trace}:6: input_length must be a whole number")
    recs = read_records(run_dir / "records.jsonl")
    failed = [r for r in recs if r["status"] == "failed"]
    assert failed, "killing two busy workers mid-run must fail some requests"
    for r in failed:
        assert (r["prefill"] == "g8" and "prefill worker g8 exited with code -9" in r["reason"]) or (
            r["decode"] == "g9" and "decode worker g9 exited with code -9" in r["reason"]
        ), r
    assert any("decode worker g9" in r["reason"] for r in failed)
    assert any("prefill worker g8" in r["reason"] for r in failed)
    ok = [r for r in recs if r["status"] == "ok"]
    assert len(ok) + len(failed) == 30 and len(ok) > 0


def test_drain_deadline_and_no_eligible_decode_become_failed_records(short_dir: Path) -> None:
    # KV memory for ~10k tokens per decode: larger requests have no eligible decode;
    # a zero drain timeout fails whatever is still running after the last arrival.
    cfg = base_config(max_requests=8, drain_timeout_s=0.0, scheduler="least_loaded",
                      perf_overrides=dict(FAST, activation_reserve_bytes=54_600_000_000))
    assert perfmodel.build(cfg.model, cfg.gpu, cfg.perf_overrides).kv_capacity_tokens == 10_223
    summary = replay(cfg, LocalLauncher(), short_dir / "drain")
    recs = {r["request_id"]: r for r in read_records(short_dir / "drain" / "records.jsonl")}
    assert sorted(recs) == sorted(f"L{i}" for i in range(1, 9)) and summary["problems"] == []
    reasons = {rid: r["reason"] for rid, r in recs.items()}
    assert all(r["status"] == "failed" for r in recs.values())
    # L7 (23,594 tokens) and L8 (27,346) can never fit; the others fit one at a time
    for rid in ("L7", "L8"):
        assert reasons[rid].startswith("no eligible decode:") and recs[rid]["decode"] is None
    drained = [rid for rid, why in reasons.items()
               if why.startswith("not finished within drain_timeout_s=0 after the last arrival")]
    assert drained and all(why.startswith("no eligible decode:") for rid, why in reasons.items() if rid not in drained)


def test_config_is_checked() -> None:
    with pytest.raises(ReplayConfigError, match="unknown replay config key 'rate'"):
        ReplayConfig.from_dict({"rate": 2})
    with pytest.raises(ReplayConfigError, match=r"rate_multiplier must be a number in \[0.001, 1e\+06\], got 0"):
        ReplayConfig(rate_multiplier=0)
    with pytest.raises(ReplayConfigError, match="oracle must be one of static, telemetry, got 'magic'"):
        ReplayConfig(oracle="magic")
    with pytest.raises(ReplayConfigError, match="unknown perf-model key"):
        ReplayConfig(perf_overrides={"speed": 2})
    with pytest.raises(ReplayConfigError, match="decision_priority must be one of realtime, normal, got 'rt'"):
        ReplayConfig(decision_priority="rt")


# -- placement and the prefill chooser (no processes) ------------------------
def test_placements_on_the_default_fattree() -> None:
    topo = catalog.build("fattree")
    mixed = make_placement(topo)
    assert (len(mixed.prefill), len(mixed.decode)) == (32, 32)
    assert mixed.prefill[:2] == ("g0", "g2") and mixed.decode[:2] == ("g1", "g3")
    assert set(tier_mix(topo, mixed)) == {0, 1, 2, 3}
    racks = make_placement(topo, {"scheme": "split-racks"})
    assert min(tier_mix(topo, racks)) == 2
    assert set(tier_mix(topo, make_placement(topo, {"scheme": "split-pods"}))) == {3}
    explicit = make_placement(topo, {"scheme": "explicit", "prefill": ["g0"], "decode": ["g63"]})
    assert explicit.hosts == ("g0", "g63")


@pytest.mark.parametrize(
    "config, message",
    [
        ({"scheme": "stripes"}, "unknown placement scheme 'stripes'; known: mixed"),
        ({"scheme": "mixed", "extra": 1}, "unknown placement key 'extra'"),
        ({"scheme": "explicit", "prefill": ["g0"], "decode": ["g0"]}, "g0 is listed as both prefill and decode"),
        ({"scheme": "explicit", "prefill": ["g0"], "decode": ["g64"]}, "'g64' is not a GPU host of topology fattree"),
        ({"scheme": "explicit", "prefill": ["g0"]}, "needs both 'prefill' and 'decode'"),
        ({"scheme": "split-racks", "hosts": ["g0", "g1"]}, "needs at least 2 racks among the hosts, found 1"),
        ({"scheme": "mixed", "hosts": ["g0"]}, "gives 1 prefill and 0 decode hosts"),
    ],
)
def test_bad_placements_are_refused(config: dict[str, Any], message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        make_placement(catalog.build("fattree"), config)


def test_prefix_cache_is_lru_and_keeps_one_token_to_compute() -> None:
    cache = PrefixCache(3)
    cache.insert([1, 2, 3])
    assert cache.matched_blocks([1, 2, 9]) == 2
    assert cache.cached_tokens([1, 2, 3], 1536) == 1535  # the last token is always computed
    cache.insert([1])  # 1 becomes most recent; 2 is now the oldest
    cache.insert([4])
    assert 2 not in cache and 1 in cache and len(cache) == 3


def test_prefill_chooser_trades_cache_against_load() -> None:
    pm = perfmodel.build()
    a, b = PrefillInstance("a", PrefixCache(100)), PrefillInstance("b", PrefixCache(100))
    a.cache.insert(range(20))
    chooser = PrefillChooser(pm)
    ids = tuple(range(20))
    # idle: the cached instance wins
    assert chooser.choose(ids, 10_240, [a, b]).name == "a"
    # the cached instance is busy for longer than a full prefill elsewhere: go elsewhere
    a.pending_ms = pm.prefill_ms(10_240) + 1.0
    choice = chooser.choose(ids, 10_240, [a, b])
    assert choice.name == "b" and choice.cached_tokens == 0
    # least_loaded ignores the cache; dead instances are never chosen
    assert PrefillChooser(pm, "least_loaded").choose(ids, 10_240, [a, b]).name == "b"
    b.alive = False
    assert chooser.choose(ids, 10_240, [a, b]).name == "a"
    a.alive = False
    with pytest.raises(PrefillChoiceError, match="no live prefill instance"):
        chooser.choose(ids, 10_240, [a, b])
    with pytest.raises(PrefillChoiceError, match="unknown prefill policy 'fastest'"):
        PrefillChooser(pm, "fastest")


class _Interrupt(BaseException):
    """Stands for Ctrl-C reaching the frontend in the middle of a replay."""


def test_interrupted_replay_still_writes_one_record_per_request(short_dir: Path) -> None:
    from netkv import schedulers

    cfg = base_config(max_requests=10, scheduler="round_robin")
    inner = schedulers.create("round_robin", {}, kv_bytes_per_token=131072)
    calls = {"n": 0}

    class InterruptAfterFour:
        name = "round_robin"

        def choose(self, *args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 5:
                raise _Interrupt("stop")
            return inner.choose(*args, **kwargs)

    with pytest.raises(_Interrupt):
        replay(cfg, LocalLauncher(), short_dir / "int", scheduler=InterruptAfterFour())
    recs = read_records(short_dir / "int" / "records.jsonl")
    ids = [r["request_id"] for r in recs]
    assert sorted(ids) == sorted(f"L{i}" for i in range(1, 11)) and len(set(ids)) == 10
    interrupted = [r for r in recs if "run interrupted" in r["reason"]]
    assert interrupted and all(r["status"] == "failed" for r in interrupted)
    assert any(r["reason"].endswith("before dispatch") for r in interrupted)


def test_gc_clock_counts_collections_only_while_started() -> None:
    clock = GcClock()
    gc.collect()
    assert clock.total_s == 0.0
    clock.start()
    clock.start()  # idempotent: one callback, counted once
    assert gc.callbacks.count(clock) == 1
    try:
        junk: list[Any] = []
        for _ in range(20_000):  # cycles, so a collection has work
            x: list[Any] = []
            x.append(x)
            junk.append(x)
        del junk, x
        gc.collect()
        during = clock.total_s
        assert during > 0.0
    finally:
        clock.stop()
    assert clock not in gc.callbacks
    gc.collect()
    assert clock.total_s == during


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs root (CAP_SYS_NICE)")
def test_decisions_run_at_realtime_priority_and_return_to_normal() -> None:
    prio = DecisionPriority("realtime")
    assert prio.applied and prio.refusal == ""
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    with pytest.raises(KeyError):  # a decision that raises still gives the thread its normal scheduling back
        with prio:
            assert os.sched_getscheduler(0) == os.SCHED_FIFO
            assert os.sched_getparam(0).sched_priority == 1
            raise KeyError("scheduler failed")
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    normal = DecisionPriority("normal")
    with normal:
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert not normal.applied and normal.refusal == ""


def test_without_the_right_to_real_time_decisions_run_normally_and_say_so() -> None:
    code = ("from netkv.serving.timing import DecisionPriority; p = DecisionPriority('realtime')\n"
            "with p: import os; print(p.applied, os.sched_getscheduler(0) == os.SCHED_OTHER, p.refusal)")
    argv = [sys.executable, "-c", code]
    if os.geteuid() == 0:  # root keeps the right unless the capability is dropped
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to drop CAP_SYS_NICE")
        argv = [setpriv, "--bounding-set", "-sys_nice", "--inh-caps", "-sys_nice", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2],
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False True cannot run decisions at SCHED_FIFO (Operation not permitted)")
