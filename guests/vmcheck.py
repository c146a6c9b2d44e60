"""``scripts/vm-check``: the Vagrant path for real, under qemu.

The Vagrant VM (Debian 12, stock kernel) is where the testbed takes the Open
vSwitch *kernel* datapath and netem; development machines here have neither.
Vagrant itself cannot boot a VM here, but qemu can boot Debian's own kernel,
so this builds an equivalent guest from Debian's packages alone and runs the
Vagrantfile's provisioner and the checks inside it:

host (``python3 -m guests.vmcheck``, standard library only, root):
  1. the guest image, built once and cached under ``/var/cache/netkv-vm/<key>/``
     (``key`` = hash of the recipe below): a ``debootstrap`` root file system of
     Debian 12 with the stock ``linux-image-amd64`` kernel, its modules and
     initrd, written into an ext4 image with ``mke2fs -d`` (no loop mount);
  2. a throw-away qcow2 overlay on that image, a shared directory (9p) holding
     ``git archive HEAD`` of this repository and the job script;
  3. ``qemu-system-x86_64`` with KVM when a quick probe boots a kernel with it,
     else software emulation (``-accel tcg -cpu max``), niced, its pid in a pid
     file (only that pid is ever signalled), user-mode networking so that the
     guest reaches the package registries (it NATs only the guest's own
     outbound traffic; the emulated fabric stays in the guest's namespaces);
  4. waits for the guest to power off (or the time limit), prints one JSON
     object, removes the overlay, the share and every process it started.

guest (``python3 -m guests.vmcheck guest``, run by a systemd unit of the image):
  ``bash /vagrant/scripts/install.sh`` as the Vagrantfile's provisioner runs it,
  then ``netkv up --check --json`` on the tiny topology with ``--datapath auto``
  (must choose the kernel datapath), the shaped-link rate check (iperf3), a
  fabric with ``link_delay_ms`` whose ping RTT must show the delay, a short
  ``netkv run``, and ``netkv up`` stopped by ``netkv down`` with nothing left.
  Each step's result goes to ``result.json`` in the share as soon as it is known,
  so a run cut short still reports the steps that finished.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path("/var/cache/netkv-vm")
SUITE = "bookworm"
# What the image holds besides debootstrap's default set.  Changing anything in
# RECIPE (or the files the image gets, IMAGE_FILES) changes the cache key.
INCLUDE = ("linux-image-amd64", "systemd-sysv", "udev", "kmod", "iproute2", "python3",
           "ca-certificates", "procps", "git")
IMAGE_SIZE = "24G"  # sparse: the file grows with what the guest writes into its overlay
HOST_PACKAGES = {"qemu-system-x86_64": "qemu-system-x86", "qemu-img": "qemu-utils",
                 "debootstrap": "debootstrap", "mke2fs": "e2fsprogs", "git": "git"}
SHARE_TAG = "netkvjob"
GUEST_SHARE = "/mnt/netkvjob"
HOST_CA_DIR = "/usr/local/share/ca-certificates"
GUEST_REPO = "/vagrant"  # where the Vagrantfile's synced folder puts the repository

# Files written into the image (path -> (mode, text)).  The unit runs whatever
# job script the host puts into the share, so the image need not change when
# the checks do.
IMAGE_FILES: dict[str, tuple[int, str]] = {
    "/etc/hostname": (0o644, "netkv\n"),
    "/etc/hosts": (0o644, "127.0.0.1 localhost\n127.0.1.1 netkv\n"),
    "/etc/fstab": (0o644, "/dev/vda / ext4 rw,errors=remount-ro 0 1\n"),
    # qemu's user-mode network: DHCP and a DNS forwarder inside qemu itself
    "/etc/systemd/network/20-wired.network": (0o644, "[Match]\nName=eth0 en*\n\n[Network]\nDHCP=ipv4\n"),
    "/etc/resolv.conf": (0o644, "nameserver 10.0.2.3\n"),
    "/usr/local/sbin/netkv-vm-job": (0o755, f"""#!/bin/sh
