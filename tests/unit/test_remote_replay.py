"""A replay across servers, the parts that run without a second machine: the
worker sessions' and the control forward's ssh argv, the clock watch over a
real echo process (run here instead of over ssh), the frontend's use of a
launcher's clock and its hooks (real workers on 127.0.0.1), and a server's
envelope metered by ``python -m lab.envelope`` as it runs on another server.
The whole path over ssh between two kernels is ``scripts/cluster-check``."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pytest

from fabric import cluster, remote
from fabric.cluster import ClusterError, CommandResult, Server
from lab.emulator import judge_servers
from lab.envelope import RemoteMeter
from lab.verdict import ENVELOPE_CPU_PCT
from netkv.records import read_records
from netkv.repo import REPO_ROOT
from tests.helpers.replay import base_config
from workers.driver import on_head_clock
from workers.launch import LocalLauncher
from workers.run import replay

S1 = Server("s1", "10.0.0.2", cluster.WORKER)


# -- worker sessions and the forward ------------------------------------------------------------
def test_worker_sessions_share_connections_opened_one_after_the_other(tmp_path: Path) -> None:
    opened: list[list[str]] = []

    def runner(argv: Sequence[str], timeout_s: float) -> CommandResult:
        opened.append(list(argv))
        return CommandResult(0, "", "")

    sessions = remote.WorkerSessions(tmp_path, runner=runner)
    odd = json.dumps({"prefill_mfu": 1.0, "note": "a b; $(x)"})
    argvs = [sessions.argv(S1, 4242, ["python", "-m", "workers.decode", "--perf-json", odd])
             for _ in range(remote.SESSIONS_PER_SERVER + 1)]
    # a connection per SESSIONS_PER_SERVER sessions, each opened (by `true`) before its first session
    assert [shlex.split(a[-1]) for a in opened] == [["true"], ["true"]]
    assert f"ControlPath={remote.control_path(tmp_path, S1, 1)}" in opened[0]
    assert f"ControlPath={remote.control_path(tmp_path, S1, 2)}" in opened[1]
    assert f"ControlPath={remote.control_path(tmp_path, S1, 2)}" in argvs[-1]
    first = argvs[0]
    assert first[:2] == ["ssh", "-tt"] and "root@10.0.0.2" in first  # a terminal: its hang-up ends the worker
    there = shlex.split(first[-1])  # every word arrives as it was, JSON and all
    assert there[:3] == ["env", "-C", str(REPO_ROOT)]
    assert there[there.index("mnexec"):] == ["mnexec", "-a", "4242", "python", "-m", "workers.decode",
                                             "--perf-json", odd]
    failing = remote.WorkerSessions(tmp_path, runner=lambda argv, t: CommandResult(255, "", "Connection refused\n"))
    with pytest.raises(ClusterError, match="cannot open an ssh connection for workers: Connection refused"):
        failing.argv(S1, 1, ["true"])


def test_the_control_forward_is_a_unix_socket_over_its_own_connection(tmp_path: Path) -> None:
    there = remote.worker_control_socket(Path("/run/netkv/nk"), "77-0-1")
    assert str(there).startswith("/run/netkv/nk/sw/")  # the prefix's sweep there finds the workers by it
    argv = remote.forward_argv(S1, there, tmp_path / "ctl.sock")
    assert argv[:3] == ["ssh", "-N", "-T"] and argv[-1] == "root@10.0.0.2"
    assert argv[argv.index("-R") + 1] == f"{there}:{tmp_path / 'ctl.sock'}"
    assert "ExitOnForwardFailure=yes" in argv and "ControlPath=none" in argv and "BatchMode=yes" in argv


def test_every_control_master_of_a_server_is_found(tmp_path: Path) -> None:
    for name in ("ssh-s1", "ssh-s1-1", "ssh-s1-2", "ssh-s10", "ssh-s2"):
        (tmp_path / name).touch()
    assert [p.name for p in remote.control_paths(tmp_path, S1)] == ["ssh-s1", "ssh-s1-1", "ssh-s1-2"]


# -- the clock watch over a real echo -----------------------------------------------------------
def local_echo(server: Server, argv: Sequence[str]) -> list[str]:
    return [sys.executable, *argv[1:]]


# An echo whose clock jumps 1 s ahead after its first 16 answers (a server whose clock was stepped).
JUMPING_ECHO = ("import sys, time\n"
                "n = 0\n"
                "for line in sys.stdin:\n"
                "    n += 1\n"
                "    t = time.time() + (1.0 if n > 16 else 0.0)\n"
                "    print(repr(t), repr(t), flush=True)\n")


def test_clock_watch_measures_at_start_while_running_and_at_the_end() -> None:
    watch = remote.ClockWatch([S1], local_echo, interval_s=0.05)
    watch.start()
    time.sleep(0.3)
    assert abs(watch.to_head_s("s1", 1000.0) - 1000.0) < 0.01  # the same clock: offset zero
    out = watch.stop()
    info = out["servers"]["s1"]
    assert out["problems"] == [] and out["bound_s"] == cluster.MAX_CLOCK_UNCERTAINTY_S
    assert len(info["series"]) >= 3  # the start, at least one while running, the end
    assert info["uncertainty_s_max"] <= cluster.MAX_CLOCK_UNCERTAINTY_S and abs(info["offset_s"]) < 0.01


def test_clock_watch_refuses_a_loose_clock_and_names_a_step() -> None:
    loose = remote.ClockWatch([S1], local_echo, bound_s=0.0)
    with pytest.raises(ClusterError, match=r"server s1: clock offset .* is known only to"):
        loose.start()
    assert loose.echoes == {}  # its echo ended with the refusal
    stepped = remote.ClockWatch([S1], lambda server, argv: [sys.executable, "-c", JUMPING_ECHO], interval_s=0.05)
    stepped.start()
    assert abs(stepped.offset_s("s1")) < 0.01
    time.sleep(0.3)
    out = stepped.stop()
    assert any(re.search(r"clock offset moved \+(999\.9\d\d|1000\.0\d\d) ms", p) for p in out["problems"]), \
        out["problems"]
    assert abs(out["servers"]["s1"]["offset_s"] - 1.0) < 0.01  # later reports are corrected by the new offset


def test_reports_are_put_on_the_head_clock_key_by_key() -> None:
    msg = {"t": "done", "id": "L1", "transfer_end_s": 100.0, "admit_s": 101, "first_token_s": 102.5,
           "completion_s": 103.0, "tbt_mean_ms": 20.0, "flag_s": True}
    out = on_head_clock(msg, "g1", lambda host, t: t - 10.0)
    assert out == {"t": "done", "id": "L1", "transfer_end_s": 90.0, "admit_s": 91.0, "first_token_s": 92.5,
                   "completion_s": 93.0, "tbt_mean_ms": 20.0, "flag_s": True}


# -- the frontend with a launcher across servers --------------------------------------------------
class ClockedLauncher(LocalLauncher):
    """LocalLauncher with the hooks of a launcher across servers: every decode
    host "on another server" (its reports pass through to_head_s, unchanged
    here: one clock), the hooks' calls counted."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.stamped: dict[str, int] = {}
        self.problems = problems

    def prepare(self) -> None:
        self.calls.append("prepare")

    def control_path(self, host: str, local: str) -> str:
        self.calls.append(f"control {host}")
        return local

    def to_head_s(self, host: str, t_s: float) -> float:
        self.stamped[host] = self.stamped.get(host, 0) + 1
        return t_s

    def finish(self) -> dict[str, Any]:
        self.calls.append("finish")
        return {"clocks": {"bound_s": 0.002, "problems": self.problems,
                           "servers": {"s1": {"offset_s": 0.0, "series": [[0.0, 0.0, 0.0]]}}}}


