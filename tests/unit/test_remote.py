"""The testbed on several servers, the parts that run without a second
server: the OpenFlow relay a worker runs, the sweep of the other servers
(with a canned ssh), the leftovers they report, and the controller's
management-address rule.  The real ssh paths run in two qemu guests
(scripts/cluster-check)."""

from __future__ import annotations

import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import pytest

from controller.rest import require_management_address
from fabric import cleanup, cluster, remote
from fabric.cluster import CommandResult

ROOT = Path(__file__).resolve().parents[2]


def test_the_relay_alone_joins_a_unix_socket_to_tcp_and_ends_on_hangup(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def echo() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data.upper())

    threading.Thread(target=echo, daemon=True).start()
    path = tmp_path / "sw" / "of.sock"
    proc = subprocess.Popen([sys.executable, "-m", "controller.relay", "--unix", str(path), "--to-host", "127.0.0.1",
                             "--to-port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        client.sendall(b"hello switch")
        got = b""
        while len(got) < 12:
            got += client.recv(64)
        assert got == b"HELLO SWITCH"
        client.close()
        proc.send_signal(signal.SIGHUP)  # its ssh session ended
        assert proc.wait(timeout=10) == 0
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()


def test_the_relay_refuses_a_socket_path_it_cannot_use(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a socket")
    proc = subprocess.run([sys.executable, "-m", "controller.relay", "--unix", str(tmp_path / "file"),
                           "--to-host", "127.0.0.1", "--to-port", "6653"], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 1 and "cannot listen on" in proc.stderr and "Traceback" not in proc.stderr


class Canned:
    def __init__(self, answers: dict[str, CommandResult]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], timeout_s: float) -> CommandResult:
        self.calls.append(list(argv))
        dest = next((a for a in argv if a.startswith("root@")), "")
        return self.answers.get(dest, CommandResult(0, "netkv: prefix nk: removed 3 objects\n", ""))


def test_sweeping_the_other_servers_runs_their_own_clean_and_names_what_is_left(tmp_path: Path) -> None:
    servers = cluster.parse_servers("head=10.0.0.1,s1=10.0.0.2,s2=10.0.0.3")
    runner = Canned({"root@10.0.0.3": CommandResult(1, "netkv: prefix nk: removed 2 objects; still present: "
                                                       "{'processes': [41]}\n", "")})
    left = remote.sweep_workers("nk", servers[1:], tmp_path, runner)
    assert left == {"s2": "netkv: prefix nk: removed 2 objects; still present: {'processes': [41]}"}
    sweeps = [c for c in runner.calls if "-O" not in c]
    assert len(sweeps) == 2
    assert shlex.split(sweeps[0][-1]) == [str(ROOT / ".venv" / "bin" / "netkv"), "clean", "--prefix", "nk"]
    exits = [c for c in runner.calls if "-O" in c]
    assert [c[-1] for c in exits] == ["root@10.0.0.2", "root@10.0.0.3"]  # each control master ended
    unreachable = remote.sweep_workers("nk", servers[1:2], tmp_path, Canned(
        {"root@10.0.0.2": CommandResult(255, "", "ssh: connect to host 10.0.0.2 port 22: No route to host\n")}))
    assert unreachable == {"s1": "ssh: connect to host 10.0.0.2 port 22: No route to host"}


def test_leftovers_of_other_servers_count_in_the_total() -> None:
    left = cleanup.Leftovers()
    assert left.total == 0 and "servers" not in left.as_dict()
    left.servers["s1"] = "still present: {'namespaces': ['nkg0']}"
    assert left.total == 1 and left.as_dict()["servers"] == {"s1": "still present: {'namespaces': ['nkg0']}"}


def test_the_workers_of_a_recorded_testbed_come_from_its_saved_configuration() -> None:
    servers = cluster.servers_to_json(cluster.parse_servers("head=10.0.0.1,s1=10.0.0.2"))
    assert [s.name for s in remote.workers_of_state({"config": {"servers": servers}})] == ["s1"]
    assert remote.workers_of_state({"config": {}}) == [] and remote.workers_of_state(None) == []
    assert remote.workers_of_state({"config": {"servers": [{"name": "Bad"}]}}) == []


@pytest.mark.parametrize("text,total", [
    ('{"prefix": "nk", "leftovers_or_live": {"total": 0}}\n', 0),
    ('warning first\n{"prefix": "nk", "leftovers_or_live": {"total": 5}}', 5),
    ("", None), ("not json", None), ('{"prefix": "nk"}', None),
])
def test_a_workers_status_answer_is_read_or_said_unreadable(text: str, total: int | None) -> None:
    assert remote.leftovers_total(text) == total


@pytest.mark.parametrize("host,ok", [("10.0.0.1", True), ("192.168.100.1", True), ("0.0.0.0", False),
                                     ("127.0.0.1", False), ("224.0.0.1", False), ("::1", False),
                                     ("head", False)])
def test_the_openflow_listener_across_servers_is_one_unicast_address(host: str, ok: bool) -> None:
    if ok:
        require_management_address(host)
    else:
        with pytest.raises(ValueError):
            require_management_address(host)


def test_the_controller_refuses_every_address_in_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "controller", "--scale", "40000", "--of-host", "0.0.0.0",
                           "--of-mgmt"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "management address" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
