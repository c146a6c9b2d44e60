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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from topologies.model import Node, Topology

SCHEMES = ("mixed", "split-racks", "split-pods", "explicit")
PLACEMENT_KEYS = ("scheme", "prefill", "decode", "hosts")
DEFAULT_PLACEMENT: Mapping[str, Any] = {"scheme": "mixed"}


class PlacementError(ValueError):
    """A placement does not fit the topology or is malformed."""


@dataclass(frozen=True)
class Placement:
    scheme: str
    prefill: tuple[str, ...]
    decode: tuple[str, ...]

    def role_of(self, host: str) -> str:
        if host in self.prefill:
            return "prefill"
        if host in self.decode:
            return "decode"
        raise PlacementError(f"{host} has no role in this placement")

    @property
    def hosts(self) -> tuple[str, ...]:
        return self.prefill + self.decode

    def as_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "prefill": list(self.prefill), "decode": list(self.decode)}


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


def make_placement(topo: Topology, config: Mapping[str, Any] | None = None) -> Placement:
    cfg = dict(DEFAULT_PLACEMENT if config is None else config)
    unknown = sorted(set(cfg) - set(PLACEMENT_KEYS))
    if unknown:
        raise PlacementError(f"unknown placement key {unknown[0]!r}; known: {', '.join(PLACEMENT_KEYS)}")
    scheme = cfg.get("scheme", "mixed")
    if scheme not in SCHEMES:
        raise PlacementError(f"unknown placement scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    if scheme != "explicit" and ("prefill" in cfg or "decode" in cfg):
        raise PlacementError(f"placement lists 'prefill'/'decode' are only for scheme 'explicit', not {scheme!r}")
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


def tier_mix(topo: Topology, placement: Placement) -> dict[int, int]:
    """How many (prefill, decode) pairs sit at each tier distance."""
    out: dict[int, int] = {}
    for p in placement.prefill:
        for d in placement.decode:
            t = topo.tier_distance(p, d)
            out[t] = out.get(t, 0) + 1
    return dict(sorted(out.items()))

