"""Which GPU hosts play prefill and which play decode.

A placement is configuration, a small dict checked against the topology::

    {"scheme": "mixed"}                      # default
    {"scheme": "split-racks"}
    {"scheme": "split-pods"}
    {"scheme": "explicit", "prefill": ["g0", "g1"], "decode": ["g8", "g9"]}

* ``mixed``: inside every server, GPUs alternate P, D, P, D... by their local
  index (32 P + 32 D on the default 64-GPU fat-tree).  Every prefill then has
  decode candidates at every tier distance (same server, rack, pod, core).
* ``split-racks``: racks alternate: even-numbered racks all prefill, odd racks
  all decode.  Every P-to-D transfer leaves the rack (tier >= 2).
* ``split-pods``: pods alternate the same way; every transfer crosses the core.
* ``explicit``: the given lists.

Optional for every scheme: ``"hosts": [...]`` restricts the placement to those
GPU hosts (e.g. a small run on part of the fabric); the scheme is applied to
them in topology order.

Tensor parallelism (``make_placement(..., tp=k)``, k > 1: the model is served
by instances of k GPUs): an *instance* is k consecutive GPU hosts of one
server, at local GPU indices ``[j*k, (j+1)*k)`` (on an 8-GPU server at TP 4:
GPUs 0-3 and 4-7).  The host at local index ``j*k`` is rank 0 and names the
instance; the others are ranks 1..k-1 in index order.  A topology whose
servers do not hold a whole number of instances is refused.  The schemes then
place instances instead of hosts: ``mixed`` alternates P, D over the
instances in topology order (inside a server that holds several, across
servers when each holds one); ``split-racks`` and ``split-pods`` as above;
``explicit`` lists and ``hosts`` must name whole instances (every rank).
At ``tp=1`` every host is its own instance and nothing above changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from topologies.model import Node, Topology

SCHEMES = ("mixed", "split-racks", "split-pods", "explicit")
PLACEMENT_KEYS = ("scheme", "prefill", "decode", "hosts")
DEFAULT_PLACEMENT: Mapping[str, Any] = {"scheme": "mixed"}


class PlacementError(ValueError):
    """A placement does not fit the topology or is malformed."""


@dataclass(frozen=True)
class Placement:
    """``prefill`` and ``decode`` name the instances (each by its rank-0 GPU
    host); ``ranks`` gives the GPU hosts of every instance in rank order when
    ``tp > 1`` (empty at ``tp = 1``, where an instance is its one host)."""

    scheme: str
    prefill: tuple[str, ...]
    decode: tuple[str, ...]
    tp: int = 1
    ranks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # prefill and decode as one set: membership without a scan of the tuples (4,096 instances at scale)
    _instances: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_instances", frozenset(self.prefill) | frozenset(self.decode))

    def ranks_of(self, instance: str) -> tuple[str, ...]:
        """The GPU hosts of ``instance``, rank 0 first."""
        if self.tp == 1:
            if instance not in self._instances:
                raise PlacementError(f"{instance} is not an instance of this placement")
            return (instance,)
        if instance not in self.ranks:
            raise PlacementError(f"{instance} is not an instance of this placement")
        return self.ranks[instance]

    def role_of(self, host: str) -> str:
        """The role of an instance, or of any GPU host of one."""
        if host in self.prefill:
            return "prefill"
        if host in self.decode:
            return "decode"
        for instance, hosts in self.ranks.items():
            if host in hosts:
                return self.role_of(instance)
        raise PlacementError(f"{host} has no role in this placement")

    @property
    def instances(self) -> tuple[str, ...]:
        return self.prefill + self.decode

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every GPU host of every instance (prefill instances first)."""
        return tuple(h for instance in self.instances for h in self.ranks_of(instance))

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scheme": self.scheme, "prefill": list(self.prefill), "decode": list(self.decode)}
        if self.tp > 1:
            out["tp"] = self.tp
            out["ranks"] = {instance: list(self.ranks[instance]) for instance in self.instances}
        return out


def _host_list(topo: Topology, raw: object, key: str) -> list[str]:
    if not isinstance(raw, (list, tuple)) or not all(isinstance(h, str) for h in raw):
        raise PlacementError(f"placement {key!r} must be a list of GPU host names, got {raw!r}")
    gpus = set(topo.gpu_names())
    seen: set[str] = set()
    for host in raw:
        if host not in gpus:
            raise PlacementError(
                f"placement {key!r}: {host!r} is not a GPU host of topology {topo.name} "
                f"(g0..g{len(gpus) - 1})"
            )
        if host in seen:
            raise PlacementError(f"placement {key!r}: {host!r} listed twice")
        seen.add(host)
    return list(raw)


