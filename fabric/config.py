"""Testbed configuration: one dataclass, every field with its unit and help.

The full configuration of a bring-up or a run is written as JSON beside its
results so that it can be repeated (``TestbedConfig.from_json``).
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import topologies
from controller.client import DEFAULT_REST_PORT
from fabric import cluster
from fabric.switches import MODES as SWITCH_MODES
from netkv.checks import is_finite_number
from netkv.serving.config import DEFAULT_SCALE
from netkv.serving.config import emulated_mbps as emulated_mbps  # re-exported: its callers import it from here
from topologies import Topology, TopologyError

# 1 emulated bit stands for SCALE real bits; KV payloads are divided by the same
# factor.  40,000 puts the default fat-tree's links at 5-40 Mbit/s.  At 20,000 the
# default run (scenario hotspots) kept the userspace switch process at 88-92% of a
# core on average, saturated at its busiest; see docs/design.md "Scale factor".
PREFIX_RE = re.compile(r"^[a-z]{2,4}$")
IFNAME_MAX = 15  # Linux interface names


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which and what is allowed."""


@dataclass
class TestbedConfig:
    topology: str = field(default=topologies.DEFAULT_TOPOLOGY, metadata={
        "help": f"topology name, one of: {', '.join(topologies.names())}"})
    params: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "topology parameters (KEY=VALUE); see `netkv topo --help-params`"})
    scale: float = field(default=DEFAULT_SCALE, metadata={
        "help": "real bit/s per emulated bit/s; link rates and KV payload bytes are divided by it"})
    prefix: str = field(default="nk", metadata={
        "help": "2-4 lowercase letters put before every bridge, host and interface name; "
                "cleanup removes exactly what carries it"})
    datapath: str = field(default="auto", metadata={
        "help": "Open vSwitch datapath: auto (kernel where the module exists, else user), kernel, user"})
    switch_mode: str = field(default="auto", metadata={
        "help": "Open vSwitch processes: per_switch (each switch its own ovs-vswitchd in its own network "
                "namespace; the userspace datapath then polls only that switch's ports and uses every "
                "core), shared (one ovs-vswitchd for every bridge), auto (per_switch on the userspace "
                "datapath, shared on the kernel datapath)"})
    switch_jemalloc: bool = field(default=False, metadata={
        "help": "per_switch: preload jemalloc (where installed) into every ovs-vswitchd; the userspace "
                "datapath allocates and frees a batch of packet buffers per port per wake-up, but no "
                "gain was measurable (docs/design.md), so it is off unless asked for"})
    of_port: int = field(default=6653, metadata={"help": "controller OpenFlow port on 127.0.0.1"})
    rest_port: int = field(default=DEFAULT_REST_PORT, metadata={"help": "controller REST API port on 127.0.0.1"})
    poll_interval_s: float = field(default=0.5, metadata={
        "help": "controller port-statistics polling interval, seconds (0.1 .. 60)"})
    queue_packets: int = field(default=64, metadata={
        "help": "packets each shaped egress queue holds before it drops (pfifo limit); KV fabrics are "
                "near-lossless (RoCE with PFC), so queues are deep enough that a KV burst rarely drops"})
    mtu_bytes: int = field(default=1500, metadata={"help": "MTU of every emulated link"})
    link_delay_ms: float = field(default=0.0, metadata={
        "help": "one-way delay added at each link end's egress with netem (0: none); needs a kernel "
                "with netem, refused with a clear message where it is missing"})
    tcp_congestion: str = field(default="", metadata={
        "help": "TCP congestion control in every GPU host; empty: the kernel's default (recorded in the "
                "bring-up report). A namespace may only choose one the root namespace allows."})
    ready_timeout_s: float = field(default=60.0, metadata={
        "help": "seconds to wait for the controller to install every switch's routes"})
    servers: list[dict[str, Any]] = field(default_factory=list, metadata={
        "help": f"the machines of the testbed: {cluster.SERVERS_SYNTAX}; whole pods go on each worker, the "
                f"core on the head; a saved configuration's servers section may give each server "
                f"mgmt_mtu_bytes (default {cluster.DEFAULT_MGMT_MTU_BYTES}) and max_gpus (default "
                f"{cluster.DEFAULT_MAX_GPUS}). Empty or one server: this machine alone, as without it. "
                f"More than one: `netkv up` and `netkv run` check every server and build the fabric across "
                f"them (Mininet Cluster Edition); a replay runs each worker on its GPU host's server and puts "
                f"their time stamps on the head's clock"})

    clock_bound_ms: float = field(default=cluster.MAX_CLOCK_UNCERTAINTY_S * 1000, metadata={
        "help": f"across servers: a replay is refused when a server's clock offset to the head is known less "
                f"well than this, and a run whose offset later is, or moves by more, says so (default "
                f"{cluster.MAX_CLOCK_UNCERTAINTY_S * 1000:g}: below one 1,500-byte frame at the slowest link of "
                f"the default fabric; a fabric at another scale may state its own, docs/design.md)"})

    KNOWN_DATAPATHS = ("auto", "kernel", "user")
    __test__ = False  # not a pytest test class, despite its name

    def check_types(self) -> None:
        """Every field has the type of its default (a float field takes a whole
        number too); ConfigError naming the first that does not."""
        for f in fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc, operator]
            if isinstance(default, bool):
                ok, kind = isinstance(value, bool), "true or false"
            elif isinstance(default, int):
                ok, kind = isinstance(value, int) and not isinstance(value, bool), "a whole number"
            elif isinstance(default, float):
                ok, kind = is_finite_number(value), "a finite number"
            elif isinstance(default, str):
                ok, kind = isinstance(value, str), "a string"
            elif isinstance(default, list):
                ok, kind = isinstance(value, list), "a JSON array"
            else:
                ok, kind = isinstance(value, dict), "a JSON object"
            if not ok:
                raise ConfigError(f"{f.name} must be {kind}, got {value!r}")

    def validate(self) -> Topology:
        """Check every field; returns the built topology.  Raises ConfigError."""
        self.check_types()
        check_prefix(self.prefix)
        if self.datapath not in self.KNOWN_DATAPATHS:
            raise ConfigError(f"datapath must be one of {', '.join(self.KNOWN_DATAPATHS)}, got {self.datapath!r}")
        if self.switch_mode not in SWITCH_MODES:
            raise ConfigError(f"switch_mode must be one of {', '.join(SWITCH_MODES)}, got {self.switch_mode!r}")
        if self.switch_mode == "per_switch" and self.datapath == "kernel":
            raise ConfigError("switch_mode per_switch runs the userspace datapath; with datapath kernel "
                              "use switch_mode shared (or auto)")
        if not isinstance(self.switch_jemalloc, bool):
            raise ConfigError(f"switch_jemalloc must be true or false, got {self.switch_jemalloc!r}")
        if not (self.scale >= 1):
            raise ConfigError(f"scale must be >= 1, got {self.scale}")
        for name in ("of_port", "rest_port"):
            port = getattr(self, name)
            if not isinstance(port, int) or not 1024 <= port <= 65535:
                raise ConfigError(f"{name} must be a port in 1024..65535, got {port!r}")
        if self.of_port == self.rest_port:
            raise ConfigError("of_port and rest_port must differ")
        if not 0.1 <= self.poll_interval_s <= 60:
            raise ConfigError(f"poll_interval_s must be 0.1 .. 60, got {self.poll_interval_s}")
        if not 2 <= self.queue_packets <= 10_000:
            raise ConfigError(f"queue_packets must be 2 .. 10000, got {self.queue_packets}")
        if not 576 <= self.mtu_bytes <= 9000:
            raise ConfigError(f"mtu_bytes must be 576 .. 9000, got {self.mtu_bytes}")
        if self.tcp_congestion and not re.match(r"^[a-z0-9_]{1,16}$", self.tcp_congestion):
            raise ConfigError(f"tcp_congestion must be an algorithm name like cubic, got {self.tcp_congestion!r}")
        if not 0 <= self.link_delay_ms <= 1000:
            raise ConfigError(f"link_delay_ms must be 0 .. 1000, got {self.link_delay_ms}")
        if not 1 <= self.ready_timeout_s <= 600:
            raise ConfigError(f"ready_timeout_s must be 1 .. 600, got {self.ready_timeout_s}")
        if not 0.01 <= self.clock_bound_ms <= 1000:
            raise ConfigError(f"clock_bound_ms must be 0.01 .. 1000, got {self.clock_bound_ms}")
        try:
            topo = topologies.build(self.topology, self.params)
        except TopologyError as exc:
            raise ConfigError(str(exc)) from None
        longest = max(len(self.prefix + n.name) for n in topo.nodes.values())
        max_port = max(max(l.a_port, l.b_port) for l in topo.links)
        if longest + len(f"-eth{max_port}") > IFNAME_MAX:
            raise ConfigError(
                f"names too long for Linux interfaces ({IFNAME_MAX} chars): "
                f"use a shorter prefix or a smaller topology")
        self.cluster_plan(topo)
        return topo

    def server_list(self) -> list[cluster.Server]:
        """The ``servers`` section as checked records (empty: this machine alone)."""
        try:
            return cluster.servers_from_json(self.servers)
        except cluster.ClusterError as exc:
            raise ConfigError(str(exc)) from None

    def cluster_plan(self, topo: Topology) -> cluster.ClusterPlan | None:
        """With more than one server: where every node runs and which links
        cross machines, or ConfigError when that cannot fit or would fragment;
        None on one machine."""
        servers = self.server_list()
        if len(servers) <= 1:
            return None
        try:
            return cluster.plan(topo, servers, prefix=self.prefix, mtu_bytes=self.mtu_bytes, scale=self.scale)
        except cluster.ClusterError as exc:
            raise ConfigError(str(exc)) from None

    def to_json(self) -> dict[str, Any]:
        """Every field; ``servers`` and ``clock_bound_ms`` only with servers,
        so that a configuration of one machine is written exactly as before
        those fields existed."""
        out = asdict(self)
        if not self.servers:
            del out["servers"]
            del out["clock_bound_ms"]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TestbedConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"testbed configuration must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ConfigError(f"unknown testbed setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return cls(**dict(data))

    @classmethod
    def load(cls, path: Path) -> "TestbedConfig":
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read testbed configuration {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_json(data)


def check_prefix(prefix: str) -> str:
    """An instance prefix: 2-4 lowercase letters (raises ConfigError)."""
    if not PREFIX_RE.match(prefix):
        raise ConfigError(f"prefix must be 2-4 lowercase letters, got {prefix!r}")
    return prefix

