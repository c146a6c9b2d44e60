"""Proactive routes for a topology, as plain data (no os-ken import).

Every ordered pair of GPU hosts gets the one path :meth:`Topology.path`
names (shortest, equal-cost paths spread per pair by CRC32).  On each switch
the routes are compressed: for a destination whose crossing pairs all leave by
the same port, one destination-only entry; where pairs to the same destination
leave by different ports (the switches where equal-cost paths split), the most
common port stays in the destination-only entry and the others get
(source, destination) entries at a higher priority.  Walking these entries from
any source reproduces ``topology.path(src, dst)`` exactly; the tests check
that against the flow tables read back from Open vSwitch.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from topologies import Topology

PRIORITY_DST = 100
PRIORITY_PAIR = 200
# Marks every entry this controller installs (ASCII "NK").
FLOW_COOKIE = 0x4E4B


@dataclass(frozen=True, order=True)
class FlowEntry:
    switch: str
    priority: int
    ipv4_dst: str
    ipv4_src: str | None
    out_port: int


def flow_entries(topo: Topology, down: frozenset[tuple[str, str]] | set[tuple[str, str]] = frozenset()
                 ) -> dict[str, list[FlowEntry]]:
    """Flow entries per switch name, sorted, for every GPU pair; with links
    out of service (``down``, :attr:`Link.key`), the pairs they cut take the
    remaining equal-cost paths (``topologies.model.pick_path``)."""
    # (switch, dst) -> {src: out_port}
    ports: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    gpus = topo.gpu_names()
    for src in gpus:
        for dst in gpus:
            if src == dst:
                continue
            nodes = topo.path(src, dst, down)
            for here, nxt in zip(nodes[1:-1], nodes[2:]):
                ports[(here, dst)][src] = topo.port_to(here, nxt)
    out: dict[str, list[FlowEntry]] = {sw.name: [] for sw in topo.switches}
    for (switch, dst), by_src in ports.items():
        dst_ip = topo.ip_of(dst)
        counts = Counter(by_src.values())
        # Most common port; ties go to the lowest port number so the choice is stable.
        main_port = min(counts, key=lambda p: (-counts[p], p))
        out[switch].append(FlowEntry(switch, PRIORITY_DST, dst_ip, None, main_port))
        for src, port in by_src.items():
            if port != main_port:
                out[switch].append(FlowEntry(switch, PRIORITY_PAIR, dst_ip, topo.ip_of(src), port))
    for entries in out.values():
        entries.sort()
    return out


def table_diff(old: list[FlowEntry], new: list[FlowEntry]) -> tuple[list[FlowEntry], list[FlowEntry]]:
    """``(to_add, to_delete)`` that turn one switch's table ``old`` into ``new``.

    An entry is identified by its match and priority (what OpenFlow's ADD
    overwrites and DELETE_STRICT removes): ``to_add`` holds the new or changed
    entries, ``to_delete`` the old ones whose match is gone.  Entries that stay
    are not touched, so traffic they carry is never without a route."""
    def match(e: FlowEntry) -> tuple[int, str, str | None]:
        return e.priority, e.ipv4_dst, e.ipv4_src

    old_set = set(old)
    new_matches = {match(e) for e in new}
    return ([e for e in new if e not in old_set],
            [e for e in old if match(e) not in new_matches])


def lookup(entries: list[FlowEntry], src_ip: str, dst_ip: str) -> int | None:
    """The out port the highest-priority matching entry gives, as a switch would."""
    best: FlowEntry | None = None
    for entry in entries:
        if entry.ipv4_dst != dst_ip:
            continue
        if entry.ipv4_src is not None and entry.ipv4_src != src_ip:
            continue
        if best is None or entry.priority > best.priority:
            best = entry
    return None if best is None else best.out_port


def walk(topo: Topology, tables: dict[str, list[FlowEntry]], src: str, dst: str) -> list[str]:
    """Follow flow tables hop by hop from src's switch; returns the node path.

    Raises ``LookupError`` on a missing entry or a loop."""
    src_ip, dst_ip = topo.ip_of(src), topo.ip_of(dst)
    path = [src, topo.links_of(src)[0].other(src)]
    while path[-1] != dst:
        here = path[-1]
        port = lookup(tables.get(here, []), src_ip, dst_ip)
        if port is None:
            raise LookupError(f"{here} has no entry for {src}->{dst}")
        nxt = topo.neighbor_on_port(here, port)
        if nxt in path:
            raise LookupError(f"loop at {here} for {src}->{dst}: {path + [nxt]}")
        path.append(nxt)
        if len(path) > len(topo.nodes):
            raise LookupError(f"path too long for {src}->{dst}")
    return path
