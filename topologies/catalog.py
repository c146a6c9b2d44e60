"""The topologies the testbed ships, each a builder with checked parameters.

``build("fattree", {"pods": 4})`` returns a :class:`~topologies.model.Topology`.
Every builder declares its parameters once (name, default, help text); an
unknown or misspelt parameter, a value of the wrong type or out of range, or
parameters that do not fit together raise :class:`TopologyError` with one
line that says what was wrong and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from .model import MAX_GPUS, Node, Topology, TopologyError


@dataclass(frozen=True)
class Param:
    name: str
    default: float | int
    help: str
    kind: type = int
    minimum: float = 1


FATTREE_PARAMS: tuple[Param, ...] = (
    Param("gpus_per_server", 8, "GPUs in one server (one tier-0 switch each)"),
    Param("servers_per_rack", 2, "servers under one top-of-rack switch"),
    Param("racks_per_pod", 2, "racks (ToR switches) in one pod"),
    Param("pods", 2, "pods; more than one needs core switches"),
    Param("aggs_per_pod", 2, "aggregation switches per pod; every ToR links to each"),
    Param("cores", 2, "core switches; every aggregation switch links to each", minimum=0),
    Param("gpu_link_gbps", 1600.0, "tier 0: GPU to its server switch (NVLink/PCIe domain)", float, 1e-3),
    Param("server_uplink_gbps", 400.0, "tier 1: server switch to ToR (the server's NICs)", float, 1e-3),
    Param("gpu_nic_gbps", 0.0, "per-GPU NIC (rail-optimised servers): when > 0 each GPU has its own NIC of this "
          "rate and the server uplink is gpus_per_server x this, replacing server_uplink_gbps; 0: off", float, 0.0),
    Param("tor_oversub", 1.0, "ToR oversubscription: rack downlink capacity / uplink capacity", float, 1e-3),
    Param("agg_oversub", 2.0, "aggregation oversubscription: pod downlink / core uplink capacity", float, 1e-3),
)

LEAFSPINE_PARAMS: tuple[Param, ...] = (
    Param("leaves", 4, "leaf (top-of-rack) switches"),
    Param("gpus_per_leaf", 4, "GPUs attached to each leaf"),
    Param("spines", 2, "spine switches; every leaf links to each"),
    Param("gpu_link_gbps", 400.0, "tier 1: GPU to its leaf", float, 1e-3),
    Param("oversub", 2.0, "leaf oversubscription: GPU capacity / spine uplink capacity", float, 1e-3),
)


def _check(params: Mapping[str, object], spec: tuple[Param, ...], topo: str) -> dict[str, float | int]:
    known = {p.name: p for p in spec}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise TopologyError(
            f"unknown parameter {unknown[0]!r} for topology {topo}; known: {', '.join(known)}"
        )
    out: dict[str, float | int] = {}
    for p in spec:
        raw = params.get(p.name, p.default)
        try:
            if p.kind is int:
                if isinstance(raw, float) and not raw.is_integer():
                    raise ValueError
                value: float | int = int(raw)  # type: ignore[call-overload]
                if isinstance(raw, str) and str(value) != raw.strip():
                    raise ValueError
            else:
                value = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            raise TopologyError(
                f"{topo}: {p.name} must be {'a whole number' if p.kind is int else 'a number'}, got {raw!r}"
            ) from None
        if value != value or value < p.minimum or value == float("inf"):
            raise TopologyError(f"{topo}: {p.name} must be >= {p.minimum}, got {raw!r}")
        out[p.name] = value
    return out


def _add_switch(topo: Topology, tier: int, index: int, **where: int) -> str:
    from .model import SWITCH_LETTER_BY_TIER

    name = f"{SWITCH_LETTER_BY_TIER[tier]}{index}"
    topo.add_node(Node(name, "switch", tier, index, **where))
    return name


def server_uplink_gbps(p: Mapping[str, float | int], explicit: Mapping[str, object] | None = None) -> float:
    """A fat-tree server's uplink to its ToR: ``server_uplink_gbps`` (one set of
    NICs shared by the server's GPUs), or with per-GPU NICs (``gpu_nic_gbps > 0``,
    rail-optimised servers) ``gpus_per_server x gpu_nic_gbps``.  The server's NICs
    are one link of their summed rate: the tier-0 link of each GPU stays at
    ``gpu_link_gbps`` (its NVLink/PCIe domain), so one GPU's flow may use the
    NICs of idle neighbours, as multi-rail and PXN transfers do.  ``explicit``
    (the parameters as given) must not set a different ``server_uplink_gbps``."""
    nic = float(p["gpu_nic_gbps"])
    if nic <= 0:
        return float(p["server_uplink_gbps"])
    uplink = int(p["gpus_per_server"]) * nic
    if explicit is not None and "server_uplink_gbps" in explicit and float(p["server_uplink_gbps"]) != uplink:
        raise TopologyError(
            f"fattree: gpu_nic_gbps={nic:g} sets the server uplink to gpus_per_server x gpu_nic_gbps = {uplink:g}; "
            f"server_uplink_gbps={p['server_uplink_gbps']!r} contradicts it (give one of the two)"
        )
    return uplink


def fattree(params: Mapping[str, object]) -> Topology:
    """Four-tier fat-tree: GPUs -> server switches (tier 0) -> ToRs (tier 1)
    -> aggregation (tier 2) -> core (tier 3).  With one pod and no cores it
    stops at tier 2."""
    p = _check(params, FATTREE_PARAMS, "fattree")
    g, s, r, pods = (int(p["gpus_per_server"]), int(p["servers_per_rack"]),
                     int(p["racks_per_pod"]), int(p["pods"]))
    aggs, cores = int(p["aggs_per_pod"]), int(p["cores"])
    if pods > 1 and cores == 0:
        raise TopologyError("fattree: pods > 1 needs cores >= 1 to connect them")
    if pods == 1 and cores > 0:
        raise TopologyError("fattree: a single pod has no use for core switches; set cores=0")
    total = g * s * r * pods
    if total > MAX_GPUS:
        raise TopologyError(f"fattree: {total} GPUs is more than the {MAX_GPUS} the address plan allows")
    p["server_uplink_gbps"] = server_uplink_gbps(p, explicit=params)
    tor_uplink = s * float(p["server_uplink_gbps"]) / (aggs * float(p["tor_oversub"]))
    core_link = r * tor_uplink / (cores * float(p["agg_oversub"])) if cores else 0.0

    topo = Topology("fattree", dict(p))
    core_names = [_add_switch(topo, 3, c) for c in range(cores)]
    gpu = server = rack = 0
    agg_index = 0
    for pod in range(pods):
        agg_names = []
        for _ in range(aggs):
            name = _add_switch(topo, 2, agg_index, pod=pod)
            agg_index += 1
            agg_names.append(name)
            for core in core_names:
                topo.add_link(name, core, core_link)
        for _ in range(r):
            tor = _add_switch(topo, 1, rack, rack=rack, pod=pod)
            for agg in agg_names:
                topo.add_link(tor, agg, tor_uplink)
            for _ in range(s):
                vsw = _add_switch(topo, 0, server, server=server, rack=rack, pod=pod)
                topo.add_link(vsw, tor, float(p["server_uplink_gbps"]))
                for _ in range(g):
                    name = f"g{gpu}"
                    topo.add_node(Node(name, "gpu", -1, gpu, server=server, rack=rack, pod=pod))
                    topo.add_link(name, vsw, float(p["gpu_link_gbps"]))
                    gpu += 1
                server += 1
            rack += 1
    return topo


def leafspine(params: Mapping[str, object]) -> Topology:
    """Two-tier leaf-spine: GPUs on leaves (tier 1), leaves to spines (tier 2)."""
    p = _check(params, LEAFSPINE_PARAMS, "leafspine")
    leaves, per_leaf, spines = int(p["leaves"]), int(p["gpus_per_leaf"]), int(p["spines"])
    if leaves * per_leaf > MAX_GPUS:
        raise TopologyError(f"leafspine: {leaves * per_leaf} GPUs is more than {MAX_GPUS}")
    uplink = per_leaf * float(p["gpu_link_gbps"]) / (spines * float(p["oversub"]))
    topo = Topology("leafspine", dict(p))
    spine_names = [_add_switch(topo, 2, i, pod=0) for i in range(spines)]
    gpu = 0
    for leaf in range(leaves):
        name = _add_switch(topo, 1, leaf, rack=leaf, pod=0)
        for spine in spine_names:
            topo.add_link(name, spine, uplink)
        for _ in range(per_leaf):
            gname = f"g{gpu}"
            topo.add_node(Node(gname, "gpu", -1, gpu, rack=leaf, pod=0))
            topo.add_link(gname, name, float(p["gpu_link_gbps"]))
            gpu += 1
    return topo


def tiny(params: Mapping[str, object]) -> Topology:
    """Four GPUs for tests: two servers of two GPUs, one rack each, one pod
    with two aggregation switches, so cross-rack pairs have two equal paths."""
    _check(params, (), "tiny")
    base = {"gpus_per_server": 2, "servers_per_rack": 1, "racks_per_pod": 2, "pods": 1,
            "aggs_per_pod": 2, "cores": 0, "agg_oversub": 1.0}
    topo = fattree(base)
    topo.name = "tiny"
    return topo


BUILDERS: dict[str, tuple[Callable[[Mapping[str, object]], Topology], tuple[Param, ...], str]] = {
    "fattree": (fattree, FATTREE_PARAMS, "four-tier fat-tree, 64 GPUs by default (the paper's shape)"),
    "leafspine": (leafspine, LEAFSPINE_PARAMS, "two-tier leaf-spine, 16 GPUs by default"),
    "tiny": (tiny, (), "4 GPUs, 6 switches: for tests"),
}
DEFAULT_TOPOLOGY = "fattree"


def fattree_at(gpus: int) -> dict[str, int]:
    """The parameters of the four-tier fat-tree of ``gpus`` GPUs: the default
    fat-tree's pod (8 GPUs per server, 2 servers per rack, 2 racks and 2
    aggregation switches per pod: 32 GPUs), its 2 core switches, its rates and
    its oversubscription per tier, with ``gpus / 32`` pods; the naming and the
    tiers are those of every other run.  TopologyError unless whole pods."""
    defaults = {p.name: p.default for p in FATTREE_PARAMS}
    pod = int(defaults["gpus_per_server"]) * int(defaults["servers_per_rack"]) * int(defaults["racks_per_pod"])
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 2 * pod or gpus % pod:
        raise TopologyError(f"fattree_at: sizes are two or more whole pods of {pod} GPUs, got {gpus!r}")
    return {"pods": gpus // pod}


def names() -> list[str]:
    return list(BUILDERS)


def build(name: str, params: Mapping[str, object] | None = None) -> Topology:
    if name not in BUILDERS:
        raise TopologyError(f"unknown topology {name!r}; known: {', '.join(BUILDERS)}")
    return BUILDERS[name][0](params or {})


def parse_params(items: list[str] | None) -> dict[str, str]:
    """``["pods=4", "cores=2"]`` -> ``{"pods": "4", "cores": "2"}``."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise TopologyError(f"topology parameter {item!r} is not KEY=VALUE")
        if key.strip() in out:
            raise TopologyError(f"topology parameter {key.strip()!r} given twice")
        out[key.strip()] = value.strip()
    return out


def describe_params(name: str) -> str:
    builder = BUILDERS.get(name)
    if builder is None:
        raise TopologyError(f"unknown topology {name!r}; known: {', '.join(BUILDERS)}")
    return "\n".join(f"  {p.name} (default {p.default}): {p.help}" for p in builder[1]) or "  (no parameters)"
