"""Commands that shape and tune the emulated links, built as argv lists.

Nothing here runs anything: the functions return lists (or ``tc -batch`` /
``ip -batch`` lines) that :mod:`fabric.net` executes, so they are unit-tested
and logged as they are.

Each end of a link gets an htb root with one class at the emulated rate and a
pfifo leaf holding ``queue_packets`` packets.  Shaping both ends is what a
physical link does (each side's transmitter is the limit); shaping the host
end inside its namespace also lets the host's TCP stack feel back-pressure
before the switch process does, which the userspace datapath needs.
"""

from __future__ import annotations

import math

HTB_HANDLE = "1:"
HTB_CLASS = "1:1"
LEAF_HANDLE = "10:"
BURST_S = 0.001  # htb bucket: one millisecond of the rate


def htb_burst_bytes(rate_mbps: float, mtu_bytes: int) -> int:
    """htb's bucket: what a link may send at once after it was idle.

    A real link never bursts above its rate, so the bucket is kept small:
    half a millisecond of the rate, and never less than two full frames
    (htb needs room for one frame plus the one in flight).  With high-
    resolution timers htb keeps the rate with such a bucket; a larger one
    makes short transfers after an idle period faster than the link."""
    return int(max(4 * (mtu_bytes + 14), math.ceil(rate_mbps * 1e6 / 8 * BURST_S)))


def rate_kbit(rate_mbps: float) -> int:
    if not rate_mbps > 0:
        raise ValueError(f"link rate must be > 0 Mbit/s, got {rate_mbps}")
    return max(8, round(rate_mbps * 1000))


def tc_batch_lines(ifname: str, rate_mbps: float, mtu_bytes: int, queue_packets: int,
                   delay_ms: float = 0.0) -> list[str]:
    """``tc -batch`` lines that shape one interface's egress.

    With ``delay_ms`` > 0 the leaf is netem (delay plus the same queue limit)
    instead of pfifo; the caller checks that the kernel has netem."""
    if delay_ms < 0:
        raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
    leaf = (f"netem delay {delay_ms:g}ms limit {queue_packets}" if delay_ms > 0
            else f"pfifo limit {queue_packets}")
    return [
        f"qdisc replace dev {ifname} root handle {HTB_HANDLE} htb default 1",
        tc_class_line(ifname, rate_mbps, mtu_bytes),
        f"qdisc replace dev {ifname} parent {HTB_CLASS} handle {LEAF_HANDLE} {leaf}",
    ]


def tc_class_line(ifname: str, rate_mbps: float, mtu_bytes: int) -> str:
    """The htb class at the link's rate: alone, it re-rates a shaped interface
    in place (a link_rate fault; the leaf queue and its packets stay)."""
    kbit = rate_kbit(rate_mbps)
    burst = htb_burst_bytes(rate_mbps, mtu_bytes)
    return (f"class replace dev {ifname} parent {HTB_HANDLE} classid {HTB_CLASS} htb "
            f"rate {kbit}kbit ceil {kbit}kbit burst {burst} cburst {burst} quantum {mtu_bytes + 14}")


def ethtool_offloads_off(ifname: str) -> list[str]:
    """The userspace datapath forwards frames without checksums or segmentation:
    TCP stalls unless every veth computes its own checksums and segments."""
    return ["ethtool", "-K", ifname, "tx", "off", "rx", "off", "tso", "off", "gso", "off", "gro", "off"]


def host_sysctls(tcp_congestion: str) -> list[str]:
    """``sysctl -w`` arguments for every GPU host namespace.

    * slow start after idle off: KV connections are kept open between
      transfers (as RDMA queue pairs would be); a pause must not reset cwnd.
    * one named TCP congestion control for every host, whatever the machine's
      default is (see TestbedConfig.tcp_congestion).
    * IPv6 off: only the IPv4 KV traffic the controller routes crosses the fabric.
    """
    return [
        "net.ipv4.tcp_slow_start_after_idle=0",
        *([f"net.ipv4.tcp_congestion_control={tcp_congestion}"] if tcp_congestion else []),
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ]


# Minimum TCP retransmission timeout on the fabric's route.  Linux's default
# (200 ms) is tuned for the wide area; one tail drop would then stall a KV
# transfer of tens of milliseconds for 200 ms.  Datacenter stacks lower it,
# and the RDMA transports that carry KV caches retransmit in microseconds to
# milliseconds.  It is only a floor: the kernel's timeout still follows the
# measured round trip, queueing included, so a full queue on a slow link
# (32 frames at 10 Mbit/s hold 39 ms) raises it above the floor by itself.
RTO_MIN_MS = 10


def fabric_route(ifname: str, host_ip: str, prefix_len: int = 16) -> str:
    """``ip -batch`` line for the host's route to the fabric, with rto_min."""
    octets = host_ip.split(".")
    net = ".".join(octets[:2] + ["0", "0"]) if prefix_len == 16 else host_ip
    return (f"route replace {net}/{prefix_len} dev {ifname} proto kernel scope link src {host_ip} "
            f"rto_min {RTO_MIN_MS}ms")
