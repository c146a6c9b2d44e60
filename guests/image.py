"""The guest image: Debian 12 from Debian's packages alone (debootstrap, the
stock kernel), with the files and units that make it run the check's job at
boot; built once per recipe and cached under ``/var/cache/netkv-vm/<key>/``."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from guests.common import GUEST_REPO, GUEST_SHARE, SHARE_TAG, VmCheckError, run, say

DEFAULT_CACHE = Path("/var/cache/netkv-vm")


SUITE = "bookworm"


# What the image holds besides debootstrap's default set.  Changing anything in
# RECIPE (or the files the image gets, IMAGE_FILES) changes the cache key.
INCLUDE = ("linux-image-amd64", "systemd-sysv", "udev", "kmod", "iproute2", "python3",
           "ca-certificates", "procps", "git", "openssh-server")


IMAGE_SIZE = "24G"  # sparse: the file grows with what the guest writes into its overlay


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