# Mount the host's share, run its job script, power off (scripts/vm-check).
modprobe -q 9pnet_virtio || true
modprobe -q 9p || true
mkdir -p {GUEST_SHARE}
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 {SHARE_TAG} {GUEST_SHARE}; then
    if [ -f {GUEST_SHARE}/job.sh ]; then
        bash {GUEST_SHARE}/job.sh >{GUEST_SHARE}/job.log 2>&1
    fi
    sync
    umount {GUEST_SHARE} || true
fi
systemctl --no-block poweroff
"""),
    "/etc/systemd/system/netkv-vm-job.service": (0o644, """[Unit]
Description=NetKV vm-check job from the host's share
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/netkv-vm-job
TimeoutStartSec=infinity
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""),
}
# Units enabled (or masked) in the image: the job, DHCP, and no apt timers
# that could take the dpkg lock while install.sh runs.
ENABLE = ("netkv-vm-job.service", "systemd-networkd.service", "systemd-networkd-wait-online.service")
MASK = ("apt-daily.timer", "apt-daily-upgrade.timer", "apt-daily.service", "apt-daily-upgrade.service")

JOB_SH = f"""#!/bin/bash
# Written by scripts/vm-check on the host; runs inside the guest as root.
set -u
echo "job: started $(date -u +%FT%TZ) on $(uname -r)"
# a fresh copy of the repository; a kept overlay (--overlay) keeps its .venv, as
# a Vagrant VM's synced folder does between `vagrant provision` runs
mkdir -p {GUEST_REPO}
find {GUEST_REPO} -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {{}} +
tar -xf {GUEST_SHARE}/repo.tar -C {GUEST_REPO}
# The host's own extra CA certificates (a machine behind an intercepting proxy
# trusts its CA; the guest's traffic leaves through the same way), and pip told
# to use the system store as the host's pip is.
if ls {GUEST_SHARE}/ca/*.crt >/dev/null 2>&1; then
    cp {GUEST_SHARE}/ca/*.crt /usr/local/share/ca-certificates/
    update-ca-certificates >/dev/null 2>&1 || echo "job: update-ca-certificates failed"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >/etc/pip.conf
fi
cd {GUEST_REPO}
exec /usr/bin/python3 -m guests.vmcheck guest --share {GUEST_SHARE}
"""

# Guest check settings.
PREFIXES = {"up_check": "vu", "rate": "vr", "delay": "vd", "run": "vn", "down": "vw"}
DELAY_MS = 5.0
READY_TIMEOUT_S = 300  # software emulation: the controller and Mininet start slowly
RATE_SECONDS = 10
RUN_REQUESTS = 8


def say(text: str) -> None:
    print(f"vm-check: {text}", file=sys.stderr, flush=True)


class VmCheckError(RuntimeError):
    """The check cannot go on; one line for the user."""


# -- host: image ------------------------------------------------------------------
def debian_mirrors() -> tuple[str, str]:
    """(archive URI, security URI) from NETKV_VM_MIRROR / NETKV_VM_SECURITY or
    the host's own apt sources: the guest uses the mirrors this machine uses."""
    mirror, security = os.environ.get("NETKV_VM_MIRROR", ""), os.environ.get("NETKV_VM_SECURITY", "")
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        with contextlib.suppress(OSError):
            texts.append(path.read_text())
    for text in texts:
        for uri in re.findall(r"(?m)^\s*(?:URIs:|deb)\s+(?:\[[^\]]*\]\s+)?(\S+)", text):
            if uri.rstrip("/").endswith("/debian") and not mirror:
                mirror = uri
            elif uri.rstrip("/").endswith("/debian-security") and not security:
                security = uri
    if not mirror:
        raise VmCheckError("no Debian mirror found in /etc/apt; set NETKV_VM_MIRROR (and NETKV_VM_SECURITY)")
    return mirror.rstrip("/"), security.rstrip("/")


def recipe(mirror: str, security: str) -> dict[str, Any]:
    return {"suite": SUITE, "arch": "amd64", "mirror": mirror, "security": security,
            "include": list(INCLUDE), "size": IMAGE_SIZE, "files": IMAGE_FILES,
            "enable": list(ENABLE), "mask": list(MASK), "recipe_version": 1}


def recipe_key(rec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]


