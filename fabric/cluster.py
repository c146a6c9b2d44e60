"""Past one machine: the servers of a testbed, where each node of the fabric
runs, the links that cross machines, and the checks made before anything is
built (docs/design.md, "Past one machine (Mininet Cluster Edition)").

Pure logic, no Mininet and no root: a ``Server`` record and the ``--servers``
syntax; :func:`place` (whole pods on one worker each, the core switches on
the head, refused in one line when it cannot fit); :func:`crossing_links` and
the MTU rule for their GRE tunnels; the clock-offset arithmetic over round
trips (:class:`ClockSample`, :func:`clock_offset`, :func:`check_clocks`); and
the preflight :func:`check_servers`, whose command runner and clock probe are
arguments so that its logic can be tested here with canned answers.

One server (the default: ``servers`` empty, or one entry) is the testbed as it
has always been: nothing here is used then.  The bring-up on several servers
through Mininet Cluster Edition uses this plan: :mod:`fabric.remote` and
:mod:`fabric.net`; ``scripts/cluster-check`` runs it in two qemu guests.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from netkv.repo import REPO_ROOT
from netkv.serving.config import emulated_mbps
from topologies import Link, Topology

HEAD, WORKER = "head", "worker"
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
SERVERS_SYNTAX = "NAME=IPV4[,NAME=IPV4...], the head first (e.g. head=10.0.0.1,s1=10.0.0.2)"

# Most GPU hosts one server is given by default: the default 64-GPU fabric is
# what one 2-core machine runs inside the envelope (docs/design.md, "Envelope").
DEFAULT_MAX_GPUS = 64
# The management network's MTU where a server's entry does not say.
DEFAULT_MGMT_MTU_BYTES = 1500

# A link that crosses machines is a kernel ``gretap`` device at each end, as
# Mininet Cluster Edition's RemoteGRELink makes it (``ip link add NAME type
# gretap local A remote B ttl 64 key K``): it carries the emulated link's whole
# Ethernet frame, and always with a key.  What each packet gains on the wire:
OUTER_IPV4_BYTES = 20  # the outer IPv4 header (no options)
GRE_BASE_BYTES = 4  # GRE flags, version and protocol type
GRE_KEY_BYTES = 4  # the key field, present because MCE always sets a key
INNER_ETHERNET_BYTES = 14  # gretap, not plain GRE: the inner frame keeps its Ethernet header (no VLAN tag here)
GRETAP_OVERHEAD_BYTES = OUTER_IPV4_BYTES + GRE_BASE_BYTES + GRE_KEY_BYTES + INNER_ETHERNET_BYTES  # 42

# A replay's timestamps from several servers are put on the head's clock; it is
# refused when a server's offset is known less well than this.  2 ms is below
# one 1,514-byte frame's serialisation at one hop of the slowest default link
# (2.4 ms at 5 Mbit/s), the smallest delay the emulation itself reports, and
# about 7% of a 30 ms transfer's ideal time.
MAX_CLOCK_UNCERTAINTY_S = 0.002
CLOCK_SAMPLES = 16  # round trips per server; the one with the smallest round trip is kept
SSH_CONNECT_TIMEOUT_S = 5
COMMAND_TIMEOUT_S = 30.0
# Every ssh the testbed runs: batch mode (a key, never a password prompt), a
# bounded connect, the host key already known.
SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}",
               "-o", "StrictHostKeyChecking=yes")


class ClusterError(ValueError):
    """The servers, the placement or a crossing link's MTU is wrong; one line."""


# -- servers ------------------------------------------------------------------------
@dataclass(frozen=True)
class Server:
    """One machine of the testbed: its name, its management IPv4 address, and
    its role (the first server is the head: controller, replay driver, REST API
    and the core switches; the others are workers that hold whole pods)."""

    name: str
    address: str
    role: str
    mgmt_mtu_bytes: int = DEFAULT_MGMT_MTU_BYTES
    max_gpus: int = DEFAULT_MAX_GPUS

    def to_json(self) -> dict[str, Any]:
        """The entry of the ``servers`` section (the role is its position)."""
        return {"name": self.name, "address": self.address, "mgmt_mtu_bytes": self.mgmt_mtu_bytes,
                "max_gpus": self.max_gpus}

    @property
    def label(self) -> str:
        return f"{self.name} ({self.address})"


