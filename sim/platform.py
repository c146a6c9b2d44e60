"""A SimGrid platform built from a topology, and the model it runs.

**The model.**  SimGrid's ``LV08`` flow-level network model (Velho and Legrand,
SIMUTools 2009; Velho et al., ACM TOMACS 23(4), 2013), SimGrid's default: every
transfer is a flow, the flows crossing a link share its bandwidth by
max-min fairness weighted by each flow's round trip (so a longer path gets a
smaller share, as TCP's RTT unfairness gives it), and the flows' rates are
recomputed whenever one starts or ends.  Its parameters are set explicitly
(:data:`MODEL_CONFIG`), at SimGrid 3.32's values for LV08:

* bandwidth factor 0.97: a flow gets at most 97% of its bottleneck's rate (TCP
  and IP headers, as the emulator's htb links carry 95.7%);
* latency factor 13.01: a transfer starts after 13.01 times its route's
  latency (TCP slow start, fitted on grid transfers);
* weight-S 20,537 bytes: the sharing weight of a flow is its route's latency
  plus 20,537 bytes over each link's bandwidth (RTT unfairness);
* TCP gamma 4 MiB: a flow's rate is at most gamma / (2 x route latency), the
  largest TCP window over the round trip (at 1 us per link the bound is 262
  to 1,049 GB/s, above every link here: it never binds);
* cross traffic on: a flow also loads its reverse route at 5% of its rate (the
  ACKs), so a route is declared in both directions for every pair.

**The platform.**  One host per GPU (named as in the topology), one
split-duplex link per topology link at its real rate (``rate_gbps``, no scale
factor: SimGrid counts bytes, not packets) and :data:`LINK_LATENCY_S` of
latency per direction, so that a route's latency is the oracle's base latency
of its tier (``netkv.oracle.BASE_LATENCY_MS_BY_TIER``: 2, 4, 6 and 8 us for
tiers 0-3).  The link's UP half carries the topology link's lower end to its
upper end, the DOWN half the other way.  Switches are no SimGrid objects: a
route is the list of directed links of ``topology.path(src, dst)``, the ECMP
pick the controller installs for that ordered pair, declared for each pair a
replay can use (every ordered GPU pair by default) in one ``Full`` zone.

A background flow of a scenario is rate-limited by a private link of its own
rate (divided by the bandwidth factor, so that the flow carries its nominal
rate) in front of the fabric: it leaves from a host of its own
(``bg<i>``) whose route to the flow's destination is that link followed by the
route of the flow's source.  (SimGrid 3.32's Python ``Comm.set_rate`` refuses
a comm made by ``sendto_init``, so the limit is a link.)

**Memory.**  :func:`check_fits` refuses a platform whose estimate,
:data:`BYTES_PER_ROUTE` per declared route, passes :data:`MEMORY_FRACTION` of
the memory available.  The figure is the largest process's peak of a whole
replay per route, measured at 4,096 GPUs (2026-12-06: 3.48 GiB for 8.4 M
routes, 445 B each, of which the platform's process holds 2.63 GiB; the rest
is the replay's oracle tables, one entry per prefill-decode pair), with 15%
of margin.  A route of SimGrid's ``Full`` zone is about 0.2 kB of it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from topologies import Hop, Topology

MODEL = "LV08"
BANDWIDTH_FACTOR = 0.97
LATENCY_FACTOR = 13.01
WEIGHT_S_BYTES = 20537.0
TCP_GAMMA_BYTES = 4194304.0
CROSSTRAFFIC = True
LINK_LATENCY_S = 1e-6  # per link and direction: a route's latency is the oracle's base latency of its tier
HOST_SPEED_FLOPS = 1e9  # unused: compute is the perf model's, not SimGrid's

MODEL_CONFIG: tuple[tuple[str, str], ...] = (
    ("network/model", MODEL),
    ("network/bandwidth-factor", f"{BANDWIDTH_FACTOR:g}"),
    ("network/latency-factor", f"{LATENCY_FACTOR:g}"),
    ("network/weight-S", f"{WEIGHT_S_BYTES:.0f}"),
    ("network/TCP-gamma", f"{TCP_GAMMA_BYTES:.0f}"),
    ("network/crosstraffic", "1" if CROSSTRAFFIC else "0"),
)

BYTES_PER_ROUTE = 512  # peak bytes per route of a whole replay, measured at 4,096 GPUs (445), with margin
MEMORY_FRACTION = 0.75


class PlatformTooLarge(ValueError):
    """The platform's estimated memory passes the bound; one line says both."""


