"""Booting a guest: qemu with KVM where a probe shows it works, else software
emulation; only the pid it wrote is ever signalled."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from guests.common import SHARE_TAG, VmCheckError, run, say

HOST_PACKAGES = {"qemu-system-x86_64": "qemu-system-x86", "qemu-img": "qemu-utils",
                 "debootstrap": "debootstrap", "mke2fs": "e2fsprogs", "git": "git"}


def ensure_host_tools() -> list[str]:
    """Install the Debian packages the host side needs where a command is
    missing; returns the packages installed."""
    missing = sorted({pkg for cmd, pkg in HOST_PACKAGES.items() if shutil.which(cmd) is None})
    if missing:
        say(f"installing host packages: {', '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-q"], env=env)
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env)
    return missing


# -- host: qemu -----------------------------------------------------------------------
class Qemu:
    """One qemu process, known by its pid file; only that pid is signalled."""

    def __init__(self, argv: list[str], pidfile: Path, marker: str) -> None:
        self.pidfile = pidfile
        self.marker = marker  # a path that must be in the process's command line
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        return pid if any(self.marker.encode() in part for part in cmdline) else None

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            if not self.running():
                break
            pid = self.pid() or self.proc.pid  # the pid file names the Popen child itself
            if pid != self.proc.pid:
                raise VmCheckError(f"qemu pid file {self.pidfile} names {pid}, not the process started ({self.proc.pid})")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=wait_s)
        if self.running():
            raise VmCheckError(f"qemu (pid {self.proc.pid}) did not stop")

    def stderr_tail(self) -> str:
        if self.proc.stderr is None or self.running():
            return ""
        return self.proc.stderr.read().decode(errors="replace").strip()[-500:]


def qemu_base(accel: str, cpus: int, memory_mb: int, kernel: Path, pidfile: Path, console: Path,
              append: str) -> list[str]:
    cpu = "host" if accel == "kvm" else "max"
    accel_opt = "kvm" if accel == "kvm" else "tcg"  # multi-threaded TCG where qemu supports it (its default)
    return ["nice", "-n", "10", "qemu-system-x86_64", "-accel", accel_opt, "-cpu", cpu,
            "-smp", str(cpus), "-m", str(memory_mb), "-kernel", str(kernel), "-append", append,
            "-display", "none", "-serial", f"file:{console}", "-monitor", "none", "-no-reboot",
            "-pidfile", str(pidfile)]


def probe_kvm(kernel: Path, work: Path, timeout_s: float = 15.0) -> tuple[bool, str]:
    """Does a KVM guest get through the kernel's early boot here?  Boots the
    kernel with no root file system and waits for it to get far enough to
    look for one (a panic on the missing root is the success signal)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no usable /dev/kvm"
    console, pidfile = work / "kvm-probe.log", work / "kvm-probe.pid"
    q = Qemu(qemu_base("kvm", 1, 256, kernel, pidfile, console, "console=ttyS0 panic=-1"), pidfile, str(pidfile))
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and q.running():
            text = console.read_text(errors="replace") if console.exists() else ""
            if "VFS:" in text or "Kernel panic" in text or "Freeing unused kernel" in text:
                return True, "a KVM guest booted to the root mount"
            time.sleep(0.5)
        if not q.running():
            return False, f"qemu with KVM exited: {q.stderr_tail()[-200:] or 'no message'}"
        return False, f"a KVM guest printed nothing past kernel entry in {timeout_s:g} s"
    finally:
        q.stop(grace_s=2)
        for path in (console, pidfile):
            with contextlib.suppress(OSError):
                path.unlink()


HOST_CA_DIR = Path("/usr/local/share/ca-certificates")


def share_host_cas(share: Path) -> list[str]:
    """Copy the public CA certificates this host trusts locally (not keys) into
    ``share/ca``: a guest reaches the registries the same way and must trust
    the same issuers.  Returns their names."""
    cas = sorted(HOST_CA_DIR.glob("*.crt"))
    if cas:
        (share / "ca").mkdir(exist_ok=True)
        for ca in cas:
            shutil.copy2(ca, share / "ca" / ca.name)
    return [ca.name for ca in cas]


def choose_accel(requested: str, kernel: Path, work: Path, out: dict[str, object]) -> str:
    """'kvm' or 'tcg' for ``--accel``: auto probes KVM (its answer in ``out``)."""
    if requested == "auto":
        ok, why = probe_kvm(kernel, work)
        out["kvm_probe"] = why
        requested = "kvm" if ok else "tcg"
    out["accel"] = requested
    return requested


def guest_argv(accel: str, cpus: int, memory_mb: int, image: Path, disk: Path, share: Path, pidfile: Path,
               console: Path, nets: list[str]) -> list[str]:
    """qemu for one guest of the image: its kernel and initrd, ``disk`` (a
    qcow2 overlay), the share as 9p, and ``nets`` (qemu -netdev/-device words)."""
    argv = qemu_base(accel, cpus, memory_mb, image / "vmlinuz", pidfile, console,
                     "root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=10")
    return argv + ["-initrd", str(image / "initrd.img"),
                   "-drive", f"file={disk},if=virtio,format=qcow2,cache=unsafe", *nets,
                   "-virtfs", f"local,path={share},mount_tag={SHARE_TAG},security_model=none,id=job"]