def _alternate_by(nodes: list[Node], key: Callable[[Node], int], what: str) -> tuple[list[str], list[str]]:
    groups = sorted({key(n) for n in nodes})
    if len(groups) < 2:
        raise PlacementError(f"scheme split-{what}s needs at least 2 {what}s among the hosts, found {len(groups)}")
    rank = {g: i for i, g in enumerate(groups)}
    prefill = [n.name for n in nodes if rank[key(n)] % 2 == 0]
    decode = [n.name for n in nodes if rank[key(n)] % 2 == 1]
    return prefill, decode


def tp_instances(topo: Topology, tp: int) -> list[tuple[str, ...]]:
    """Every tensor-parallel instance of ``tp`` GPUs the topology holds, in
    topology order: per server, its GPUs at local indices ``[j*tp, (j+1)*tp)``,
    rank 0 first.  A topology whose servers cannot hold a whole number of
    instances is refused with one line."""
    _check_tp(tp)
    by_server: dict[int, list[str]] = {}
    for n in topo.gpus:
        if n.server is None:
            raise PlacementError(f"tp={tp}: topology {topo.name} has no servers (GPU {n.name} is in none), "
                                 "and a tensor-parallel instance is GPUs of one server")
        by_server.setdefault(n.server, []).append(n.name)
    uneven = sorted({len(hosts) for hosts in by_server.values() if len(hosts) % tp})
    if uneven:
        raise PlacementError(f"tp={tp}: topology {topo.name} has servers of {uneven[0]} GPUs, which cannot hold "
                             f"whole instances of {tp} GPUs of one server; use a tp that divides the GPUs per server")
    return [tuple(hosts[i:i + tp]) for hosts in by_server.values() for i in range(0, len(hosts), tp)]


def _check_tp(tp: object) -> None:
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise PlacementError(f"tp must be a whole number >= 1, got {tp!r}")


def _whole_instances(topo: Topology, raw: object, key: str, instance_of: Mapping[str, tuple[str, ...]],
                     tp: int) -> list[str]:
    """The instances (rank-0 names, in order of first mention) a host list
    names; every rank of each must be listed."""
    hosts = _host_list(topo, raw, key)
    listed = set(hosts)
    out: list[str] = []
    for host in hosts:
        group = instance_of[host]
        if group[0] in out:
            continue
        missing = [h for h in group if h not in listed]
        if missing:
            raise PlacementError(f"placement {key!r} names part of TP instance {group[0]} ({', '.join(group)}) "
                                 f"but not {', '.join(missing)}; with tp={tp} list every GPU of an instance")
        out.append(group[0])
    return out


def _tp_placement(topo: Topology, cfg: Mapping[str, Any], scheme: str, tp: int) -> Placement:
    """:func:`make_placement` for ``tp > 1``: the schemes applied to instances."""
    groups = tp_instances(topo, tp)
    instance_of = {h: g for g in groups for h in g}
    if "hosts" in cfg:
        wanted = set(_host_list(topo, cfg["hosts"], "hosts"))
        for g in groups:
            taken = [h for h in g if h in wanted]
            if taken and len(taken) < tp:
                raise PlacementError(f"placement 'hosts' takes {len(taken)} of the {tp} GPUs of TP instance "
                                     f"{g[0]} ({', '.join(g)}); with tp={tp} list whole instances")
        groups = [g for g in groups if g[0] in wanted]
    if scheme == "explicit":
        if "prefill" not in cfg or "decode" not in cfg:
            raise PlacementError("scheme 'explicit' needs both 'prefill' and 'decode' lists")
        prefill = _whole_instances(topo, cfg["prefill"], "prefill", instance_of, tp)
        decode = _whole_instances(topo, cfg["decode"], "decode", instance_of, tp)
        both = sorted(set(prefill) & set(decode))
        if both:
            raise PlacementError(f"TP instance {both[0]} ({', '.join(instance_of[both[0]])}) is listed as both "
                                 "prefill and decode")
        if "hosts" in cfg:
            inside = {g[0] for g in groups}
            outside = [i for i in prefill + decode if i not in inside]
            if outside:
                raise PlacementError(f"TP instance {outside[0]} is not among placement 'hosts'")
    elif scheme == "mixed":
        prefill = [g[0] for g in groups[0::2]]
        decode = [g[0] for g in groups[1::2]]
    else:
        what = "rack" if scheme == "split-racks" else "pod"
        nodes = [topo.node(g[0]) for g in groups]
        where: Callable[[Node], int | None] = (lambda n: n.rack) if what == "rack" else (lambda n: n.pod)
        if any(where(n) is None for n in nodes):
            raise PlacementError(f"topology {topo.name} has no {what}s; use another scheme")
        prefill, decode = _alternate_by(nodes, lambda n: int(where(n) or 0), what)
    if not prefill or not decode:
        raise PlacementError(
            f"placement {scheme!r} gives {len(prefill)} prefill and {len(decode)} decode instances of {tp} GPUs; "
            "each role needs at least one"
        )
    return Placement(scheme, tuple(prefill), tuple(decode), tp,
                     {name: instance_of[name] for name in prefill + decode})