def describe() -> dict[str, Any]:
    """The model and its parameters, as a run directory records them."""
    return {"simgrid_model": MODEL, "config": dict(MODEL_CONFIG), "link_latency_s": LINK_LATENCY_S,
            "routes": "topology.path(src, dst) per ordered GPU pair (the controller's ECMP pick)",
            "rates": "real link rates (rate_gbps), no scale factor"}


# -- which routes ----------------------------------------------------------------------------
def every_pair(topo: Topology) -> list[tuple[str, str]]:
    gpus = topo.gpu_names()
    return [(s, d) for s, d in itertools.product(gpus, gpus) if s != d]


def with_reverse(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The pairs and their reverses (cross traffic needs the way back), once each, in order."""
    seen: dict[tuple[str, str], None] = {}
    for s, d in pairs:
        if s != d:
            seen.setdefault((s, d), None)
            seen.setdefault((d, s), None)
    return list(seen)


# -- memory ----------------------------------------------------------------------------------
def mem_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def estimate_bytes(routes: int) -> int:
    return routes * BYTES_PER_ROUTE


def check_fits(routes: int, gpus: int, available: int | None = None, copies: int = 1) -> int:
    """The estimated bytes of ``copies`` platforms (replays run at once each
    hold one); PlatformTooLarge when they pass MEMORY_FRACTION of
    ``available`` (default: the machine's MemAvailable)."""
    need = copies * estimate_bytes(routes)
    have = mem_available_bytes() if available is None else available
    if have is not None and need > MEMORY_FRACTION * have:
        what = (f"platform of {gpus} GPUs needs {routes:,} routes" if copies == 1 else
                f"platforms of {gpus} GPUs for {copies} replays at once (--jobs) need {copies} x {routes:,} routes")
        raise PlatformTooLarge(
            f"the simulated {what}, about {need / 2**30:.1f} GiB ({BYTES_PER_ROUTE} B per route), more than "
            f"{MEMORY_FRACTION:.0%} of the {have / 2**30:.1f} GiB available here")
    return need


# -- the platform ----------------------------------------------------------------------------
@dataclass
class Platform:
    """The SimGrid objects of one topology (built in the simulation's own process)."""

    topology: Topology
    engine: Any
    zone: Any
    hosts: dict[str, Any]  # GPU (and background source) name -> s4u Host
    links: dict[tuple[str, str], Any]  # topology link key -> s4u SplitDuplexLink
    directed: dict[Hop, Any]  # directed hop -> the s4u Link of that direction
    capacity_gbps: dict[Hop, float]  # directed hop -> its rate now (faults may change it)
    routes: int = 0  # routes declared to SimGrid
    background: list[str] = field(default_factory=list)  # bg<i>: the source host of background flow i
    _bg_hops: dict[tuple[str, str], list[Hop]] = field(default_factory=dict)  # (bg<i>, dst) -> its fabric hops

    def hops(self, src: str, dst: str) -> list[Hop]:
        """The fabric hops of a declared route: the controller's path
        (``topology.path_hops``, computed again rather than kept: a table of
        every pair's hops is most of a large platform's memory)."""
        found = self._bg_hops.get((src, dst))
        return found if found is not None else self.topology.path_hops(src, dst)

    def set_rate(self, a: str, b: str, rate_gbps: float) -> None:
        """Re-rate topology link a-b, both directions (a fault)."""
        link = self.links.get((a, b)) or self.links[(b, a)]
        for half in (link.link_up, link.link_down):
            half.set_bandwidth(rate_gbps * 1e9 / 8)
        for hop in ((a, b), (b, a)):
            self.capacity_gbps[hop] = float(rate_gbps)


def engine_args(log_file: Path | None = None) -> list[str]:
    args = ["netkv-sim"] + [f"--cfg={k}:{v}" for k, v in MODEL_CONFIG]
    args.append("--log=root.thresh:warning")
    if log_file is not None:
        args.append(f"--log=root.app:file:{log_file}")
    return args


def build(topo: Topology, pairs: Sequence[tuple[str, str]] | None = None,
          background: Sequence[tuple[str, str, float]] = (), *, log_file: Path | None = None) -> Platform:
    """The SimGrid engine and platform of ``topo``: hosts, links, and a route
    (``topo.path``) for each pair of ``pairs`` and its reverse (default: every
    ordered GPU pair); ``background``: (src, dst, rate_gbps) of each background
    flow, each given a source host ``bg<i>`` behind a link of its rate.  Call
    once per process (SimGrid has one engine per process: :mod:`sim.isolate`)."""
    import simgrid as sg

    engine = sg.Engine(engine_args(log_file))
    zone = sg.NetZone.create_full_zone("netkv")
    hosts = {g: zone.create_host(g, HOST_SPEED_FLOPS) for g in topo.gpu_names()}
    links: dict[tuple[str, str], Any] = {}
    directed: dict[Hop, Any] = {}
    capacity: dict[Hop, float] = {}
    up, down = sg.LinkInRoute.UP, sg.LinkInRoute.DOWN
    in_route: dict[Hop, Any] = {}
    for link in topo.links:
        sd = zone.create_split_duplex_link(f"{link.a}-{link.b}", link.rate_gbps * 1e9 / 8)
        sd.set_latency(LINK_LATENCY_S).seal()
        links[link.key] = sd
        directed[(link.a, link.b)] = sd.link_up
        directed[(link.b, link.a)] = sd.link_down
        in_route[(link.a, link.b)] = sg.LinkInRoute(sd, up)
        in_route[(link.b, link.a)] = sg.LinkInRoute(sd, down)
        capacity[(link.a, link.b)] = capacity[(link.b, link.a)] = link.rate_gbps
    platform = Platform(topo, engine, zone, hosts, links, directed, capacity)
    wanted = with_reverse(every_pair(topo) if pairs is None else pairs)
    wanted = with_reverse(wanted + [(s, d) for s, d, _ in background])
    wanted.sort(key=lambda pair: pair[1])  # by destination: Topology.path keeps one BFS per destination switch
    for src, dst in wanted:
        zone.add_route(hosts[src].netpoint, hosts[dst].netpoint, None, None,
                       [in_route[h] for h in topo.path_hops(src, dst)], False)
    platform.routes = len(wanted)
    for i, (src, dst, rate_gbps) in enumerate(background):
        name = f"bg{i}"
        host = hosts[name] = zone.create_host(name, HOST_SPEED_FLOPS)
        limit = zone.create_split_duplex_link(f"{name}-limit", rate_gbps * 1e9 / 8 / BANDWIDTH_FACTOR)
        limit.set_latency(0.0).seal()
        there = [sg.LinkInRoute(limit, up)] + [in_route[h] for h in topo.path_hops(src, dst)]
        back = [in_route[h] for h in topo.path_hops(dst, src)] + [sg.LinkInRoute(limit, down)]
        zone.add_route(host.netpoint, hosts[dst].netpoint, None, None, there, False)
        zone.add_route(hosts[dst].netpoint, host.netpoint, None, None, back, False)
        platform._bg_hops[(name, dst)] = topo.path_hops(src, dst)
        platform.routes += 2
        platform.background.append(name)
    zone.seal()
    return platform
