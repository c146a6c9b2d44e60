"""What every network cost oracle answers, and the figures they share.

An oracle answers ``estimate(src, dst, size_bytes, now_s)`` with an
:class:`Estimate` whose transfer time is linear in the payload::

    transfer_ms = base_latency_ms[tier] + size_bytes * 8 / (available_gbps * 1e6)

(the kinds of oracle: :mod:`netkv.oracle`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .paths import TransferTable

# tier distance -> fixed latency (ms) of one transfer; see the module docstring.
BASE_LATENCY_MS_BY_TIER: Mapping[int, float] = {
    -1: 0.0,  # same GPU: nothing crosses a link
    0: 0.002,  # same server: NVLink/PCIe peer copy setup + completion (~2 us)
    1: 0.004,  # same rack: NIC send/receive (~2 us) + PCIe + one ToR (~1 us) + cable
    2: 0.006,  # same pod: + ToR -> aggregation -> ToR (two more switch hops)
    3: 0.008,  # across the core: + aggregation -> core -> aggregation
}


# Available bandwidth on a hop never drops below this fraction of capacity.
MIN_AVAILABLE_FRACTION = 0.01


# Default maximum telemetry age: the controller polls every 0.5 s, so a live
# sample is at most ~0.5 s plus polling latency old; 2 s is four polls.
DEFAULT_MAX_AGE_MS = 2000.0


# A link that is down carries nothing: its capacity is priced at this (real
# Gbit/s), so a path that still crosses it (no equal-cost path avoids it) costs
# about 8e3 ms per KB, orders of magnitude above any live path, while every
# figure stays finite (a zero-byte transfer costs 0, never NaN).
DOWN_LINK_GBPS = 1e-9


@dataclass(frozen=True)
class Estimate:
    transfer_ms: float
    available_gbps: float
    base_latency_ms: float
    tier: int
    hops: int
    telemetry_age_ms: float | None
    source: str  # "telemetry" | "static" | "static-fallback"
    reason: str = ""


@runtime_checkable
class Oracle(Protocol):
    def estimate(self, src: str, dst: str, size_bytes: int, now_s: float) -> Estimate: ...


@runtime_checkable
class LinearOracle(Oracle, Protocol):
    """An oracle whose transfer time is ``base_latency_ms + size_bytes * ms_per_byte``
    and which can say so (the fast path schedulers use)."""

    def transfer_model(self, src: str, dst: str, now_s: float) -> tuple[int, float, float]: ...

    def transfer_table(self, src: str, now_s: float) -> "TransferTable": ...

    def tier(self, src: str, dst: str) -> int: ...


def ms_per_byte(available_gbps: float) -> float:
    """Milliseconds one byte takes at ``available_gbps`` real Gbit/s."""
    return 8.0 / (available_gbps * 1e6)


def check_latencies(base_latency_ms_by_tier: Mapping[int, float] | None) -> dict[int, float]:
    table = dict(BASE_LATENCY_MS_BY_TIER if base_latency_ms_by_tier is None else base_latency_ms_by_tier)
    for tier in (-1, 0, 1, 2, 3):
        if tier not in table:
            raise ValueError(f"base_latency_ms_by_tier lacks tier {tier}; needs tiers -1..3, got {sorted(table)}")
    for tier, value in table.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"base latency of tier {tier} must be finite and >= 0 ms, got {value}")
    return table


def check_size(size_bytes: int) -> None:
    if size_bytes < 0:
        raise ValueError(f"size_bytes must be >= 0, got {size_bytes}")
