"""Prometheus text exposition (format 0.0.4) of the controller's telemetry.

Link loads are exported in real-world bit/s (the emulated rate times the scale
factor), the same units as the topology's configured rates, so dashboards read
the fabric being modelled; ``netkv_link_emulated_load_bits_per_second`` has the raw figure.
"""

from __future__ import annotations

from typing import Iterable

from .state import ControllerState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, object]]) -> str:
    inner = ",".join(f'{k}="{escape_label(str(v))}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


def _num(value: float | int) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: Iterable[tuple[str, object]], value: float | int) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_num(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(state: ControllerState, now: float) -> str:
    rates = sorted(state.latest(), key=lambda r: (r.tier, r.src, r.dst))
    totals = state.totals()
    queues = state.queues()
    status = state.status(now)
    poller = status["poller"]
    assert isinstance(poller, dict)
    w = _Writer()

    def hop_labels(src: str, dst: str, tier: int) -> list[tuple[str, object]]:
        return [("src", src), ("dst", dst), ("tier", tier)]

    w.family("netkv_link_load_bits_per_second", "gauge", "Real-world bit/s carried by the directed link in its latest interval")
    for r in rates:
        w.sample("netkv_link_load_bits_per_second", hop_labels(r.src, r.dst, r.tier), r.load_gbps * 1e9)
    w.family("netkv_link_emulated_load_bits_per_second", "gauge", "Emulated bit/s measured on the directed link")
    for r in rates:
        w.sample("netkv_link_emulated_load_bits_per_second", hop_labels(r.src, r.dst, r.tier), r.rate_bps)
    w.family("netkv_link_capacity_bits_per_second", "gauge", "Real-world configured rate of the directed link")
    for r in rates:
        w.sample("netkv_link_capacity_bits_per_second", hop_labels(r.src, r.dst, r.tier), r.capacity_gbps * 1e9)
    w.family("netkv_link_utilization_ratio", "gauge", "Latest load divided by configured rate (0..1)")
    for r in rates:
        w.sample("netkv_link_utilization_ratio", hop_labels(r.src, r.dst, r.tier), r.utilization)
    w.family("netkv_link_drops_total", "counter", "Port-counter drops charged to the link since the controller started")
    for r in rates:
        w.sample("netkv_link_drops_total", hop_labels(r.src, r.dst, r.tier), totals.get((r.src, r.dst), (0, 0))[0])
    w.family("netkv_link_errors_total", "counter", "Port-counter errors charged to the link since the controller started")
    for r in rates:
        w.sample("netkv_link_errors_total", hop_labels(r.src, r.dst, r.tier), totals.get((r.src, r.dst), (0, 0))[1])
    w.family("netkv_link_telemetry_age_seconds", "gauge", "Seconds since the link's latest sample was taken")
    for r in rates:
        w.sample("netkv_link_telemetry_age_seconds", hop_labels(r.src, r.dst, r.tier), max(0.0, now - r.t_s))

    tiers = {(l.a, l.b): l.tier for l in state.topo.links}
    tiers.update({(l.b, l.a): l.tier for l in state.topo.links})
    qrows = sorted(queues.items())
    w.family("netkv_queue_backlog_bytes", "gauge", "Bytes waiting in the switch interface's egress queue (tc)")
    for (src, dst), q in qrows:
        w.sample("netkv_queue_backlog_bytes", hop_labels(src, dst, tiers[(src, dst)]) + [("interface", q.interface)],
                 q.backlog_bytes)
    w.family("netkv_queue_backlog_packets", "gauge", "Packets waiting in the switch interface's egress queue (tc)")
    for (src, dst), q in qrows:
        w.sample("netkv_queue_backlog_packets", hop_labels(src, dst, tiers[(src, dst)]) + [("interface", q.interface)],
                 q.backlog_packets)
    w.family("netkv_queue_drops_total", "counter", "Packets the egress qdisc dropped since it was created (tc)")
    for (src, dst), q in qrows:
        w.sample("netkv_queue_drops_total", hop_labels(src, dst, tiers[(src, dst)]) + [("interface", q.interface)],
                 q.drops_total)

    w.family("netkv_poll_rounds_total", "counter", "Port-statistics rounds the controller sent")
    w.sample("netkv_poll_rounds_total", [], int(poller["rounds"]))  # type: ignore[call-overload]
    w.family("netkv_poll_replies_total", "counter", "Port-statistics replies received in time")
    w.sample("netkv_poll_replies_total", [], int(poller["replies_received"]))  # type: ignore[call-overload]
    w.family("netkv_poll_replies_missing_total", "counter", "Rounds a switch did not answer before the next round")
    missing = poller["missing_by_switch"]
    assert isinstance(missing, dict)
    # one series per switch, zeros included, and no aggregate series: sum() adds them up
    for name in sorted({sw.name for sw in state.topo.switches} | set(missing)):
        w.sample("netkv_poll_replies_missing_total", [("switch", name)], int(missing.get(name, 0)))
    w.family("netkv_poll_replies_late_total", "counter", "Replies that arrived after their round was closed")
    w.sample("netkv_poll_replies_late_total", [], int(poller["replies_late"]))  # type: ignore[call-overload]
    w.family("netkv_counter_resets_total", "counter", "Port counters that went backwards (new baseline)")
    w.sample("netkv_counter_resets_total", [], int(poller["counter_resets"]))  # type: ignore[call-overload]
    w.family("netkv_poller_up", "gauge", "1 while the statistics poller runs and is not stalled")
    w.sample("netkv_poller_up", [], bool(poller["alive"]))
    w.family("netkv_poll_interval_seconds", "gauge", "Configured port-statistics polling interval")
    w.sample("netkv_poll_interval_seconds", [], state.poll_interval_s)
    w.family("netkv_switches_connected", "gauge", "Switches of the topology connected over OpenFlow")
    w.sample("netkv_switches_connected", [], int(status["switches_connected"]))  # type: ignore[call-overload]
    w.family("netkv_switches_expected", "gauge", "Switches in the topology")
    w.sample("netkv_switches_expected", [], int(status["switches_expected"]))  # type: ignore[call-overload]
    w.family("netkv_scale_factor", "gauge", "Real-world bit/s per emulated bit/s")
    w.sample("netkv_scale_factor", [], state.scale)
    return w.text()
