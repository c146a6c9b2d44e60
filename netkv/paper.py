"""The figures the NetKV paper reports, set beside the testbed's own.

They are the paper's claims, measured on its 64-GPU four-tier fat-tree
*simulator* with Mooncake traces; the testbed measures the same comparisons on
real packets.  They are a reference to compare with, never a target: nothing
in the testbed is tuned toward them.
"""

from __future__ import annotations

from typing import Mapping

PAPER_SOURCE = "NetKV (arXiv 2606.03910), 64-GPU four-tier fat-tree simulator, Mooncake traces"

# key -> (value, unit, what it is)
PAPER_FIGURES: Mapping[str, tuple[float, str, str]] = {
    "ttft_mean_change_pct_vs_round_robin": (-21.2, "%", "mean TTFT of NetKV vs round-robin"),
    "ttft_mean_change_pct_vs_tuned_cache_load": (-17.6, "%", "mean TTFT of NetKV vs a tuned cache+load-aware scheduler"),
    "slo_attainment_change_pp": (20.1, "points", "TTFT SLO attainment of NetKV vs the baselines"),
    "decision_overhead_ms_max": (0.5, "ms", "time-between-tokens overhead of NetKV's decision (an upper bound)"),
}