SERVER_KEYS = ("name", "address", "mgmt_mtu_bytes", "max_gpus")


def parse_servers(text: str) -> list[Server]:
    """``head=10.0.0.1,s1=10.0.0.2`` -> servers, the first the head.  Each entry
    has the defaults for its MTU and GPU limit; a ``servers`` section in a
    saved configuration may set them per server."""
    if not text.strip():
        raise ClusterError(f"--servers is empty; expected {SERVERS_SYNTAX}")
    items: list[dict[str, Any]] = []
    for entry in text.split(","):
        name, sep, address = entry.strip().partition("=")
        if not sep or not name.strip() or not address.strip():
            raise ClusterError(f"--servers entry {entry.strip()!r} is not NAME=IPV4; expected {SERVERS_SYNTAX}")
        items.append({"name": name.strip(), "address": address.strip()})
    return servers_from_json(items)


def servers_from_json(items: object) -> list[Server]:
    """The ``servers`` section of a testbed configuration (a JSON array of
    objects with ``name``, ``address`` and optionally ``mgmt_mtu_bytes`` and
    ``max_gpus``), checked.  An empty array is one machine, as without it."""
    if not isinstance(items, list):
        raise ClusterError(f"servers must be a JSON array of {{name, address}} objects, got {items!r}")
    out: list[Server] = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ClusterError(f"servers[{i}] must be an object with name and address, got {item!r}")
        unknown = sorted(set(item) - set(SERVER_KEYS), key=str)
        if unknown:
            raise ClusterError(f"servers[{i}]: unknown key {unknown[0]!r}; known: {', '.join(SERVER_KEYS)}")
        name, address = item.get("name"), item.get("address")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ClusterError(f"server name must be a lowercase letter then up to 11 lowercase letters or "
                               f"digits, got {name!r}")
        mtu = item.get("mgmt_mtu_bytes", DEFAULT_MGMT_MTU_BYTES)
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not 576 <= mtu <= 65535:
            raise ClusterError(f"server {name}: mgmt_mtu_bytes must be a whole number 576 .. 65535, got {mtu!r}")
        max_gpus = item.get("max_gpus", DEFAULT_MAX_GPUS)
        if isinstance(max_gpus, bool) or not isinstance(max_gpus, int) or max_gpus < 1:
            raise ClusterError(f"server {name}: max_gpus must be a whole number >= 1, got {max_gpus!r}")
        out.append(Server(name, check_address(name, address), HEAD if i == 0 else WORKER, mtu, max_gpus))
    for kind in ("name", "address"):
        seen: set[str] = set()
        for server in out:
            value = getattr(server, kind)
            if value in seen:
                raise ClusterError(f"servers: {kind} {value!r} is given twice")
            seen.add(value)
    if len(out) > 1:
        for server in out:
            if ipaddress.IPv4Address(server.address).is_loopback:
                raise ClusterError(f"server {server.name}: {server.address} is a loopback address; with more "
                                   f"than one server each needs its management address")
    return out


def check_address(name: str, address: object) -> str:
    """A server's management address: one IPv4 unicast address.  IPv4 only
    because MCE's RemoteGRELink makes IPv4 ``gretap`` tunnels."""
    try:
        ip = ipaddress.IPv4Address(address if isinstance(address, str) else "")
    except ipaddress.AddressValueError:
        raise ClusterError(f"server {name}: address must be an IPv4 address like 10.0.0.2 (GRE tunnels "
                           f"are made over IPv4), got {address!r}") from None
    if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise ClusterError(f"server {name}: {address} is not the address of one machine")
    return str(ip)


def servers_to_json(servers: Sequence[Server]) -> list[dict[str, Any]]:
    return [s.to_json() for s in servers]


