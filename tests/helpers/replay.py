"""A replay on this machine over the serving model: eight GPUs, one of each
tier distance, compute at its shortest honest times."""

from __future__ import annotations

from typing import Any

from netkv.serving.config import ReplayConfig
from netkv.traces import DEFAULT_TRACE

TRACE = DEFAULT_TRACE
# Two GPUs from each of: server 0, server 1 (same rack), rack 1 (same pod), pod 1:
# mixed placement -> prefill g0 g8 g16 g32, decode g1 g9 g17 g33, every tier 0..3 present.
HOSTS = ["g0", "g1", "g8", "g9", "g16", "g17", "g32", "g33"]
FAST = {"prefill_mfu": 1.0, "decode_hbm_efficiency": 1.0}  # shortest honest compute times


def base_config(**kw: Any) -> ReplayConfig:
    cfg: dict[str, Any] = dict(
        trace_path=str(TRACE), topology="fattree", placement={"scheme": "mixed", "hosts": HOSTS},
        scheduler="round_robin", perf_overrides=dict(FAST), drain_timeout_s=30.0, scale_factor=1000.0,
    )
    cfg.update(kw)
    return ReplayConfig(**cfg)