def make_placement(topo: Topology, config: Mapping[str, Any] | None = None, tp: int = 1) -> Placement:
    """The placement ``config`` asks for on ``topo``, for instances of ``tp``
    GPUs (the perf model's tensor-parallel degree)."""
    _check_tp(tp)
    cfg = dict(DEFAULT_PLACEMENT if config is None else config)
    unknown = sorted(set(cfg) - set(PLACEMENT_KEYS))
    if unknown:
        raise PlacementError(f"unknown placement key {unknown[0]!r}; known: {', '.join(PLACEMENT_KEYS)}")
    scheme = cfg.get("scheme", "mixed")
    if scheme not in SCHEMES:
        raise PlacementError(f"unknown placement scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    if scheme != "explicit" and ("prefill" in cfg or "decode" in cfg):
        raise PlacementError(f"placement lists 'prefill'/'decode' are only for scheme 'explicit', not {scheme!r}")
    if tp > 1:
        return _tp_placement(topo, cfg, scheme, tp)
    if "hosts" in cfg:
        wanted = set(_host_list(topo, cfg["hosts"], "hosts"))
        nodes = [n for n in topo.gpus if n.name in wanted]
    else:
        nodes = list(topo.gpus)
    if scheme == "explicit":
        if "prefill" not in cfg or "decode" not in cfg:
            raise PlacementError("scheme 'explicit' needs both 'prefill' and 'decode' lists")
        prefill = _host_list(topo, cfg["prefill"], "prefill")
        decode = _host_list(topo, cfg["decode"], "decode")
        both = sorted(set(prefill) & set(decode))
        if both:
            raise PlacementError(f"{both[0]} is listed as both prefill and decode")
        if "hosts" in cfg:
            outside = [h for h in prefill + decode if h not in {n.name for n in nodes}]
            if outside:
                raise PlacementError(f"{outside[0]} is not among placement 'hosts'")
    elif scheme == "mixed":
        local: dict[int | None, int] = {}
        prefill, decode = [], []
        for n in nodes:
            i = local.get(n.server, 0)
            local[n.server] = i + 1
            (prefill if i % 2 == 0 else decode).append(n.name)
    elif scheme == "split-racks":
        if any(n.rack is None for n in nodes):
            raise PlacementError(f"topology {topo.name} has no racks; use another scheme")
        prefill, decode = _alternate_by(nodes, lambda n: int(n.rack or 0), "rack")
    else:
        if any(n.pod is None for n in nodes):
            raise PlacementError(f"topology {topo.name} has no pods; use another scheme")
        prefill, decode = _alternate_by(nodes, lambda n: int(n.pod or 0), "pod")
    if not prefill or not decode:
        raise PlacementError(
            f"placement {scheme!r} gives {len(prefill)} prefill and {len(decode)} decode hosts; "
            "each role needs at least one"
        )
    return Placement(scheme, tuple(prefill), tuple(decode))


def tier_mix(topo: Topology, placement: Placement,
             tier: Callable[[str, str], int] | None = None) -> dict[int, int]:
    """How many (prefill, decode) instance pairs sit at each tier distance
    (of their rank-0 hosts: every rank pair of two instances has the same,
    since each instance is within one server).  ``tier``: where the pairs'
    tiers are known already (an oracle's path table), else the topology's."""
    tier_of = topo.tier_distance if tier is None else tier
    out: dict[int, int] = {}
    for p in placement.prefill:
        for d in placement.decode:
            t = tier_of(p, d)
            out[t] = out.get(t, 0) + 1
    return dict(sorted(out.items()))