def test_the_frontend_uses_the_launchers_clock_and_hooks(short_dir: Path) -> None:
    cfg = base_config(max_requests=6)
    launcher = ClockedLauncher([])
    summary = replay(cfg, launcher, short_dir / "r")
    recs = read_records(short_dir / "r" / "records.jsonl")
    assert summary["problems"] == [] and [r["status"] for r in recs] == ["ok"] * 6
    assert launcher.calls[0] == "prepare" and launcher.calls[-1] == "finish"
    assert sum(c.startswith("control ") for c in launcher.calls) == 8  # every worker's control socket asked for
    # per request: prefilled and sent (2 stamps each) from its prefill, admitted (2) and done (4) from its decode
    for rec in recs:
        assert launcher.stamped[rec["prefill"]] >= 4 and launcher.stamped[rec["decode"]] >= 6
    run = json.loads((short_dir / "r" / "run.json").read_text())
    assert run["clocks"]["servers"]["s1"]["series"] == [[0.0, 0.0, 0.0]]
    assert summary["clocks"] == {"bound_s": 0.002, "problems": [], "servers": {"s1": {"offset_s": 0.0}}}


def test_a_clock_problem_is_a_problem_of_the_run(short_dir: Path) -> None:
    summary = replay(base_config(max_requests=2), ClockedLauncher(["server s1: clock offset moved +3 ms"]),
                     short_dir / "p")
    assert summary["problems"] == ["clock: server s1: clock offset moved +3 ms"]
    assert len(read_records(short_dir / "p" / "records.jsonl")) == 2  # the records are kept, and doubted


# -- a server's envelope --------------------------------------------------------------------------
def test_a_servers_meter_answers_with_its_envelope() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 4: pass"])
    try:
        meter = RemoteMeter("s1", [sys.executable, "-m", "lab.envelope", "--pids", json.dumps({"sw1": busy.pid}),
                                   "--interval-s", "0.5"])
        start = time.time()
        time.sleep(2.2)
        env = meter.stop((start, time.time()))
    finally:
        busy.kill()
        busy.wait()
    assert env["busiest_switch"] == "sw1" and env["samples"] >= 2, env
    assert env["switch_cpu_pct_mean"] > 10  # the spinning process, measured there (on a busy machine too)
    # judged there by the one rule: a p95 above the bound puts it outside, naming the switch process
    assert isinstance(env["within_envelope"], bool)
    if env["switch_cpu_pct_p95"] > ENVELOPE_CPU_PCT:
        assert env["within_envelope"] is False and str(env["limiting_resource"]).startswith("switch process CPU")
    bad = RemoteMeter("s1", [sys.executable, "-m", "lab.envelope", "--pids", "[1]"])
    assert "did not answer" in bad.stop(None)["error"]


def test_a_replay_is_inside_only_when_every_server_is() -> None:
    inside = {"within_envelope": True, "limiting_resource": None}
    env: dict[str, Any] = {**inside, "servers": {"s1": dict(inside), "s2": {"within_envelope": False,
                                                                          "limiting_resource": "switch process"}}}
    judge_servers(env)
    assert env["within_envelope"] is False and env["limiting_resource"] == "server s2: switch process"
    env = {**inside, "servers": {"s1": {"error": "the meter on s1 did not answer (x)"}}}
    judge_servers(env)
    assert env["within_envelope"] is False and env["limiting_resource"].startswith("server s1: not measured")
    head_out = {"within_envelope": False, "limiting_resource": "machine", "servers": {"s1": dict(inside)}}
    judge_servers(head_out)
    assert head_out["limiting_resource"] == "machine"
