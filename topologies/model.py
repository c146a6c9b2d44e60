"""Plain-data description of an emulated GPU fabric.

Nothing here imports Mininet or touches the kernel: schedulers, the oracle,
the controller and unit tests all read the same description without root.

Naming (the single place where names are defined)
-------------------------------------------------
* GPU hosts: ``g0`` .. ``g{N-1}``, numbered server by server, rack by rack,
  pod by pod, so ``g8`` is the first GPU of the second server.
* Switches: one letter per tier and an index counted across the fabric:
  ``v`` tier 0 (the server's NVLink/PCIe domain), ``t`` tier 1 (top of rack),
  ``a`` tier 2 (aggregation / pod), ``c`` tier 3 (core).  ``t1`` is the ToR of
  the second rack.
* The testbed prepends its instance prefix (default ``nk``) to every name when
  it builds the network, so the Open vSwitch bridge of ``t1`` is ``nkt1`` and
  its port 3 is the interface ``nkt1-eth3``.
* GPU ``gN`` has IPv4 address ``10.0.x.y`` with ``x*256 + y - 1 == N`` and MAC
  ``02:00:00:00:xx:yy`` with the same 16-bit value; both come from
  :func:`gpu_ip` and :func:`gpu_mac`.
* A switch's datapath id is ``(tier + 1) << 32 | (index + 1)``: never zero and
  readable in hex (``0x0000000200000002`` is ``t1``).
* Ports are numbered from 1 on each node in the order the links were added.

Link tiers: a link's tier is the tier of its upper switch.  A GPU's link to its
server switch is tier 0, a server switch's uplink to its ToR tier 1, ToR to
aggregation tier 2, aggregation to core tier 3.  The tier distance of two GPUs
is the highest link tier on the path between them.

Rates are real-world figures in Gbit/s.  The testbed divides them by one scale
factor when it emulates them, and divides KV payload sizes by the same factor,
so transfer times keep their real-world values.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Mapping

SWITCH_LETTER_BY_TIER: Mapping[int, str] = {0: "v", 1: "t", 2: "a", 3: "c"}
TIER_NAMES: Mapping[int, str] = {
    0: "server (NVLink/PCIe)",
    1: "rack (ToR)",
    2: "pod (aggregation)",
    3: "core",
}
MAX_GPUS = 65_000
TOWARD_CACHE = 1024  # destination switches whose next hops Topology.path keeps: every server switch up to 8,192 GPUs (0.1-0.3 MB each)


class TopologyError(ValueError):
    """Raised when a topology's parameters do not fit together."""


@dataclass(frozen=True)
class Node:
    name: str
    kind: str  # "gpu" or "switch"
    tier: int  # switches: 0..3; GPUs: -1 (below tier 0)
    index: int  # position among the nodes of its kind and tier
    server: int | None = None
    rack: int | None = None
    pod: int | None = None

    @property
    def is_gpu(self) -> bool:
        return self.kind == "gpu"

    @property
    def dpid(self) -> int:
        if self.is_gpu:
            raise TopologyError(f"{self.name} is a GPU host and has no datapath id")
        return ((self.tier + 1) << 32) | (self.index + 1)


@dataclass(frozen=True)
class Link:
    a: str  # lower node (GPU or lower-tier switch)
    b: str  # upper switch
    a_port: int
    b_port: int
    tier: int
    rate_gbps: float

    def other(self, name: str) -> str:
        if name == self.a:
            return self.b
        if name == self.b:
            return self.a
        raise KeyError(f"{name} is not an end of link {self.a}-{self.b}")

    def port_of(self, name: str) -> int:
        if name == self.a:
            return self.a_port
        if name == self.b:
            return self.b_port
        raise KeyError(f"{name} is not an end of link {self.a}-{self.b}")

    @property
    def key(self) -> tuple[str, str]:
        return (self.a, self.b)


# A directed hop: (from_node, to_node).
Hop = tuple[str, str]
Toward = tuple[int, int, tuple[tuple[str, int], ...]]  # hops to a root, paths to it, next hops (name, paths)


def gpu_ip(index: int) -> str:
    if not 0 <= index < MAX_GPUS:
        raise TopologyError(f"GPU index {index} outside 0..{MAX_GPUS - 1}")
    value = index + 1
    return f"10.0.{value >> 8}.{value & 0xFF}"