def run(argv: Sequence[str], *, timeout_s: float = 3600, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """fabric.system.run on the host, with its failures as VmCheckError and a
    longer default timeout (image builds take many minutes)."""
    from fabric.system import run as system_run

    try:
        return system_run(argv, check=check, timeout_s=timeout_s, env=env)
    except RuntimeError as exc:  # PreflightError is one
        raise VmCheckError(str(exc)) from None


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


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_image_files(rootfs: Path, mirror: str, security: str) -> None:
    for path, (mode, text) in IMAGE_FILES.items():
        target = rootfs / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():
            target.unlink()
        target.write_text(text)
        target.chmod(mode)
    sources = [f"deb {mirror} {SUITE} main", f"deb {mirror} {SUITE}-updates main"]
    if security:
        sources.append(f"deb {security} {SUITE}-security main")
    (rootfs / "etc/apt/sources.list").write_text("\n".join(sources) + "\n")
    systemd_dir = rootfs / "etc/systemd/system"
    for unit in ENABLE:
        if unit == "netkv-vm-job.service":
            src = Path("/etc/systemd/system") / unit
            wants = systemd_dir / "multi-user.target.wants"
        elif unit == "systemd-networkd-wait-online.service":
            src = Path("/lib/systemd/system") / unit
            wants = systemd_dir / "network-online.target.wants"
        else:
            src = Path("/lib/systemd/system") / unit
            wants = systemd_dir / "multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        link = wants / unit
        if not link.is_symlink():
            link.symlink_to(src)
    for unit in MASK:
        link = systemd_dir / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
    # no root password prompt on the serial console matters: nobody logs in
    machine_id = rootfs / "etc/machine-id"
    machine_id.write_text("")  # a fresh id at first boot


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    out = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            point = line.split()[1].replace("\\040", " ")
            if point.startswith(prefix):
                out.append(point)
    return out


def build_image(cache: Path, rec: dict[str, Any], key: str) -> Path:
    """Build the guest image for ``rec`` into ``cache/key`` (atomically)."""
    final = cache / key
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        rootfs = work / "rootfs"
        say(f"building the guest image {key}: debootstrap {SUITE} (a few minutes) ...")
        t0 = time.monotonic()
        run(["nice", "-n", "10", "debootstrap", "--arch=amd64", f"--include={','.join(INCLUDE)}",
             SUITE, str(rootfs), rec["mirror"]], timeout_s=3600)
        say(f"debootstrap done in {time.monotonic() - t0:.0f} s; writing the image")
        left = mounts_under(work)
        if left:
            raise VmCheckError(f"debootstrap left mounts under {work}: {left}")
        write_image_files(rootfs, rec["mirror"], rec["security"])
        with contextlib.suppress(OSError):  # the build's downloaded packages are not needed in the image
            for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
        kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
        initrds = sorted((rootfs / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise VmCheckError("the image has no kernel or initrd in /boot")
        out = work / "image"
        out.mkdir()
        shutil.copy2(kernels[-1], out / "vmlinuz")
        shutil.copy2(initrds[-1], out / "initrd.img")
        run(["nice", "-n", "10", "mke2fs", "-q", "-t", "ext4", "-F", "-L", "netkv-root", "-d", str(rootfs),
             str(out / "rootfs.raw"), IMAGE_SIZE], timeout_s=3600)
        info = {"key": key, "recipe": rec, "kernel": kernels[-1].name.removeprefix("vmlinuz-"),
                "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_s": round(time.monotonic() - t0, 1)}
        (out / "image.json").write_text(json.dumps(info, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        (out).rename(final)
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cached_image(cache: Path, rebuild: bool) -> tuple[Path, dict[str, Any], bool]:
    """(image dir, its image.json, built now?)."""
    mirror, security = debian_mirrors()
    rec = recipe(mirror, security)
    key = recipe_key(rec)
    with locked(cache / ".lock"):
        image = cache / key
        built = False
        if rebuild or not (image / "image.json").is_file():
            image = build_image(cache, rec, key)
            built = True
    return image, json.loads((image / "image.json").read_text()), built


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


def tail(path: Path, lines: int = 20) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def host_main(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    if os.geteuid() != 0:
        raise VmCheckError("run as root (debootstrap and the image need it): sudo scripts/vm-check")
    out: dict[str, Any] = {"ok": False, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    commit = run(["git", "-C", str(ROOT), "rev-parse", "HEAD"]).stdout.strip()
    dirty = bool(run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"]).stdout.strip())
    out["repo"] = {"commit": commit, "uncommitted_changes_not_in_guest": dirty}
    out["host_packages_installed"] = ensure_host_tools()
    cache = Path(args.cache_dir)
    t = time.monotonic()
    image, info, built = cached_image(cache, args.rebuild)
    out["image"] = {"dir": str(image), "key": info["key"], "kernel": info["kernel"], "built_now": built,
                    "build_s": info.get("build_s"), "prepare_s": round(time.monotonic() - t, 1)}
    if args.build_only:
        out["ok"] = True
        out["wall_s"] = round(time.monotonic() - t_start, 1)
        print(json.dumps(out))
        return 0
    work = Path(tempfile.mkdtemp(prefix="netkv-vm-", dir=args.work_parent))
    qemu: Qemu | None = None
    share = work / "share"
    try:
        share.mkdir()
        run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(share / "repo.tar"), "HEAD"])
        (share / "job.sh").write_text(JOB_SH)
        # public CA certificates this host trusts locally (not keys): the guest reaches the
        # registries through the same network and must trust the same issuers
        cas = sorted(Path(HOST_CA_DIR).glob("*.crt"))
        if cas:
            (share / "ca").mkdir()
            for ca in cas:
                shutil.copy2(ca, share / "ca" / ca.name)
        out["host_ca_certificates_shared"] = [ca.name for ca in cas]
        overlay = Path(args.overlay).resolve() if args.overlay else work / "disk.qcow2"
        out["overlay_kept"] = str(overlay) if args.overlay else None
        if args.overlay and overlay.exists():
            backing = json.loads(run(["qemu-img", "info", "--output=json", str(overlay)]).stdout)
            if backing.get("backing-filename") != str(image / "rootfs.raw"):
                raise VmCheckError(f"{overlay} is not an overlay of the current image {image}; remove it")
            say(f"reusing the provisioned guest disk {overlay}")
        else:
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image / "rootfs.raw"), "-F", "raw",
                 str(overlay)])
        if args.accel == "auto":
            ok, why = probe_kvm(image / "vmlinuz", work)
            accel = "kvm" if ok else "tcg"
            out["kvm_probe"] = why
        else:
            accel = args.accel
        out["accel"] = accel
        console, pidfile = work / "console.log", work / "qemu.pid"
        argv = qemu_base(accel, args.cpus, args.memory_mb, image / "vmlinuz", pidfile, console,
                         "root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=10")
        argv += ["-initrd", str(image / "initrd.img"),
                 "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
                 "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
                 "-virtfs", f"local,path={share},mount_tag={SHARE_TAG},security_model=none,id=job"]
        say(f"booting the guest ({accel}, {args.cpus} vCPUs, {args.memory_mb} MiB); console: {console}")
        t_boot = time.monotonic()
        qemu = Qemu(argv, pidfile, str(overlay))
        deadline = t_boot + args.timeout_min * 60
        seen: set[str] = set()
        while qemu.running() and time.monotonic() < deadline:
            time.sleep(5)
            now = read_json(share / "result.json") or {}
            if "guest_started_s" not in out and now:
                out["guest_started_s"] = round(time.monotonic() - t_boot, 1)
            for name, step in (now.get("steps") or {}).items():
                if name not in seen and isinstance(step, dict) and "ok" in step:
                    seen.add(name)
                    say(f"{name}: {'ok' if step['ok'] else 'FAILED'} in {step.get('s')} s")
        out["timed_out"] = qemu.running()
        if qemu.running():
            say(f"time limit ({args.timeout_min} min) reached: stopping qemu (pid {qemu.pid()})")
        qemu.stop()
        out["vm_s"] = round(time.monotonic() - t_boot, 1)
        res = read_json(share / "result.json")
        out["guest"] = res.get("guest") if res else None
        out["steps"] = res.get("steps", {}) if res else {}
        summary = (res or {}).get("summary", {})
        out.update({k: summary.get(k) for k in ("datapath", "rate_ratio", "rtt_ms", "rtt_expected_ms",
                                                 "requests_in", "records_out", "leftovers_guest")})
        names = ("install", "up_check", "rate", "delay", "run", "down", "leftovers")
        out["steps_passed"] = [n for n in names if (out["steps"].get(n) or {}).get("ok")]
        out["ok"] = len(out["steps_passed"]) == len(names)
        if not out["ok"]:
            out["console_tail"] = tail(console, 15)
            out["job_log_tail"] = tail(share / "job.log", 25)
            if not qemu.running() and qemu.proc.returncode not in (0, None):
                out["qemu_stderr"] = qemu.stderr_tail()
        if args.keep_logs:
            keep = Path(args.keep_logs)
            keep.mkdir(parents=True, exist_ok=True)
            for f in (console, share / "job.log", share / "install.log", share / "result.json"):
                if f.exists():
                    shutil.copy2(f, keep / f.name)
    finally:
        if qemu is not None and qemu.running():
            qemu.stop()
        shutil.rmtree(work, ignore_errors=True)
    left: list[str] = []
    if work.exists():
        left.append(str(work))
    if qemu is not None and qemu.running():
        left.append(f"qemu pid {qemu.proc.pid}")
    left += [str(p) for p in cache.glob(".build-*")]
    out["leftovers_host"] = len(left)
    if left:
        out["leftovers_host_items"] = left
        out["ok"] = False
    out["wall_s"] = round(time.monotonic() - t_start, 1)
    print(json.dumps(out))
    return 0 if out["ok"] else 1


# -- guest -------------------------------------------------------------------------------
class GuestResult:
    """result.json in the share, rewritten after every step."""

    def __init__(self, share: Path) -> None:
        self.path = share / "result.json"
        self.data: dict[str, Any] = {"guest": {}, "steps": {}, "summary": {}}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.path)


def run_step(argv: Sequence[str], timeout_s: float, cwd: str = GUEST_REPO,
             log: Path | None = None) -> tuple[int, str, str, float]:
    """(exit status, stdout, stderr, seconds); a step past its time is ended
    with its whole process group.  With ``log``, the output goes to that file
    as it comes (the host can follow it in the share) and is returned as stdout."""
    t = time.monotonic()
    sink = open(log, "w") if log is not None else None
    proc = subprocess.Popen(list(argv), stdout=sink or subprocess.PIPE,
                            stderr=subprocess.STDOUT if sink else subprocess.PIPE, text=True, cwd=cwd,
                            start_new_session=True)
    rc = -9
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr = (stderr or "") + f"\n[vm-check: ended after {timeout_s:g} s]"
    finally:
        if sink is not None:
            sink.close()
    if log is not None:
        stdout = log.read_text(errors="replace")
    return rc, stdout or "", stderr or "", time.monotonic() - t


def last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                if isinstance(data, dict):
                    return data
    return None


def guest_facts() -> dict[str, Any]:
    def read(path: str) -> str:
        with contextlib.suppress(OSError):
            return Path(path).read_text().strip()
        return ""

    subprocess.run(["modprobe", "-q", "openvswitch"], check=False)
    ns = "vmcheckprobe"
    subprocess.run(["ip", "netns", "add", ns], check=False)
    netem = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                            "delay", "1ms"], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "delete", ns], check=False)
    return {"kernel": os.uname().release, "openvswitch_module": Path("/sys/module/openvswitch").exists(),
            "netem": netem, "tcp_congestion": read("/proc/sys/net/ipv4/tcp_congestion_control"),
            "cpus": os.cpu_count(), "os": read("/etc/debian_version")}


