"""Network cost oracle: estimated KV-transfer time for a prefill/decode pair.

Every oracle answers ``estimate(src, dst, size_bytes, now_s)`` with an
:class:`Estimate` whose transfer time is linear in the payload::

    transfer_ms = base_latency_ms[tier] + size_bytes * 8 / (available_gbps * 1e6)

``size_bytes`` are real bytes, ``available_gbps`` real Gbit/s (so
``bits / (Gbit/s * 1e6)`` is milliseconds) and ``tier`` is
``topology.tier_distance(src, dst)`` (0 same server, 1 same rack, 2 same pod,
3 across the core; -1 the same GPU).

* :class:`StaticOracle` uses the nominal bottleneck rate of the installed path
  (``topology.bottleneck_gbps``): no telemetry.
* :class:`TelemetryOracle` uses ``min over the path's directed hops of
  max(capacity - measured load, MIN_AVAILABLE_FRACTION * capacity)``.  The
  floor keeps estimates finite on saturated links (a saturated link still
  drains at some rate: TCP/RDMA flows share it).  If any hop of the path has no
  sample, or its sample is older than ``max_age_ms``, the answer is the static
  estimate with ``source="static-fallback"`` and a ``reason``.
* :class:`StaleOracle` is a :class:`TelemetryOracle` that sees every hop as it
  was ``delay_ms`` earlier (a :class:`DelayedSource` keeps the history), to
  study routing on stale telemetry.
* :class:`TensorParallelOracle` prices a transfer between two tensor-parallel
  instances (``tp`` GPU hosts each): ``tp`` concurrent flows, rank i to rank i,
  each of its rank's share of the bytes, each on its own installed path, where
  a hop crossed by k of these flows gives each 1/k of its bandwidth; the
  transfer ends with its slowest flow, so its cost is the maximum.

Per-tier base latency (:data:`BASE_LATENCY_MS_BY_TIER`) is the fixed cost of a
transfer before bandwidth matters: RDMA/NVLink work-request setup and
completion (about 1-2 us at the endpoints) plus the port-to-port latency of each
switch crossed (about 0.5-1 us for a cut-through datacenter switch; tier 1
crosses one ToR, tier 2 three switches, tier 3 five) plus fibre propagation
(about 5 ns per metre).  These are modelled figures, not measurements of this
testbed; pass ``base_latency_ms_by_tier`` to override them.

Hot path: each oracle precomputes, per (src, dst) pair and on first use, the
pair's tier, directed hops, nominal bottleneck and base latency, and per
telemetry snapshot it computes each pair's available bandwidth once.
:meth:`transfer_model` returns ``(tier, base_latency_ms, ms_per_byte)`` so a
scheduler can price many payloads on one pair with one multiply-add; it is the
same arithmetic :meth:`estimate` uses.
"""

from .base import (
    BASE_LATENCY_MS_BY_TIER,
    DEFAULT_MAX_AGE_MS,
    DOWN_LINK_GBPS,
    MIN_AVAILABLE_FRACTION,
    Estimate,
    LinearOracle,
    Oracle,
    ms_per_byte,
)
from .paths import PairInfo, PathTable, TransferModel, TransferTable
from .stale import DelayedSource, StaleOracle
from .static import StaticOracle
from .telemetry import TelemetryOracle
from .tensor_parallel import TensorParallelOracle

__all__ = [
    "BASE_LATENCY_MS_BY_TIER", "DEFAULT_MAX_AGE_MS", "DOWN_LINK_GBPS", "MIN_AVAILABLE_FRACTION", "DelayedSource",
    "Estimate", "LinearOracle", "Oracle", "PairInfo", "PathTable", "StaleOracle", "StaticOracle", "TelemetryOracle",
    "TensorParallelOracle", "TransferModel", "TransferTable", "ms_per_byte",
]