def gpu_mac(index: int) -> str:
    value = index + 1
    return f"02:00:00:00:{value >> 8:02x}:{value & 0xFF:02x}"


@dataclass
class Topology:
    """Nodes, links and routes of one fabric.  Build it with a builder from
    :mod:`topologies.catalog`; treat it as read-only afterwards."""

    name: str
    params: dict[str, object]
    nodes: dict[str, Node] = field(default_factory=dict)
    links: list[Link] = field(default_factory=list)
    _ports: dict[str, int] = field(default_factory=dict, repr=False)
    _adj: dict[str, list[Link]] = field(default_factory=dict, repr=False)
    _path_cache: dict[tuple[str, str], list[list[str]]] = field(
        default_factory=dict, repr=False
    )
    _dist_cache: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)
    # per root switch: every switch's (hops to it, shortest paths to it, next hops towards it); bounded
    _toward_cache: "OrderedDict[str, dict[str, Toward]]" = field(default_factory=OrderedDict, repr=False)
    _hops: dict[Hop, Hop] = field(default_factory=dict, repr=False)  # one tuple per directed hop
    _link_of: dict[Hop, Link] = field(default_factory=dict, repr=False)  # both directions; the first if parallel

    # -- construction -------------------------------------------------------
    def add_node(self, node: Node) -> Node:
        if node.name in self.nodes:
            raise TopologyError(f"duplicate node name {node.name}")
        self.nodes[node.name] = node
        self._ports[node.name] = 0
        self._adj[node.name] = []
        return node

    def add_link(self, lower: str, upper: str, rate_gbps: float) -> Link:
        if rate_gbps <= 0:
            raise TopologyError(f"link {lower}-{upper}: rate_gbps must be > 0, got {rate_gbps}")
        lo, up = self.nodes[lower], self.nodes[upper]
        if up.is_gpu:
            raise TopologyError(f"link {lower}-{upper}: upper end must be a switch")
        self._ports[lower] += 1
        self._ports[upper] += 1
        link = Link(lower, upper, self._ports[lower], self._ports[upper], up.tier, float(rate_gbps))
        if lo.tier >= up.tier:
            raise TopologyError(f"link {lower}-{upper} does not go up a tier")
        self.links.append(link)
        self._adj[lower].append(link)
        self._adj[upper].append(link)
        self._path_cache.clear()
        self._dist_cache.clear()
        self._toward_cache.clear()
        for hop in ((lower, upper), (upper, lower)):
            self._hops[hop] = hop
            self._link_of.setdefault(hop, link)
        return link

    # -- queries --------------------------------------------------------------
    @property
    def gpus(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.is_gpu]

    @property
    def switches(self) -> list[Node]:
        return [n for n in self.nodes.values() if not n.is_gpu]

    def gpu_names(self) -> list[str]:
        return [n.name for n in self.gpus]

    def node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise KeyError(f"unknown node {name!r} in topology {self.name}") from None

    def gpu_index(self, name: str) -> int:
        node = self.node(name)
        if not node.is_gpu:
            raise KeyError(f"{name} is not a GPU host")
        return node.index

    def ip_of(self, name: str) -> str:
        return gpu_ip(self.gpu_index(name))

    def mac_of(self, name: str) -> str:
        return gpu_mac(self.gpu_index(name))

    def gpu_by_ip(self, ip: str) -> str:
        for node in self.gpus:
            if gpu_ip(node.index) == ip:
                return node.name
        raise KeyError(f"no GPU host has address {ip}")

    def links_of(self, name: str) -> list[Link]:
        return list(self._adj[self.node(name).name])

    def link_between(self, x: str, y: str) -> Link:
        link = self._link_of.get((x, y))
        if link is None:
            raise KeyError(f"no link between {x} and {y}")
        return link

    def port_to(self, node: str, neighbor: str) -> int:
        return self.link_between(node, neighbor).port_of(node)

    def neighbor_on_port(self, node: str, port: int) -> str:
        for link in self._adj[node]:
            if link.port_of(node) == port:
                return link.other(node)
        raise KeyError(f"{node} has no port {port}")

    def count_by_tier(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for sw in self.switches:
            out[sw.tier] = out.get(sw.tier, 0) + 1
        return dict(sorted(out.items()))

    def links_by_tier(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for link in self.links:
            out[link.tier] = out.get(link.tier, 0) + 1
        return dict(sorted(out.items()))

    def oversubscription(self) -> dict[int, float]:
        """Per switch tier: downlink capacity / uplink capacity (worst switch).

        Tiers without uplinks (the top tier) are left out."""
        out: dict[int, float] = {}
        for sw in self.switches:
            down = sum(l.rate_gbps for l in self._adj[sw.name] if l.b == sw.name)
            up = sum(l.rate_gbps for l in self._adj[sw.name] if l.a == sw.name)
            if up > 0:
                out[sw.tier] = max(out.get(sw.tier, 0.0), down / up)
        return dict(sorted(out.items()))

    # -- routing -------------------------------------------------------------
    def _dist_from(self, src: str) -> dict[str, int]:
        """Hop count from ``src`` to every node it reaches (one BFS per source,
        kept): GPU hosts never forward, so they are reached but not crossed."""
        dist = self._dist_cache.get(src)
        if dist is not None:
            return dist
        dist = {src: 0}
        order = deque([src])
        while order:
            cur = order.popleft()
            if cur != src and self.nodes[cur].is_gpu:
                continue
            for link in self._adj[cur]:
                nxt = link.other(cur)
                if nxt not in dist:
                    dist[nxt] = dist[cur] + 1
                    order.append(nxt)
        self._dist_cache[src] = dist
        return dist

    def shortest_paths(self, src: str, dst: str) -> list[list[str]]:
        """Every shortest node path from ``src`` to ``dst``, sorted by names
        (enumerated backwards from ``dst`` over the source's BFS distances, so
        every pair from one source costs one BFS)."""
        key = (src, dst)
        cached = self._path_cache.get(key)
        if cached is not None:
            return cached
        self.node(src)
        self.node(dst)
        dist = self._dist_from(src)
        if dst not in dist:
            raise TopologyError(f"no path from {src} to {dst}")
        paths: list[list[str]] = []

        def back(suffix: list[str]) -> None:
            cur = suffix[-1]
            if cur == src:
                paths.append(suffix[::-1])
                return
            for link in self._adj[cur]:
                prev = link.other(cur)
                if dist.get(prev) == dist[cur] - 1 and (prev == src or not self.nodes[prev].is_gpu):
                    suffix.append(prev)
                    back(suffix)
                    suffix.pop()

        back([dst])
        paths.sort()
        self._path_cache[key] = paths
        return paths

    def _toward(self, root: str) -> dict[str, Toward]:
        """For every switch (and ``root``): its hops to ``root``, its number of
        shortest paths to ``root`` that cross no GPU host, and its next hops on
        them in name order, each with its own number of paths.  One BFS per
        root over the switches only (GPU hosts are neither crossed nor kept),
        the last :data:`TOWARD_CACHE` roots kept."""
        cached = self._toward_cache.get(root)
        if cached is not None:
            self._toward_cache.move_to_end(root)
            return cached
        dist = {root: 0}
        count = {root: 1}
        order = [root]
        for cur in order:  # breadth first: ``order`` grows as it is read
            for link in self._adj[cur]:
                nxt = link.other(cur)
                if self.nodes[nxt].is_gpu:
                    continue
                d = dist.get(nxt)
                if d is None:
                    dist[nxt] = dist[cur] + 1
                    count[nxt] = count[cur]
                    order.append(nxt)
                elif d == dist[cur] + 1:
                    count[nxt] += count[cur]
        toward: dict[str, Toward] = {}
        for cur in order:
            step = dist[cur] - 1
            toward[cur] = (dist[cur], count[cur],
                           tuple(sorted((link.other(cur), count[link.other(cur)]) for link in self._adj[cur]
                                        if dist.get(link.other(cur), -2) == step)))
        self._toward_cache[root] = toward
        if len(self._toward_cache) > TOWARD_CACHE:
            self._toward_cache.popitem(last=False)
        return toward

    def path(self, src: str, dst: str, down: "frozenset[tuple[str, str]] | set[tuple[str, str]]" = frozenset()
             ) -> list[str]:
        """The one path the controller installs for traffic from src to dst.

        Equal-cost shortest paths are spread deterministically per ordered
        (src, dst) pair: the CRC32 of ``"src>dst"`` modulo the number of
        candidates picks one of them in sorted order.  Anyone holding the
        topology computes the same answer.  ``down``: keys (:attr:`Link.key`)
        of links that are down; see :func:`pick_path`.

        Without down links the pick is made without listing the candidates
        (a cross-pod pair of a 1,024-GPU fat-tree has 64; listing them for
        every pair cost 8 kB and 0.5 ms each): walking from ``src``, each step
        takes the next hops towards ``dst`` in name order and skips those whose
        number of shortest paths to ``dst`` lies wholly before the pick's
        index, which lands on the path that indexing the sorted list gives.
        The next hops and path counts come from one BFS over the switches per
        destination switch: a GPU host with one link is reached through that
        link's switch, so every GPU of a server shares its switch's BFS."""
        if down:
            return pick_path(self.shortest_paths(src, dst), src, dst, down)
        self.node(src)
        self.node(dst)
        if src == dst:
            return [src]
        dst_links = self._adj[dst]
        if self.nodes[dst].is_gpu and len(dst_links) == 1:
            last = dst_links[0].other(dst)  # every path to dst ends on its one link
            toward = self._toward(last)
        else:
            last = ""
            toward = self._toward(dst)
        if src == last:
            return [src, dst]
        if src in toward:
            first = toward[src][2]
        else:  # src is a GPU host: its next hops are its switches nearest to dst
            near = [link.other(src) for link in self._adj[src] if link.other(src) in toward]
            if not near:
                raise TopologyError(f"no path from {src} to {dst}")
            if dst in (link.other(src) for link in self._adj[src]):
                first = ((dst, 1),)
            else:
                best = min(toward[n][0] for n in near)
                first = tuple(sorted((n, toward[n][1]) for n in near if toward[n][0] == best))
        index = zlib.crc32(f"{src}>{dst}".encode()) % sum(c for _, c in first)
        nodes = [src]
        step = first
        while True:
            for nxt, paths in step:
                if index < paths:
                    break
                index -= paths
            nodes.append(nxt)
            if nxt == dst:
                return nodes
            step = ((dst, 1),) if nxt == last else toward[nxt][2]

    def path_hops(self, src: str, dst: str, down: "frozenset[tuple[str, str]] | set[tuple[str, str]]" = frozenset()
                  ) -> list[Hop]:
        """The installed path (:meth:`path`) as directed hops; each hop is the
        topology's one tuple for it, so tables of many paths share them."""
        nodes = self.path(src, dst, down)
        return [self._hops[h] for h in zip(nodes, nodes[1:])]

    def path_links(self, src: str, dst: str) -> list[Link]:
        return [self.link_between(x, y) for x, y in self.path_hops(src, dst)]

    def tier_distance(self, src: str, dst: str) -> int:
        """Highest link tier crossed between two GPUs (0 = same server).
        The same GPU is at distance -1."""
        if src == dst:
            return -1
        return max(l.tier for l in self.path_links(src, dst))

    def bottleneck_gbps(self, src: str, dst: str) -> float:
        return min(l.rate_gbps for l in self.path_links(src, dst))

    def summary(self) -> dict[str, object]:
        return {
            "topology": self.name,
            "params": dict(self.params),
            "gpus": len(self.gpus),
            "switches": len(self.switches),
            "links": len(self.links),
            "switches_by_tier": self.count_by_tier(),
            "links_by_tier": self.links_by_tier(),
            "oversubscription_by_tier": self.oversubscription(),
        }


def pick_path(candidates: list[list[str]], src: str, dst: str,
              down: "frozenset[tuple[str, str]] | set[tuple[str, str]]" = frozenset()) -> list[str]:
    """The installed path among ``candidates`` (the pair's equal-cost shortest
    paths, sorted), with the links whose keys are in ``down`` out of service.

    Without down links: ``candidates[crc32("src>dst") % len]``.  A pair whose
    usual path crosses no down link keeps it (a failure moves only the routes
    it breaks); one whose path does moves to the remaining equal-cost paths,
    picked the same way among them; when none remains the usual path is kept
    (nothing else reaches the destination at that length; its traffic is lost
    until the link is back).  The controller's routes, ``/path`` and the
    oracle all use this one rule."""
    pick = zlib.crc32(f"{src}>{dst}".encode())
    usual = candidates[pick % len(candidates)]
    if not down or not _crosses(usual, down):
        return usual
    remaining = [p for p in candidates if not _crosses(p, down)]
    return remaining[pick % len(remaining)] if remaining else usual


def _crosses(nodes: list[str], down: "frozenset[tuple[str, str]] | set[tuple[str, str]]") -> bool:
    return any((x, y) in down or (y, x) in down for x, y in zip(nodes, nodes[1:]))