def guest_main(share: Path) -> int:
    res = GuestResult(share)
    t0 = time.monotonic()
    res.data["guest"] = guest_facts()
    res.save()
    steps, summary = res.data["steps"], res.data["summary"]
    venv = Path(GUEST_REPO) / ".venv/bin"
    netkv = str(venv / "netkv")
    py = str(venv / "python")

    def record(name: str, ok: bool, seconds: float, /, **extra: Any) -> bool:
        steps[name] = {"ok": bool(ok), "s": round(seconds, 1), **extra}
        res.save()
        return ok

    def failed_detail(rc: int, stdout: str, stderr: str) -> dict[str, Any]:
        return {"exit": rc, "stderr_tail": stderr.strip().splitlines()[-8:],
                "stdout_tail": stdout.strip().splitlines()[-4:]}

    # 1. the Vagrantfile's provisioner: privileged shell, `bash /vagrant/scripts/install.sh`
    rc, stdout, stderr, s = run_step(["bash", f"{GUEST_REPO}/scripts/install.sh"], timeout_s=150 * 60, cwd="/",
                                     log=share / "install.log")
    if not record("install", rc == 0, s, exit=rc, output=stdout.strip().splitlines()[-(6 if rc == 0 else 16):]):
        res.data["total_s"] = round(time.monotonic() - t0, 1)
        res.save()
        return 1
    common = ["--topology", "tiny", "--ready-timeout-s", str(READY_TIMEOUT_S)]

    # 2. netkv up --check --json with --datapath auto: the kernel datapath must be chosen
    rc, stdout, stderr, s = run_step([netkv, "up", *common, "--datapath", "auto", "--check", "--json",
                                      "--prefix", PREFIXES["up_check"]], timeout_s=900)
    rep = last_json(stdout) or {}
    summary["datapath"] = rep.get("datapath")
    record("up_check", rc == 0 and rep.get("datapath") == "kernel" and rep.get("pings_ok") == rep.get("pings_total"),
           s, datapath=rep.get("datapath"), switch_mode=rep.get("switch_mode"), up_s=rep.get("up_s"),
           pings=f"{rep.get('pings_ok')}/{rep.get('pings_total')}", tcp_congestion=rep.get("tcp_congestion"),
           steps_s=rep.get("steps_s"), **({} if rc == 0 else failed_detail(rc, stdout, stderr)))

    # 3. the shaped-link rate check, and 4. the delay check (probes below, in the venv)
    for name, extra in (("rate", []), ("delay", ["--delay-ms", f"{DELAY_MS:g}"])):
        rc, stdout, stderr, s = run_step([py, "-m", "guests.vmcheck", f"probe-{name}",
                                          "--prefix", PREFIXES[name], *extra], timeout_s=900)
        probe = last_json(stdout) or {}
        if name == "rate":
            summary["rate_ratio"] = probe.get("ratio")
        else:
            summary["rtt_ms"] = probe.get("rtt_avg_ms")
            summary["rtt_expected_ms"] = probe.get("expected_rtt_ms")
        passed = bool(probe.pop("ok", False))
        record(name, rc == 0 and passed, s, **probe,
               **({} if rc == 0 else failed_detail(rc, stdout, stderr)))

    # 5. a short netkv run on the tiny topology: every request in has its record out
    run_out = Path("/root/vm-check-run")
    shutil.rmtree(run_out, ignore_errors=True)
    rc, stdout, stderr, s = run_step([netkv, "run", *common, "--prefix", PREFIXES["run"], "--scenario", "none",
                                      "--schedulers", "round_robin", "--max-requests", str(RUN_REQUESTS),
                                      "--duration-s", "20", "--out", str(run_out), "--quiet",
                                      # workers start ten times slower under software emulation
                                      "--set", f"startup_timeout_s={READY_TIMEOUT_S}"], timeout_s=1500)
    comparison = last_json(stdout) or {}
    m = (comparison.get("schedulers") or {}).get("round_robin") or {}
    records_path = run_out / "round_robin" / "records.jsonl"
    records_out = len(records_path.read_text().splitlines()) if records_path.is_file() else 0
    requests_in = m.get("requests_expected", m.get("requests"))
    summary["requests_in"], summary["records_out"] = requests_in, records_out
    record("run", rc == 0 and requests_in == RUN_REQUESTS and records_out == requests_in and m.get("ok") == requests_in,
           s, requests_in=requests_in, records_out=records_out, requests_ok=m.get("ok"),
           ttft_mean_ms=m.get("ttft_mean_ms"), failure_reasons=m.get("failure_reasons"),
           **({} if rc == 0 else failed_detail(rc, stdout, stderr)))

    # 6. netkv up (foreground), stopped from outside by netkv down
    t = time.monotonic()
    prefix = PREFIXES["down"]
    up_log = Path("/root/vm-check-up.log")
    with open(up_log, "w") as log:
        up = subprocess.Popen([netkv, "up", *common, "--prefix", prefix], stdout=log, stderr=subprocess.STDOUT,
                              cwd=GUEST_REPO, start_new_session=True)
    deadline = time.monotonic() + 900
    while "running;" not in up_log.read_text() and up.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
    seen = up_log.read_text()
    running = "running;" in seen
    rc, stdout, stderr, _ = run_step([netkv, "down", "--prefix", prefix], timeout_s=300)
    try:
        up_rc: int | None = up.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(up.pid, signal.SIGKILL)
        up_rc = None
    record("down", running and rc == 0 and "nothing left" in stdout and up_rc == 0, time.monotonic() - t,
           was_running=running, down_said=stdout.strip(), up_exit=up_rc,
           up_said=seen.strip().splitlines()[-3:])

    # 7. nothing of any prefix left anywhere in the guest
    rc, stdout, stderr, s = run_step([py, "-m", "guests.vmcheck", "probe-leftovers",
                                      "--prefix", *PREFIXES.values()], timeout_s=300)
    left = last_json(stdout) or {}
    summary["leftovers_guest"] = left.get("total")
    record("leftovers", rc == 0 and left.get("total") == 0, s, **left)
    res.data["total_s"] = round(time.monotonic() - t0, 1)
    res.save()
    return 0