# -- placement ------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """Which server runs each node of the topology (GPU hosts and switches)."""

    servers: tuple[Server, ...]
    server_of: Mapping[str, str]  # node name -> server name
    pod_server: Mapping[int, str]  # pod -> server name

    def nodes_on(self, server: str) -> list[str]:
        return [n for n, s in self.server_of.items() if s == server]

    def gpus_on(self, topo: Topology, server: str) -> int:
        return sum(1 for n in self.nodes_on(server) if topo.node(n).is_gpu)

    def summary(self, topo: Topology) -> list[dict[str, Any]]:
        """Per server: role, pods, GPU hosts and switches placed there."""
        return [{"server": s.name, "address": s.address, "role": s.role,
                 "pods": sorted(p for p, name in self.pod_server.items() if name == s.name),
                 "gpus": self.gpus_on(topo, s.name),
                 "switches": sum(1 for n in self.nodes_on(s.name) if not topo.node(n).is_gpu)}
                for s in self.servers]


def place(topo: Topology, servers: Sequence[Server]) -> Placement:
    """Whole pods on workers, the core on the head.

    Every node of pod ``p`` (its GPU hosts, server, ToR and aggregation
    switches) goes to one worker, so only the aggregation-to-core links cross
    machines; the nodes of no pod (the core switches) go to the head.  Pods are
    taken in order, each to the worker holding the fewest GPU hosts so far that
    still has room for it under its ``max_gpus`` (the first such in the list on
    a tie), which spreads equal pods evenly.  One server holds everything, as
    on one machine, with no limit.  ClusterError when a pod fits on no worker."""
    if not servers:
        raise ClusterError("place: no servers given")
    head = servers[0]
    if len(servers) == 1:
        return Placement(tuple(servers), {n: head.name for n in topo.nodes}, {})
    pods: dict[int, list[str]] = {}
    server_of: dict[str, str] = {}
    for node in topo.nodes.values():
        if node.pod is None:
            if node.is_gpu or node.tier != 3:
                raise ClusterError(f"place: {node.name} belongs to no pod and is not a core switch")
            server_of[node.name] = head.name
        else:
            pods.setdefault(node.pod, []).append(node.name)
    workers = list(servers[1:])
    used = {w.name: 0 for w in workers}
    pod_server: dict[int, str] = {}
    for pod in sorted(pods):
        size = sum(1 for n in pods[pod] if topo.node(n).is_gpu)
        room = [w for w in workers if used[w.name] + size <= w.max_gpus]
        if not room:
            sizes = sorted({sum(1 for n in names if topo.node(n).is_gpu) for names in pods.values()})
            raise ClusterError(
                f"placement does not fit: {len(topo.gpus)} GPUs in {len(pods)} pods of "
                f"{'/'.join(str(s) for s in sizes)} GPUs, whole pods only, on "
                f"{', '.join(f'{w.name} (max_gpus {w.max_gpus})' for w in workers)}: pod {pod} fits on "
                f"no worker; add workers or raise max_gpus in the servers section")
        chosen = min(room, key=lambda w: used[w.name])  # min keeps the first on a tie
        used[chosen.name] += size
        pod_server[pod] = chosen.name
        for name in pods[pod]:
            server_of[name] = chosen.name
    return Placement(tuple(servers), server_of, pod_server)


# -- links that cross machines ----------------------------------------------------------
def max_inner_mtu_bytes(underlay_mtu_bytes: int) -> int:
    """The largest emulated-link MTU a keyed gretap tunnel carries over a
    management network of ``underlay_mtu_bytes`` without fragmenting."""
    return underlay_mtu_bytes - GRETAP_OVERHEAD_BYTES


def check_tunnel_mtu(inner_mtu_bytes: int, underlay_mtu_bytes: int, where: str) -> None:
    """ClusterError unless a packet of ``inner_mtu_bytes`` (the emulated link's
    IP MTU) still fits in one management-network packet once tunnelled: inner
    MTU + 14 (inner Ethernet) + 4 + 4 (GRE, key) + 20 (outer IPv4) <= underlay MTU."""
    limit = max_inner_mtu_bytes(underlay_mtu_bytes)
    if inner_mtu_bytes > limit:
        raise ClusterError(
            f"{where}: mtu_bytes {inner_mtu_bytes} would fragment in its gretap tunnel: {inner_mtu_bytes} + "
            f"{GRETAP_OVERHEAD_BYTES} bytes of tunnel overhead > the management MTU {underlay_mtu_bytes}; "
            f"use mtu_bytes <= {limit} or a management network with MTU >= "
            f"{inner_mtu_bytes + GRETAP_OVERHEAD_BYTES}")


