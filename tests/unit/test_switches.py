"""The per-switch Open vSwitch mode's pure parts (no root): mode choice, file
and socket paths, the commands each instance is started with, the Unix-socket
OpenFlow relay, and the emulator envelope's verdict."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from cli.common import parse_bool
from controller.queues import QueueReader, QueueReadError, tc_batch_argv
from controller.relay import UnixRelay
from fabric import switches
from fabric.config import ConfigError, TestbedConfig
from lab.envelope import machine_ticks
from lab.verdict import ENVELOPE_CPU_PCT, ENVELOPE_MACHINE_PCT, envelope_verdict


def test_auto_mode_is_per_switch_on_the_userspace_datapath_only() -> None:
    assert switches.resolve_mode("auto", "user") == "per_switch"
    assert switches.resolve_mode("auto", "kernel") == "shared"
    assert switches.resolve_mode("shared", "user") == "shared"
    assert switches.resolve_mode("per_switch", "user") == "per_switch"
    with pytest.raises(ValueError, match="switch_mode must be one of"):
        switches.resolve_mode("per-switch", "user")


def test_config_checks_switch_mode_and_jemalloc() -> None:
    TestbedConfig(switch_mode="shared").validate()
    with pytest.raises(ConfigError, match="switch_mode must be one of"):
        TestbedConfig(switch_mode="one").validate()
    with pytest.raises(ConfigError, match="with datapath kernel"):
        TestbedConfig(switch_mode="per_switch", datapath="kernel").validate()
    with pytest.raises(ConfigError, match="switch_jemalloc must be true or false"):
        TestbedConfig(switch_jemalloc="yes").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown testbed setting 'switch_modes'"):
        TestbedConfig.from_json({"switch_modes": "shared"})


def test_parse_bool_accepts_words_and_refuses_others() -> None:
    assert parse_bool("true") and parse_bool("On") and parse_bool("1")
    assert not parse_bool("false") and not parse_bool("no")
    with pytest.raises(Exception, match="expected true or false"):
        parse_bool("maybe")


def test_every_file_of_an_instance_is_under_the_testbed_state_dir() -> None:
    state = Path("/run/netkv/nk")
    p = switches.paths_of(state, "t1")
    for path in (p.db, p.db_sock, p.ovsdb_pidfile, p.ovsdb_ctl, p.vswitchd_pidfile, p.vswitchd_ctl,
                 p.log("ovs-vswitchd")):
        assert path.parent == state / "sw" / "t1"
    # Open vSwitch connects only to sockets in its run directory, shared by the instances
    assert p.mgmt("nkt1") == state / "sw" / "nkt1.mgmt"
    assert switches.controller_socket(state).parent == p.rundir == state / "sw"
    assert switches.netns_name("nk", "t1") == "nkt1"


def test_socket_paths_too_long_are_refused() -> None:
    switches.check_socket_paths(Path("/run/netkv/nk"), ["nkt1", "nkc12"])
    with pytest.raises(ValueError, match="longer than 107 bytes"):
        switches.check_socket_paths(Path("/tmp/" + "d" * 100), ["nkt1"])


def test_instance_commands() -> None:
    p = switches.paths_of(Path("/run/netkv/nk"), "t1")
    server = switches.ovsdb_server_argv(p)
    assert server[:2] == ["ovsdb-server", str(p.db)]
    assert f"--remote=punix:{p.db_sock}" in server and "--detach" in server
    # no TCP remote: the database answers only on its Unix socket
    assert not [a for a in server if "ptcp:" in a or "tcp:" in a]
    vsd = switches.vswitchd_argv(p, "nkt1")
    assert vsd[:5] == ["ip", "netns", "exec", "nkt1", "ovs-vswitchd"]
    assert f"unix:{p.db_sock}" in vsd and f"--pidfile={p.vswitchd_pidfile}" in vsd
    cfg = switches.bridge_config_argv(p, "nkt1", 0x200000001, [("nkt1-eth1", 1), ("nkt1-eth3", 3)],
                                      "unix:/run/netkv/nk/sw/of.sock")
    assert cfg[:3] == ["ovs-vsctl", f"--db=unix:{p.db_sock}", "--timeout=20"]
    text = " ".join(cfg)
    assert "add-br nkt1" in text and "datapath_type=netdev" in text and "fail_mode=secure" in text
    assert "other-config:datapath-id=0000000200000001" in text and "protocols=OpenFlow13" in text
    assert "add-port nkt1 nkt1-eth3 -- set interface nkt1-eth3 ofport_request=3" in text
    assert 'target="unix:/run/netkv/nk/sw/of.sock"' in text
    assert f"max_backoff={switches.CONTROLLER_MAX_BACKOFF_MS}" in text


def test_daemon_env_points_every_directory_into_the_testbed(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    p = switches.paths_of(Path("/run/netkv/nk"), "a0")
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    monkeypatch.setattr(switches, "JEMALLOC_PATHS", (lib,))
    env = switches.daemon_env(p, jemalloc=True)
    assert env["OVS_RUNDIR"] == str(p.rundir) and env["OVS_DBDIR"] == env["OVS_LOGDIR"] == str(p.root)
    assert env["LD_PRELOAD"] == str(lib)
    assert "LD_PRELOAD" not in switches.daemon_env(p, jemalloc=False) or \
        switches.daemon_env(p, jemalloc=False)["LD_PRELOAD"] != str(lib)
    monkeypatch.setattr(switches, "JEMALLOC_PATHS", (tmp_path / "absent.so",))
    assert switches.daemon_env(p, jemalloc=True).get("LD_PRELOAD") != str(tmp_path / "absent.so")


def test_queue_reader_keeps_one_tc_per_namespace() -> None:
    assert tc_batch_argv() == ["tc", "-s", "-j", "-batch", "-"]
    assert tc_batch_argv("nkt1") == ["tc", "-n", "nkt1", "-s", "-j", "-batch", "-"]
    reader = QueueReader("zzq")  # this namespace: no interface carries the prefix
    try:
        assert reader.read(1.0) == [] and reader.read(2.0) == []
        first = reader.procs[None]
        reader.read(3.0)
        assert reader.procs[None] is first and first.poll() is None  # the same tc answered every round
    finally:
        reader.close()
    assert first.poll() is not None
    missing = QueueReader("zzq", ["zzq-no-such-namespace", "zzq-neither"])
    try:
        with pytest.raises(QueueReadError, match="2 of 2 namespaces unread; first: tc in namespace zzq-no-such"):
            missing.read(1.0)
    finally:
        missing.close()


def _echo_upper_server() -> tuple[socket.socket, int]:
    """A loopback TCP server standing for the OpenFlow listener: it answers
    every chunk with the same bytes upper-cased."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return

            def pump(c: socket.socket) -> None:
                with c:
                    while data := c.recv(4096):
                        c.sendall(data.upper())
            threading.Thread(target=pump, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, int(srv.getsockname()[1])


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def test_relay_joins_unix_connections_to_the_tcp_listener(tmp_path: Path) -> None:
    srv, port = _echo_upper_server()
    relay = UnixRelay(tmp_path / "sw" / "of.sock", "127.0.0.1", port).start()
    try:
        assert (tmp_path / "sw" / "of.sock").stat().st_mode & 0o777 == 0o600
        clients = []
        for i in range(3):  # several switches at once, each its own TCP connection
            c = socket.socket(socket.AF_UNIX)
            c.settimeout(5)
            c.connect(str(tmp_path / "sw" / "of.sock"))
            clients.append(c)
        payload = bytes(range(97, 123)) * 4000  # 104 kB: more than one read
        for i, c in enumerate(clients):
            c.sendall(payload + str(i).encode())
        for i, c in enumerate(clients):
            assert _recv_exactly(c, len(payload) + 1) == payload.upper() + str(i).encode()
        assert relay.connections == 3 and relay.active == 3
        clients[0].close()
        for _ in range(50):
            if relay.active == 2:
                break
            threading.Event().wait(0.05)
        assert relay.active == 2
    finally:
        for c in clients:
            c.close()
        relay.stop()
        srv.close()
    assert not (tmp_path / "sw" / "of.sock").exists()


def test_relay_closes_a_switch_connection_when_the_listener_is_down(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])  # nothing listens here once closed
    relay = UnixRelay(tmp_path / "of.sock", "127.0.0.1", port).start()
    try:
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(5)
        c.connect(str(tmp_path / "of.sock"))
        assert c.recv(10) == b""  # closed at once: the switch retries with its backoff
        c.close()
        assert relay.refused == 1
    finally:
        relay.stop()


