"""Topology descriptions as plain data: no Mininet, no root."""

from .catalog import BUILDERS, DEFAULT_TOPOLOGY, build, describe_params, names, parse_params
from .model import (
    SWITCH_LETTER_BY_TIER,
    TIER_NAMES,
    Hop,
    Link,
    Node,
    Topology,
    TopologyError,
    gpu_ip,
    gpu_mac,
)

__all__ = [
    "BUILDERS", "DEFAULT_TOPOLOGY", "build", "describe_params", "names", "parse_params",
    "SWITCH_LETTER_BY_TIER", "TIER_NAMES", "Hop", "Link", "Node", "Topology", "TopologyError",
    "gpu_ip", "gpu_mac",
]