@dataclass(frozen=True)
class CrossingLink:
    """A link of the topology whose two ends run on different servers: a
    keyed gretap tunnel between their management addresses, its two ends named
    as the emulated link's interfaces, shaped with htb at both ends."""

    lower: str
    upper: str
    lower_server: Server
    upper_server: Server
    lower_intf: str
    upper_intf: str
    gre_key: int
    mtu_bytes: int
    rate_mbps: float

    @property
    def tunnel(self) -> str:
        return (f"gretap key {self.gre_key} {self.lower_server.address} ({self.lower_intf}) <-> "
                f"{self.upper_server.address} ({self.upper_intf})")

    def to_json(self) -> dict[str, Any]:
        return {"link": f"{self.lower}-{self.upper}",
                "servers": [self.lower_server.name, self.upper_server.name],
                "tunnel": self.tunnel, "gre_key": self.gre_key, "mtu_bytes": self.mtu_bytes,
                "underlay_mtu_bytes": min(self.lower_server.mgmt_mtu_bytes, self.upper_server.mgmt_mtu_bytes),
                "rate_mbps": self.rate_mbps, "shaped": "htb at both ends"}


def crossing_links(topo: Topology, placement: Placement, *, prefix: str, mtu_bytes: int,
                   scale: float) -> list[CrossingLink]:
    """Every link whose ends are on different servers, in the topology's link
    order, with GRE keys 1, 2, ... in that order; ClusterError (one line, the
    first offending link) when one of them would fragment."""
    by_name = {s.name: s for s in placement.servers}
    out: list[CrossingLink] = []
    for link in topo.links:
        a, b = by_name[placement.server_of[link.a]], by_name[placement.server_of[link.b]]
        if a.name == b.name:
            continue
        check_tunnel_mtu(mtu_bytes, min(a.mgmt_mtu_bytes, b.mgmt_mtu_bytes),
                         f"link {link.a}-{link.b} between {a.name} and {b.name}")
        out.append(CrossingLink(link.a, link.b, a, b, intf_name(prefix, link, link.a),
                                intf_name(prefix, link, link.b), len(out) + 1, mtu_bytes,
                                emulated_mbps(link.rate_gbps, scale)))
    return out


def intf_name(prefix: str, link: Link, node: str) -> str:
    """The interface of ``node`` on ``link``, as the bring-up names it."""
    return f"{prefix}{node}-eth{link.port_of(node)}"


@dataclass(frozen=True)
class ClusterPlan:
    placement: Placement
    crossing: list[CrossingLink]

    def to_json(self, topo: Topology) -> dict[str, Any]:
        return {"placement": self.placement.summary(topo),
                "crossing_links": [c.to_json() for c in self.crossing]}


def plan(topo: Topology, servers: Sequence[Server], *, prefix: str, mtu_bytes: int, scale: float) -> ClusterPlan:
    """Placement and crossing links, or ClusterError before anything is built."""
    placement = place(topo, servers)
    return ClusterPlan(placement, crossing_links(topo, placement, prefix=prefix, mtu_bytes=mtu_bytes, scale=scale))


# -- one timeline ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ClockSample:
    """One round trip over the control channel, in epoch seconds: the head
    sends at ``t0_s`` (its clock), the server receives at ``t1_s`` and answers
    at ``t2_s`` (its clock), the head receives at ``t3_s`` (its clock)."""

    t0_s: float
    t1_s: float
    t2_s: float
    t3_s: float

    @property
    def offset_s(self) -> float:
        """The server's clock minus the head's, if the two directions took equally long."""
        return ((self.t1_s - self.t0_s) + (self.t2_s - self.t3_s)) / 2

    @property
    def rtt_s(self) -> float:
        """The round trip without the server's own processing time."""
        return (self.t3_s - self.t0_s) - (self.t2_s - self.t1_s)

    @property
    def uncertainty_s(self) -> float:
        """How far the true offset may be from :attr:`offset_s`: half the round
        trip, the most an asymmetry of the two directions can shift it."""
        return self.rtt_s / 2