def test_relay_refuses_to_replace_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    (tmp_path / "of.sock").write_text("not a socket")
    with pytest.raises(OSError, match="is not a socket"):
        UnixRelay(tmp_path / "of.sock", "127.0.0.1", 1).start()


def test_envelope_verdict_names_the_resource_that_ran_out() -> None:
    assert envelope_verdict(None, None, []) == {"within_envelope": None, "limiting_resource": None}
    assert envelope_verdict(40.0, 50.0, []) == {"within_envelope": True, "limiting_resource": None}
    v = envelope_verdict(ENVELOPE_CPU_PCT, 50.0, [])
    assert v["within_envelope"] is False and "switch process CPU" in v["limiting_resource"]
    assert envelope_verdict(30.0, ENVELOPE_MACHINE_PCT - 0.1, [])["within_envelope"] is True
    v = envelope_verdict(30.0, ENVELOPE_MACHINE_PCT, [])
    assert v["within_envelope"] is False and v["limiting_resource"].startswith("machine CPU")
    v = envelope_verdict(30.0, 30.0, ["t1"])
    assert v["within_envelope"] is False and "died: t1" in v["limiting_resource"]


def test_a_stalled_replay_process_is_outside_the_envelope() -> None:
    from lab.verdict import ENVELOPE_DISPATCH_LAG_MS, ENVELOPE_SAMPLE_GAP_S

    ok = envelope_verdict(30.0, 30.0, [], sample_gap_s=1.1, clock_jump_s=0.1, dispatch_lag_ms=190.0)
    assert ok == {"within_envelope": True, "limiting_resource": None}
    v = envelope_verdict(30.0, 30.0, [], dispatch_lag_ms=ENVELOPE_DISPATCH_LAG_MS)
    assert v["within_envelope"] is False and "dispatched 500 ms after its arrival" in v["limiting_resource"]
    v = envelope_verdict(30.0, ENVELOPE_MACHINE_PCT, [], sample_gap_s=ENVELOPE_SAMPLE_GAP_S + 8.7)
    assert v["within_envelope"] is False
    assert v["limiting_resource"] == "replay process stalled (no meter sample for 11.7 s); machine CPU (p95 80% busy)"
    # no CPU samples at all, but a late dispatch: still judged
    assert envelope_verdict(None, None, [], dispatch_lag_ms=10_754.0)["within_envelope"] is False


