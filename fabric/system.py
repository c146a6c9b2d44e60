"""What the machine offers, checked before anything is built.

Every command is an argv list (never a shell string).  Failures raise
:class:`PreflightError` with one line that says what is missing and how to
get it; the CLI prints that line and exits non-zero.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

LOG = logging.getLogger("netkv.testbed")

OVS_CTL = "/usr/share/openvswitch/scripts/ovs-ctl"
# The machine's own (shared) Open vSwitch, as ovs-ctl starts it.
OVS_PIDFILE = Path("/var/run/openvswitch/ovs-vswitchd.pid")
OVS_DB_SOCKET = Path("/var/run/openvswitch/db.sock")
REQUIRED_BINARIES = ("mnexec", "ovs-vsctl", "ovs-ofctl", "tc", "ip", "ethtool", "ping", "iperf3")


class BringUpError(RuntimeError):
    """Bring-up failed; the network was removed again before this was raised."""


class PreflightError(RuntimeError):
    """The machine cannot run the testbed as configured; one clear line."""


def run(argv: Sequence[str], *, check: bool = True, timeout_s: float = 60,
        input_text: str | None = None, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one command (argv list), capture its output, log it."""
    LOG.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s,
                              input=input_text, env=None if env is None else dict(env))
    except FileNotFoundError:
        raise PreflightError(f"command not found: {argv[0]} (run the install script)") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"command timed out after {timeout_s} s: {' '.join(argv)}") from None
    if check and proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(argv)}: "
                           f"{(proc.stderr or proc.stdout).strip()[:500]}")
    return proc


def require_root() -> None:
    if os.geteuid() != 0:
        raise PreflightError("the testbed needs root (network namespaces, Open vSwitch, tc): run it with sudo")


def require_binaries(names: Sequence[str] = REQUIRED_BINARIES) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise PreflightError(f"missing commands: {', '.join(missing)}; run the install script (scripts/install.sh)")


def ovs_running() -> bool:
    try:
        return run(["ovs-vsctl", "--timeout=3", "show"], check=False, timeout_s=10).returncode == 0
    except PreflightError:
        return False


def ensure_ovs() -> None:
    """Start Open vSwitch when it is not running (without systemd)."""
    if ovs_running():
        return
    if not Path(OVS_CTL).exists():
        raise PreflightError("Open vSwitch is not running and ovs-ctl is missing; run the install script")
    proc = run([OVS_CTL, "start", "--system-id=random"], check=False, timeout_s=60)
    if not ovs_running():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PreflightError(f"Open vSwitch is not running and could not be started: {tail[0]}")


def kernel_datapath_available() -> bool:
    """True where the openvswitch kernel module is loaded or loadable."""
    if Path("/sys/module/openvswitch").exists():
        return True
    if shutil.which("modprobe") and Path("/proc/modules").exists():
        run(["modprobe", "-q", "openvswitch"], check=False, timeout_s=20)
    return Path("/sys/module/openvswitch").exists()


def choose_datapath(requested: str) -> str:
    """'kernel' or 'user' for a requested 'auto' | 'kernel' | 'user'."""
    if requested == "user":
        return "user"
    available = kernel_datapath_available()
    if requested == "kernel" and not available:
        raise PreflightError("the Open vSwitch kernel datapath is not available on this kernel; "
                             "use --datapath user (or auto)")
    return "kernel" if available else "user"


def netem_available(prefix: str = "nk") -> bool:
    """Try a netem qdisc on the loopback of a throw-away namespace named with
    the instance prefix (so that the sweep of that prefix finds it if this
    process dies in between)."""
    ns = f"{prefix}probe{uuid.uuid4().hex[:6]}"
    if run(["ip", "netns", "add", ns], check=False).returncode != 0:
        return False
    try:
        return run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                    "delay", "1ms"], check=False).returncode == 0
    finally:
        run(["ip", "netns", "delete", ns], check=False)


def require_ports_free(*ports: int) -> None:
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                raise PreflightError(f"port {port} on 127.0.0.1 is in use; choose another "
                                     f"(--of-port / --rest-port) or stop what holds it") from None


def ip_forward_enabled() -> bool:
    try:
        return Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
    except OSError:
        return False


def wait_until(predicate, timeout_s: float, interval_s: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def stop_child(proc: "subprocess.Popen[Any]", grace_s: float) -> None:
    """End a child this process started: SIGTERM, then SIGKILL after
    ``grace_s``; reaped either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (state first); [] if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def cpu_ticks(pid: int) -> int | None:
    """User + system CPU time of a process in clock ticks (SC_CLK_TCK); None if gone."""
    fields = _stat_fields(pid)
    try:
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    except (IndexError, ValueError):
        return None


def process_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [p.decode(errors="replace") for p in raw.split(b"\0") if p]


def tcp_congestion_controls() -> list[str]:
    """Congestion control algorithms this kernel offers (empty if unknown)."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
    except OSError:
        return []


def default_tcp_congestion() -> str:
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return ""


def run_many(commands: Sequence[Sequence[str]], *, inputs: Sequence[str | None] | None = None,
             workers: int = 16) -> list[subprocess.CompletedProcess[str]]:
    """Run every command (argv lists, never a shell), ``workers`` at a time;
    their results in order, whatever their exit status."""
    ins = list(inputs) if inputs is not None else [None] * len(commands)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run, argv, check=False, input_text=text) for argv, text in zip(commands, ins)]
        return [f.result() for f in futures]


def check_all(results: list[subprocess.CompletedProcess[str]], what: str) -> None:
    """BringUpError naming the first failed command, if any failed."""
    bad = [r for r in results if r.returncode != 0]
    if bad:
        first = bad[0]
        raise BringUpError(f"{what} failed on {len(bad)} of {len(results)} commands; first: "
                           f"{' '.join(first.args)}: {(first.stderr or first.stdout).strip()[:300]}")
