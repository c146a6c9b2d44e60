#!/usr/bin/env bash
# Install what the NetKV testbed needs, and only what is missing.  Idempotent:
# a second run changes nothing and says so.  Used by the README, .ci/run and
# the Vagrantfile alike.  Needs root on Debian 12 (or a Debian-12-like system).
#
#   bash scripts/install.sh          install / check
#   NETKV_SKIP_APT=1 bash ...         skip the Debian package step (already done)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
changed=0
say() { printf 'install: %s\n' "$*"; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo bash scripts/install.sh): it installs Debian packages and starts Open vSwitch"

# 1. Debian packages.  Mininet 2.3.0 from Debian installs mnexec and the mininet
#    module for /usr/bin/python3; openvswitch-switch brings ovs-vswitchd/ovsdb;
#    libjemalloc2 for the switch processes when asked for (switch_jemalloc).
#    prometheus and chromium: the telemetry inspection tests start their own
#    (loopback-only) Prometheus server and headless Chromium.  python3-simgrid:
#    the simulator engine's flow-level network (`netkv simulate`, sim/); Debian
#    12 pins it at 3.32, prebuilt for its Python 3.11, and the venv sees it
#    through its system site packages (PyPI's simgrid is a long source build).
#    openssh-client and sudo: a testbed on several servers (--servers) goes
#    through Mininet Cluster Edition, which reaches every other server by ssh
#    and runs each command there under `sudo -E`, as root too.
packages=(mininet openvswitch-switch iperf3 ethtool iputils-ping iproute2 net-tools
          python3-venv python3-pip ruby procps libjemalloc2 prometheus chromium python3-simgrid
          openssh-client sudo)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ] && [ "${NETKV_SKIP_APT:-0}" != "1" ]; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # Do not start services from maintainer scripts in containers/CI without systemd.
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    changed=1
elif [ "${#missing[@]}" -gt 0 ]; then
    die "missing Debian packages: ${missing[*]}"
fi

# 1b. Debian's prometheus package runs a service on 0.0.0.0:9090 where apt may
#    start services; the testbed wants none: tests start their own on 127.0.0.1.
if [ -x /etc/init.d/prometheus ] || [ -f /lib/systemd/system/prometheus.service ]; then
    if [ -d /run/systemd/system ]; then
        if systemctl is-enabled -q prometheus 2>/dev/null || systemctl is-active -q prometheus 2>/dev/null; then
            say "stopping and disabling the packaged prometheus service (tests start their own on 127.0.0.1)"
            systemctl disable --now -q prometheus || die "could not stop the packaged prometheus service"
            changed=1
        fi
    elif [ -x /etc/init.d/prometheus ] && /etc/init.d/prometheus status >/dev/null 2>&1; then
        say "stopping the packaged prometheus service (tests start their own on 127.0.0.1)"
        /etc/init.d/prometheus stop >/dev/null || die "could not stop the packaged prometheus service"
        update-rc.d prometheus disable >/dev/null 2>&1 || true
        changed=1
    fi
fi

# 2. Open vSwitch, started without systemd when it is not running.
if ! ovs-vsctl --timeout=3 show >/dev/null 2>&1; then
    say "starting Open vSwitch"
    /usr/share/openvswitch/scripts/ovs-ctl start --system-id=random >/dev/null 2>&1 || true
    ovs-vsctl --timeout=5 show >/dev/null 2>&1 || die "Open vSwitch did not start (see /var/log/openvswitch/)"
    changed=1
fi

# 3. The virtual environment.  It must be made from Debian's /usr/bin/python3
#    with system site packages: that interpreter is the one Debian's mininet
#    package installs its Python module for.
venv="$here/.venv"
if ! "$venv/bin/python" -c 'import mininet.net' >/dev/null 2>&1; then
    say "creating $venv from /usr/bin/python3 (with system site packages, for Mininet)"
    rm -rf "$venv"
    /usr/bin/python3 -m venv --system-site-packages "$venv"
    changed=1
fi

# 4. Pinned Python requirements and the project itself (editable: the `netkv`
#    console command runs the code in this checkout).
stamp="$venv/.netkv-install-stamp"
want="$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ ! -x "$venv/bin/netkv" ]; then
    say "installing pinned Python requirements into .venv"
    log="$(mktemp)"
    pip_in_venv() {
        "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1 \
            || { grep -v "^WARNING: Location" "$log" | tail -20 >&2; die "pip install $* failed"; }
    }
    pip_in_venv -r requirements.txt
    pip_in_venv --no-deps --no-build-isolation -e .
    rm -f "$log"
    "$venv/bin/python" -c 'import os_ken, mininet.net, cli.main' \
        || die "the virtual environment is incomplete after installing requirements"
    # The project's top-level packages must be this checkout's, from any working
    # directory (a system package of the same name, e.g. Debian's python3-fabric,
    # would otherwise shadow one of them for the `netkv` command).
    (cd / && "$venv/bin/python" -c 'import sys, pathlib
root = pathlib.Path(sys.argv[1]).resolve()
for name in ("topologies", "netkv", "controller", "workers", "fabric", "lab", "guests", "cli", "bench"):
    where = pathlib.Path(__import__(name).__file__).resolve()
    if root not in where.parents:
        sys.exit(f"the package {name!r} resolves to {where}, not to this checkout: remove the package that shadows it")' "$here") \
        || die "the project's packages are shadowed by others of the same name (see above)"
    echo "$want" > "$stamp"
    changed=1
fi

if [ "$changed" -eq 0 ]; then
    say "nothing to do: packages, Open vSwitch, .venv and requirements are in place"
else
    say "done"
fi