def test_the_meter_reports_its_largest_sample_gap() -> None:
    from lab.envelope import EmulatorMeter

    wall = [100.0, 101.0, 112.7, 113.7]
    # the process stood still: both clocks advanced across the hole
    meter = EmulatorMeter({})
    for sample in [(t, {}, 10.0, t - 50.0) for t in wall]:
        meter.add(*sample)
    out = meter.stop((99.0, 114.0))
    assert out["sample_gap_s_max"] == 11.7 and out["wall_clock_jump_s_max"] == 0.0
    assert out["within_envelope"] is False
    assert out["limiting_resource"] == "replay process stalled (no meter sample for 11.7 s)"
    # the virtual machine was paused: the monotonic clock stood still, the wall clock jumped
    meter = EmulatorMeter({})
    for sample in [(t, {}, 10.0, mono) for t, mono in zip(wall, [50.0, 51.0, 52.0, 53.0])]:
        meter.add(*sample)
    out = meter.stop((99.0, 114.0))
    assert out["wall_clock_jump_s_max"] == 10.7
    assert out["within_envelope"] is False
    assert out["limiting_resource"] == ("virtual machine paused (wall clock jumped 10.7 s past the monotonic "
                                        "clock)")
    # an ordinary replay: one-second samples on both clocks
    meter = EmulatorMeter({})
    for sample in [(100.0 + i, {}, 10.0, 50.0 + i) for i in range(5)]:
        meter.add(*sample)
    out = meter.stop((99.0, 105.0))
    assert out["within_envelope"] is True and out["sample_gap_s_max"] == 1.0
    # the replay's dispatch lag, handed to stop(), is kept and judged with the rest
    meter = EmulatorMeter({})
    for sample in [(100.0 + i, {}, 10.0, 50.0 + i) for i in range(5)]:
        meter.add(*sample)
    out = meter.stop((99.0, 105.0), dispatch_lag_ms=10_754.04)
    assert out["dispatch_lag_ms_max"] == 10_754.0 and out["within_envelope"] is False
    assert "dispatched 10754 ms after its arrival" in out["limiting_resource"]