@dataclass(frozen=True)
class ClockOffset:
    server: str
    offset_s: float
    uncertainty_s: float
    rtt_s: float
    samples: int

    def to_head_s(self, t_server_s: float) -> float:
        """A time stamp of the server's clock on the head's clock."""
        return t_server_s - self.offset_s

    def to_json(self) -> dict[str, Any]:
        return {"server": self.server, "offset_s": self.offset_s, "uncertainty_s": self.uncertainty_s,
                "rtt_s": self.rtt_s, "samples": self.samples}


def clock_offset(server: str, samples: Sequence[ClockSample]) -> ClockOffset:
    """The offset of the sample with the smallest round trip (NTP's choice: the
    least queued exchange is the least asymmetric).  Samples whose clocks ran
    backwards (t3 < t0, t2 < t1) are left out; ClusterError if none is left."""
    valid = [s for s in samples if s.t3_s >= s.t0_s and s.t2_s >= s.t1_s and s.rtt_s >= 0]
    if not valid:
        raise ClusterError(f"server {server}: no usable clock sample among {len(samples)}")
    best = min(valid, key=lambda s: s.rtt_s)
    return ClockOffset(server, best.offset_s, best.uncertainty_s, best.rtt_s, len(valid))


def check_clocks(offsets: Sequence[ClockOffset], bound_s: float = MAX_CLOCK_UNCERTAINTY_S) -> None:
    """ClusterError naming the first server whose offset is known less well
    than ``bound_s``: a replay that puts its time stamps on one timeline is
    refused then."""
    for off in offsets:
        if off.uncertainty_s > bound_s:
            raise ClusterError(
                f"server {off.server}: clock offset {off.offset_s * 1e3:+.3f} ms is known only to "
                f"+-{off.uncertainty_s * 1e3:.3f} ms (best round trip {off.rtt_s * 1e3:.3f} ms), more than "
                f"the {bound_s * 1e3:g} ms a replay allows; a quieter management network is needed")


# -- the preflight -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str

    def first_line(self) -> str:
        text = (self.stderr or self.stdout).strip()
        return text.splitlines()[0] if text else f"exit status {self.returncode}"


Runner = Callable[[Sequence[str], float], CommandResult]
ClockProbe = Callable[["Server", int], list[ClockSample]]