# -- guest probes (run with the project's venv: they import the testbed) ------------------
def _ping_stats(output: str) -> dict[str, float]:
    """min/avg/max of ping's summary line, ms."""
    match = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/", output)
    if not match:
        return {}
    return {"min": float(match[1]), "avg": float(match[2]), "max": float(match[3])}


def probe_rate(prefix: str) -> dict[str, Any]:
    from fabric.config import TestbedConfig
    from fabric.net import Testbed
    from fabric.system import run as trun

    tb = Testbed(TestbedConfig(topology="tiny", prefix=prefix, ready_timeout_s=READY_TIMEOUT_S))
    src, dst = "g0", "g2"
    try:
        rep = tb.up()
        configured = tb.topo.bottleneck_gbps(src, dst) * 1000 / tb.config.scale
        ping = _ping_stats(trun(tb.in_host(src, ["ping", "-n", "-q", "-c", "5", "-i", "0.2",
                                                 tb.topo.ip_of(dst)]), check=False).stdout)
        server = tb.popen(dst, ["iperf3", "-s", "-1", "-B", tb.topo.ip_of(dst)], kind="iperf3",
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            out = trun(tb.in_host(src, ["iperf3", "-c", tb.topo.ip_of(dst), "-t", str(RATE_SECONDS), "-J"]),
                       timeout_s=RATE_SECONDS + 60).stdout
        finally:
            server.kill()
            server.wait()
        measured = float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e6
        ratio = measured / configured
        return {"ok": 0.90 <= ratio <= 1.05, "datapath": rep.datapath, "path": f"{src}->{dst}",
                "configured_mbps": round(configured, 3), "measured_mbps": round(measured, 3),
                "ratio": round(ratio, 3), "base_rtt_avg_ms": ping.get("avg"), "iperf_s": RATE_SECONDS}
    finally:
        tb.down()


def probe_delay(prefix: str, delay_ms: float) -> dict[str, Any]:
    from fabric.config import TestbedConfig
    from fabric.net import Testbed
    from fabric.system import run as trun

    tb = Testbed(TestbedConfig(topology="tiny", prefix=prefix, link_delay_ms=delay_ms,
                               ready_timeout_s=READY_TIMEOUT_S))
    src, dst = "g0", "g2"
    try:
        rep = tb.up()
        links = len(tb.topo.path(src, dst)) - 1
        # every link delays at the egress of the end that sends: once per link each way
        expected = 2 * links * delay_ms
        out = trun(tb.in_host(src, ["ping", "-n", "-q", "-c", "10", "-i", "0.2", tb.topo.ip_of(dst)]),
                   check=False).stdout
        ping = _ping_stats(out)
        qdisc = trun(tb.in_host(src, ["tc", "qdisc", "show", "dev", tb.intf(src, 1)]), check=False).stdout
        avg, low = ping.get("avg"), ping.get("min")
        # The minimum RTT is the delay plus the least overhead: it must hold the configured
        # delay and not much more. The average also carries the emulation's scheduling
        # noise (8-18 ms over the minimum in a TCG guest), so it is reported, not bounded.
        ok = avg is not None and low is not None and expected <= low <= expected * 1.25 + 5.0
        return {"ok": ok, "datapath": rep.datapath, "path": f"{src}->{dst}", "links": links,
                "link_delay_ms": delay_ms, "expected_rtt_ms": expected, "rtt_min_ms": low, "rtt_avg_ms": avg,
                "rtt_max_ms": ping.get("max"), "netem_on_host_end": "netem" in qdisc}
    finally:
        tb.down()


def probe_leftovers(prefixes: Sequence[str]) -> dict[str, Any]:
    """What any of the prefixes left, by the testbed's own account and by a look
    at the whole guest (bridges, namespaces, veths, processes)."""
    from fabric import cleanup
    from fabric.system import run as trun

    per_prefix = {p: cleanup.leftovers(p).total for p in prefixes}
    bridges = [b for b in trun(["ovs-vsctl", "--timeout=10", "list-br"], check=False).stdout.split() if b]
    netns = [line.split()[0] for line in trun(["ip", "netns", "list"], check=False).stdout.splitlines() if line.strip()]
    links = [line.split(":")[1].strip().split("@")[0] for line in
             trun(["ip", "-o", "link", "show"], check=False).stdout.splitlines()]
    veths = [name for name in links if any(name.startswith(p) for p in prefixes)]
    procs = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmd = entry.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "-m controller" in cmd or "/run/netkv/" in cmd or "mininet:" in cmd or "iperf3" in cmd \
                    or "workers." in cmd:
                procs.append(cmd.strip()[:120])
    total = sum(per_prefix.values()) + len(bridges) + len(netns) + len(veths) + len(procs)
    return {"total": total, "per_prefix_total": per_prefix,
            "bridges": bridges, "namespaces": netns, "veths": veths, "processes": procs,
            "ovs_system_datapath": "ovs-system" in links}


# -- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="vm-check",
        description="Build (once, cached) a Debian 12 guest from Debian's packages, boot it with qemu, "
                    "provision it with scripts/install.sh as the Vagrantfile does, and check the kernel "
                    "datapath, shaping, netem delay, a short run and teardown inside it. Prints one JSON "
                    "object. Needs root; takes long under software emulation.")
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="guest image cache (default: %(default)s)")
    ap.add_argument("--work-parent", default="/var/tmp", help="where the run's temporary directory goes")
    ap.add_argument("--rebuild", action="store_true", help="build the guest image again even if cached")
    ap.add_argument("--build-only", action="store_true", help="build or find the image, boot nothing")
    ap.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                    help="auto: KVM if a quick probe boots a kernel with it, else software emulation")
    ap.add_argument("--cpus", type=int, default=2, help="guest vCPUs (default: %(default)s)")
    ap.add_argument("--memory-mb", type=int, default=4096, help="guest memory (default: %(default)s)")
    ap.add_argument("--timeout-min", type=float, default=150, help="stop the guest after this long")
    ap.add_argument("--overlay", metavar="FILE",
                    help="keep the guest's disk (a qcow2 overlay on the cached image) in FILE and reuse it "
                         "next time, like a Vagrant VM that is provisioned again (install.sh then has "
                         "little to do); default: a throw-away overlay, removed at the end")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy the console log, job log and result here")
    sub = ap.add_subparsers(dest="mode")
    g = sub.add_parser("guest", help="(inside the guest) run the checks")
    g.add_argument("--share", required=True)
    for name in ("probe-rate", "probe-delay"):
        p = sub.add_parser(name, help="(inside the guest) one check on a fabric of its own")
        p.add_argument("--prefix", required=True)
        if name == "probe-delay":
            p.add_argument("--delay-ms", type=float, default=DELAY_MS)
    p = sub.add_parser("probe-leftovers", help="(inside the guest) what the prefixes left")
    p.add_argument("--prefix", nargs="+", required=True)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    probes: dict[str, Callable[[], dict[str, Any]]] = {
        "probe-rate": lambda: probe_rate(args.prefix),
        "probe-delay": lambda: probe_delay(args.prefix, args.delay_ms),
        "probe-leftovers": lambda: probe_leftovers(args.prefix),
    }
    try:
        if args.mode == "guest":
            return guest_main(Path(args.share))
        if args.mode in probes:
            out = probes[args.mode]()
            print(json.dumps(out))
            return 0 if out.get("ok", out.get("total") == 0) else 1
        return host_main(args)
    except VmCheckError as exc:
        print(f"vm-check: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