def test_machine_ticks_grow_and_busy_is_part_of_total() -> None:
    busy0, total0 = machine_ticks()
    x = 0
    for i in range(2_000_000):
        x += i
    busy1, total1 = machine_ticks()
    assert 0 <= busy0 <= total0 and total1 >= total0 and busy1 >= busy0


def test_meter_judges_only_the_replay_window(monkeypatch: pytest.MonkeyPatch) -> None:
    from lab.envelope import EmulatorMeter

    meter = EmulatorMeter({"t0": 1, "t1": 2})
    # worker start-up (machine saturated), then the replay, then teardown
    for sample in [(100.0, {"t0": 5.0, "t1": 3.0}, 100.0, 50.0), (101.0, {"t0": 6.0, "t1": 2.0}, 100.0, 51.0),
                     (103.0, {"t0": 20.0, "t1": 10.0}, 40.0, 53.0), (104.0, {"t0": 30.0, "t1": 12.0}, 50.0, 54.0),
                     (106.0, {"t0": 1.0, "t1": 1.0}, 99.0, 56.0)]:
        meter.add(*sample)
    out = meter.stop((101.5, 105.0))
    assert out["samples"] == 2 and out["samples_outside_window"] == 3
    assert out["busiest_switch"] == "t0" and out["switch_cpu_pct_max"] == 30.0
    assert out["machine_busy_pct_p95"] == 40.0 and out["within_envelope"] is True
    assert len(out["series"]) == 5 and out["series"][0] == [0.0, 8.0, 5.0, 100.0, 0.0]
    assert out["series"][3] == [4.0, 42.0, 30.0, 50.0, 4.0]  # the last column: monotonic s since the first
    whole = EmulatorMeter({"t0": 1})
    for sample in [(1.0, {"t0": 99.0}, 50.0, 1.0), (2.0, {"t0": 99.0}, 50.0, 2.0)]:
        whole.add(*sample)
    verdict = whole.stop()
    assert verdict["within_envelope"] is False and "switch process CPU" in verdict["limiting_resource"]


def test_leftover_switch_files_are_listed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fabric import cleanup

    monkeypatch.setattr(cleanup, "STATE_ROOT", tmp_path)
    assert cleanup.switch_instance_files("nk") == []
    sw = switches.switches_root(cleanup.state_dir("nk"))
    (sw / "t1").mkdir(parents=True)
    (sw / "of.sock").write_text("")
    assert cleanup.switch_instance_files("nk") == ["of.sock", "t1"]
    assert cleanup.switch_instance_files("nq") == []  # another prefix's directory is not ours
