"""Checks of a running fabric: reachability of GPU pairs at every tier
distance (bring-up's last step) and the flow tables as Open vSwitch holds
them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from controller.routing import FLOW_COOKIE, FlowEntry
from fabric import system
from fabric.system import BringUpError

if TYPE_CHECKING:
    from fabric.net import Testbed


def flow_tables(tb: "Testbed") -> dict[str, list["FlowEntry"]]:
    """The controller's entries as Open vSwitch holds them, per switch name."""
    tables = {}
    for sw in tb.topo.switches:
        bridge = tb.mn_name(sw.name)
        target = f"unix:{tb.switch_paths(sw.name).mgmt(bridge)}" if tb.per_switch else bridge
        text = system.run(tb.sites.on(sw.name, ["ovs-ofctl", "-O", "OpenFlow13", "dump-flows", target])).stdout
        tables[sw.name] = parse_flow_dump(sw.name, text)
    return tables


def ping_pairs(tb: "Testbed") -> list[tuple[str, str]]:
    """Every GPU pings its farthest peer (all uplinks are crossed) and its
    nearest one (all GPU links and server switches are crossed)."""
    gpus = tb.topo.gpu_names()
    pairs: list[tuple[str, str]] = []
    for src in gpus:
        by_tier: dict[int, str] = {}
        for dst in gpus:
            if dst != src:
                by_tier.setdefault(tb.topo.tier_distance(src, dst), dst)
        tiers = sorted(by_tier)
        pairs.append((src, by_tier[tiers[-1]]))
        if tiers[0] != tiers[-1]:
            pairs.append((src, by_tier[tiers[0]]))
    return pairs


def ping(tb: "Testbed", pairs: Sequence[tuple[str, str]], *, count: int = 1,
         timeout_s: int = 2) -> list[tuple[str, str, bool]]:
    commands = [tb.in_host(src, ["ping", "-n", "-q", "-c", str(count), "-W", str(timeout_s),
                                   tb.topo.ip_of(dst)]) for src, dst in pairs]
    results = system.run_many(commands, workers=32 if not tb.sites.cluster else tb.parallel)
    return [(src, dst, r.returncode == 0) for (src, dst), r in zip(pairs, results)]


def verify_reachability(tb: "Testbed", pairs: Sequence[tuple[str, str]] | None = None) -> None:
    pairs = list(pairs) if pairs is not None else ping_pairs(tb)
    results = ping(tb, pairs)
    failed = [(s, d) for s, d, ok in results if not ok]
    if failed:  # the first packet may race a late flow entry: one retry
        retry = ping(tb, failed, count=2)
        failed = [(s, d) for s, d, ok in retry if not ok]
    report = tb.report
    report.pings_total = len(pairs)
    report.pings_ok = len(pairs) - len(failed)
    report.failed_pairs = failed
    for src, dst in pairs:
        if (src, dst) not in failed:
            tier = tb.topo.tier_distance(src, dst)
            report.pings_by_tier[tier] = report.pings_by_tier.get(tier, 0) + 1
    if failed:
        shown = ", ".join(f"{s}->{d}" for s, d in failed[:5])
        raise BringUpError(f"{len(failed)} of {len(pairs)} GPU pairs cannot reach each other: {shown}")


def parse_flow_dump(switch: str, text: str) -> list["FlowEntry"]:
    """Entries of ``ovs-ofctl -O OpenFlow13 dump-flows`` that carry this
    controller's cookie, as :class:`controller.routing.FlowEntry`."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("cookie="):
            continue
        match_part, _, actions = line.partition(" actions=")
        fields: dict[str, str] = {}
        for item in match_part.replace(" ", ",").split(","):
            key, _, value = item.partition("=")
            if key:
                fields[key] = value
        if int(fields.get("cookie", "0"), 16) != FLOW_COOKIE:
            continue
        if not actions.startswith("output:"):
            raise ValueError(f"{switch}: unexpected actions {actions!r}")
        out.append(FlowEntry(switch, int(fields.get("priority", "32768")), fields["nw_dst"],
                             fields.get("nw_src"), int(actions[len("output:"):])))
    return sorted(out)
