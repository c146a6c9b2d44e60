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
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from guests.common import VmCheckError, run, say, tail
from guests.image import DEFAULT_CACHE, JOB_SH, cached_image
from guests.qemu import Qemu, choose_accel, ensure_host_tools, guest_argv, share_host_cas
from guests.vmguest import DELAY_MS, guest_main, probe_delay, probe_leftovers, probe_rate
from lab.rundir import read_json
from netkv.repo import REPO_ROOT


def host_main(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    if os.geteuid() != 0:
        raise VmCheckError("run as root (debootstrap and the image need it): sudo scripts/vm-check")
    out: dict[str, Any] = {"ok": False, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    commit = run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"]).stdout.strip()
    dirty = bool(run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"]).stdout.strip())
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
        run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", "-o", str(share / "repo.tar"), "HEAD"])
        (share / "job.sh").write_text(JOB_SH)
        out["host_ca_certificates_shared"] = share_host_cas(share)
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
        accel = choose_accel(args.accel, image / "vmlinuz", work, out)
        console, pidfile = work / "console.log", work / "qemu.pid"
        argv = guest_argv(accel, args.cpus, args.memory_mb, image, overlay, share, pidfile, console,
                          ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"])
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