def run_command(argv: Sequence[str], timeout_s: float) -> CommandResult:
    """The real runner: one argv list, no shell; a missing command is exit
    status 127 and a timeout 124, as a shell would say, never an exception."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return CommandResult(127, "", f"command not found: {argv[0]}")
    except subprocess.TimeoutExpired:
        return CommandResult(124, "", f"no answer within {timeout_s:g} s")
    return CommandResult(proc.returncode, proc.stdout, proc.stderr)


def ssh_argv(server: Server, remote_argv: Sequence[str]) -> list[str]:
    """``ssh root@ADDRESS COMMAND`` in batch mode (a key, never a password
    prompt) with the remote command quoted for the remote shell, word by word."""
    return ["ssh", "-T", *SSH_OPTIONS, f"root@{server.address}", "--", shlex.join(remote_argv)]


# The server's side of a clock round trip: for each line the head sends, stamp
# its arrival and the answer's departure on the server's clock.
CLOCK_ECHO_PY = ("import sys, time\n"
                 "while True:\n"
                 "    line = sys.stdin.readline()\n"
                 "    if not line:\n"
                 "        break\n"
                 "    t1 = time.time()\n"
                 "    t2 = time.time()\n"
                 "    sys.stdout.write(repr(t1) + ' ' + repr(t2) + '\\n')\n"
                 "    sys.stdout.flush()\n")


class ClockEcho:
    """One session running the server's echo (:data:`CLOCK_ECHO_PY`), kept
    open for as many round trips as are asked of it: the head writes a line at
    ``t0``, the echo answers with ``t1 t2``, the head reads it at ``t3`` (all
    ``time.time()``, the clock every record uses).  ``argv`` is the command
    that runs the echo there (an ssh argv; a test runs it locally)."""

    def __init__(self, server: Server, argv: Sequence[str], timeout_s: float = COMMAND_TIMEOUT_S) -> None:
        self.server = server
        self.timeout_s = timeout_s
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)

    def samples(self, count: int) -> list[ClockSample]:
        """``count`` round trips (fewer if the echo ended: ClusterError if none)."""
        proc = self.proc
        samples: list[ClockSample] = []
        try:
            assert proc.stdin is not None and proc.stdout is not None
            for _ in range(count):
                t0 = time.time()
                proc.stdin.write("x\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                t3 = time.time()
                parts = line.split()
                if len(parts) != 2:
                    break
                samples.append(ClockSample(t0, float(parts[0]), float(parts[1]), t3))
        except (BrokenPipeError, ValueError, OSError):
            pass
        if not samples:
            err = self.close()
            raise ClusterError(f"server {self.server.name}: clock probe failed: "
                               f"{err.splitlines()[0] if err else f'exit status {proc.returncode}'}")
        return samples

    def close(self) -> str:
        """End the echo (its stdin closed); what it wrote to stderr."""
        try:
            _, err = self.proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        except (ValueError, OSError):  # closed already
            err = ""
        return (err or "").strip()


class SshClockProbe:
    """The preflight's round trips to a server: one :class:`ClockEcho` over
    ssh for ``count`` of them.  ``argv_for`` makes the command that runs the
    echo (default :func:`ssh_argv`); a test can run it locally instead.  Over
    ssh it runs in the two-guest qemu check (``scripts/cluster-check``)."""

    def __init__(self, argv_for: Callable[[Server, Sequence[str]], list[str]] = ssh_argv,
                 timeout_s: float = COMMAND_TIMEOUT_S) -> None:
        self.argv_for = argv_for
        self.timeout_s = timeout_s

    def __call__(self, server: Server, count: int) -> list[ClockSample]:
        echo = ClockEcho(server, self.argv_for(server, ["python3", "-c", CLOCK_ECHO_PY]), self.timeout_s)
        try:
            return echo.samples(count)
        finally:
            echo.close()


@dataclass
class ServerCheck:
    """What the preflight found on one server; ``problems`` empty when it is ready."""

    server: Server
    commit: str = ""
    ovs_version: str = ""
    clock: ClockOffset | None = None
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"server": self.server.name, "address": self.server.address, "role": self.server.role,
                "ok": not self.problems, "commit": self.commit, "ovs_version": self.ovs_version,
                "clock": self.clock.to_json() if self.clock else None, "problems": list(self.problems)}


@dataclass
class ClusterCheck:
    servers: list[ServerCheck]
    bound_s: float | None  # None: offsets measured and reported, not bounded (a fabric without a replay)

    @property
    def ok(self) -> bool:
        return all(not s.problems for s in self.servers)

    def problem_line(self) -> str:
        """One line naming what is missing, server by server."""
        return "; ".join(f"{s.server.label}: {', '.join(s.problems)}" for s in self.servers if s.problems)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "problem": self.problem_line(), "clock_uncertainty_bound_s": self.bound_s,
                "servers": [s.to_json() for s in self.servers]}


def check_servers(servers: Sequence[Server], *, runner: Runner = run_command, probe: ClockProbe | None = None,
                  repo_dir: Path = REPO_ROOT, samples: int = CLOCK_SAMPLES,
                  bound_s: float | None = MAX_CLOCK_UNCERTAINTY_S) -> ClusterCheck:
    """Check, before anything is built, that every server can take its part.

    The head (this machine): its address is one of this machine's, Open
    vSwitch is installed, and its commit is read.  Every worker, over
    ``ssh -o BatchMode=yes root@ADDRESS`` (root, with a key): it answers; the
    checkout at the same path is at the same commit as the head's; Open
    vSwitch is installed; and its clock offset to the head, measured by
    ``samples`` round trips over one ssh session, is known to ``bound_s``.
    Every command is an argv list and the remote one is quoted word by word.

    ``runner`` and ``probe`` are how commands run and clocks are probed; the
    unit tests give canned answers (there is no second server here); the real
    ones, over ssh between two machines, run in ``scripts/cluster-check``'s two
    qemu guests."""
    if not servers:
        raise ClusterError("check_servers: no servers given")
    clock_probe: ClockProbe = probe if probe is not None else SshClockProbe()
    head = servers[0]
    head_check = ServerCheck(head)
    addrs = runner(["ip", "-o", "-4", "addr", "show"], COMMAND_TIMEOUT_S)
    if addrs.returncode != 0:
        head_check.problems.append(f"cannot list this machine's addresses: {addrs.first_line()}")
    elif not re.search(rf"\binet {re.escape(head.address)}/", addrs.stdout):
        head_check.problems.append(f"{head.address} is not an address of this machine (the head is where "
                                   f"netkv runs)")
    commit = runner(["git", "-C", str(repo_dir), "rev-parse", "HEAD"], COMMAND_TIMEOUT_S)
    if commit.returncode != 0:
        head_check.problems.append(f"cannot read the commit of {repo_dir}: {commit.first_line()}")
    else:
        head_check.commit = commit.stdout.strip()
    ovs = runner(["ovs-vsctl", "--version"], COMMAND_TIMEOUT_S)
    if ovs.returncode != 0:
        head_check.problems.append(f"Open vSwitch missing (ovs-vsctl --version: {ovs.first_line()})")
    else:
        head_check.ovs_version = _first_line(ovs.stdout)
    sudo_problem = _sudo_problem(runner(SUDO_PROBE, COMMAND_TIMEOUT_S))
    if sudo_problem:
        head_check.problems.append(sudo_problem)

    def check_worker(server: Server) -> ServerCheck:
        out = ServerCheck(server)
        reach = runner(ssh_argv(server, ["true"]), COMMAND_TIMEOUT_S)
        if reach.returncode != 0:
            out.problems.append(f"unreachable by ssh as root with a key ({reach.first_line()})")
            return out
        remote = runner(ssh_argv(server, ["git", "-C", str(repo_dir), "rev-parse", "HEAD"]), COMMAND_TIMEOUT_S)
        if remote.returncode != 0:
            out.problems.append(f"no checkout at {repo_dir} ({remote.first_line()})")
        else:
            out.commit = remote.stdout.strip()
            if head_check.commit and out.commit != head_check.commit:
                out.problems.append(f"commit {out.commit[:12]} differs from the head's {head_check.commit[:12]}")
        ovs = runner(ssh_argv(server, ["ovs-vsctl", "--version"]), COMMAND_TIMEOUT_S)
        if ovs.returncode != 0:
            out.problems.append(f"Open vSwitch missing (ovs-vsctl --version: {ovs.first_line()})")
        else:
            out.ovs_version = _first_line(ovs.stdout)
        sudo_problem = _sudo_problem(runner(ssh_argv(server, SUDO_PROBE), COMMAND_TIMEOUT_S))
        if sudo_problem:
            out.problems.append(sudo_problem)
        try:
            out.clock = clock_offset(server.name, clock_probe(server, samples))
            if bound_s is not None:  # None: measured and reported only (a fabric without a replay)
                check_clocks([out.clock], bound_s)
        except ClusterError as exc:
            out.problems.append(str(exc).removeprefix(f"server {server.name}: "))
        return out

    workers = list(servers[1:])
    with ThreadPoolExecutor(max_workers=max(1, len(workers))) as pool:
        worker_checks = list(pool.map(check_worker, workers))
    return ClusterCheck([head_check, *worker_checks], bound_s)


# Mininet Cluster Edition runs its commands on a server under ``sudo -E`` and
# takes any output of some of them (making a tunnel, moving an interface) as a
# failure: sudo must be there, and silent (a server whose own host name does
# not resolve makes sudo warn on every command).
SUDO_PROBE = ["sudo", "-E", "true"]


def _sudo_problem(result: CommandResult) -> str:
    if result.returncode != 0:
        return f"sudo -E does not run ({result.first_line()}); Mininet Cluster Edition runs every command under it"
    said = (result.stdout + result.stderr).strip()
    if said:
        return (f"sudo -E prints {said.splitlines()[0]!r}, which Mininet Cluster Edition takes as a failed "
                f"command (a host name that does not resolve: add it to /etc/hosts)")
    return ""


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""
