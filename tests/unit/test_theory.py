"""Numerical check of the docs/schedulers.md theory section: cache-aware-only
choice is arbitrarily worse than NetKV's as context grows and congestion rises.

Instance (default 64-GPU fat-tree, prefill g0):
* decode A = g32, other pod, path crosses the core; its a->c / c->a hops carry
  load so the path's available bandwidth is B_far;
* decode B = g8, same rack, idle path: B_near = 400 Gbit/s (server uplink);
* A holds the first k blocks of the request's prefix, B holds nothing;
* both decodes idle (same load term), so only transfer time differs.

With c = kv_bytes_per_token * 8 / 1e6 (ms per token per Gbit/s):
    T_A(L) = lat3 + c (L - 512 k) / B_far      (cache-aware's choice)
    T_B(L) = lat1 + c L / B_near
    T_A - T_B = c L (1/B_far - 1/B_near) - c 512 k / B_far + (lat3 - lat1)  -> inf
    T_A / T_B -> B_near / B_far   (L -> inf)
"""

from __future__ import annotations

import pytest

import topologies
from netkv.oracle import BASE_LATENCY_MS_BY_TIER, TelemetryOracle
from netkv.request import BLOCK_TOKENS, DecodeView, Request
from netkv.schedulers import create
from netkv.telemetry import LinkSample, TelemetrySnapshot, constant_source

TOPO = topologies.build("fattree")
KVB = 327_680  # bytes per token (80 layers x 8 KV heads x 128 dims x K,V x fp16)
NOW = 100.0
PREFILL, FAR, NEAR = "g0", "g32", "g8"
K_BLOCKS = 4


def congested_snapshot(b_far_gbps: float) -> TelemetrySnapshot:
    """Every core hop (aggregation <-> core, 200 G) loaded to leave b_far_gbps."""
    samples = {}
    for link in TOPO.links:
        for x, y in ((link.a, link.b), (link.b, link.a)):
            load = link.rate_gbps - b_far_gbps if link.tier == 3 else 0.0
            samples[(x, y)] = LinkSample(x, y, NOW - 0.1, load, link.rate_gbps, load / link.rate_gbps)
    return TelemetrySnapshot(samples)


def instance(context_blocks: int) -> tuple[Request, list[DecodeView]]:
    request = Request("r", 0.0, context_blocks * BLOCK_TOKENS, 128, tuple(range(context_blocks)))
    a = DecodeView(FAR, 0, 0, 32, 10**9, frozenset(range(K_BLOCKS)))
    b = DecodeView(NEAR, 0, 0, 32, 10**9, frozenset())
    return request, [a, b]


def transfer_ms(oracle: TelemetryOracle, decode: str, tokens: int) -> float:
    return oracle.estimate(PREFILL, decode, tokens * KVB, NOW).transfer_ms


def run(context_blocks: int, b_far_gbps: float, min_fraction: float = 1e-4) -> tuple[float, float, str, str]:
    oracle = TelemetryOracle(TOPO, constant_source(congested_snapshot(b_far_gbps)),
                             min_available_fraction=min_fraction)
    request, decodes = instance(context_blocks)
    ca = create("cache_aware", {}, kv_bytes_per_token=KVB).choose(request, PREFILL, decodes, oracle, NOW)
    nk = create("netkv", {}, kv_bytes_per_token=KVB).choose(request, PREFILL, decodes, oracle, NOW)
    t_ca = transfer_ms(oracle, ca.decode, ca.tokens_to_send)
    t_nk = transfer_ms(oracle, nk.decode, nk.tokens_to_send)
    return t_ca, t_nk, ca.decode, nk.decode


def test_instance_has_the_stated_bandwidths() -> None:
    oracle = TelemetryOracle(TOPO, constant_source(congested_snapshot(5.0)))
    assert TOPO.tier_distance(PREFILL, FAR) == 3 and TOPO.tier_distance(PREFILL, NEAR) == 1
    assert oracle.estimate(PREFILL, FAR, 1, NOW).available_gbps == pytest.approx(5.0)
    assert oracle.estimate(PREFILL, NEAR, 1, NOW).available_gbps == pytest.approx(400.0)


def test_gap_grows_without_bound_in_context_length() -> None:
    b_far, b_near = 5.0, 400.0
    c = KVB * 8 / 1e6
    lat = BASE_LATENCY_MS_BY_TIER
    gaps = []
    for blocks in (8, 32, 128, 512, 2048):
        t_ca, t_nk, ca, nk = run(blocks, b_far)
        assert ca == FAR  # cache-aware always follows the prefix
        assert nk == NEAR  # NetKV takes the near, uncached decode here
        tokens = blocks * BLOCK_TOKENS
        expected_gap = (c * tokens * (1 / b_far - 1 / b_near) - c * K_BLOCKS * BLOCK_TOKENS / b_far
                        + lat[3] - lat[1])
        assert t_ca - t_nk == pytest.approx(expected_gap, rel=1e-9)
        gaps.append(t_ca - t_nk)
    assert all(later > 3.9 * earlier for earlier, later in zip(gaps, gaps[1:]))  # ~linear in L (x4 per step)
    assert gaps[-1] > 100_000.0  # > 100 s at 1M tokens


def test_netkv_matches_the_optimum_of_the_instance() -> None:
    # optimum = the smaller transfer time of the two decodes (loads equal)
    for b_far in (190.0, 100.0, 5.0):
        for blocks in (4, 5, 8, 64, 1024):
            oracle = TelemetryOracle(TOPO, constant_source(congested_snapshot(b_far)))
            request, _ = instance(blocks)
            opt = min(transfer_ms(oracle, FAR, request.input_tokens - K_BLOCKS * BLOCK_TOKENS),
                      transfer_ms(oracle, NEAR, request.input_tokens))
            _, t_nk, _, _ = run(blocks, b_far, min_fraction=0.01)
            # NetKV's tier band may pick a nearer decode up to 10% + 0.05 ms dearer
            assert opt <= t_nk <= opt * 1.10 + 0.05


def test_ratio_tends_to_bandwidth_ratio() -> None:
    b_far, b_near = 5.0, 400.0
    ratios = [run(blocks, b_far)[0] / run(blocks, b_far)[1] for blocks in (64, 1024, 16384)]
    assert ratios[0] < ratios[1] < ratios[2] < b_near / b_far
    assert ratios[-1] == pytest.approx(b_near / b_far, rel=0.01)


def test_ratio_unbounded_as_congestion_grows() -> None:
    # large L: the ratio follows B_near / B_far, which grows without bound as
    # the core's residual bandwidth shrinks (down to the oracle's floor).
    ratios = []
    for b_far in (100.0, 10.0, 1.0, 0.1):
        t_ca, t_nk, _, _ = run(16384, b_far)
        ratios.append(t_ca / t_nk)
        assert t_ca / t_nk == pytest.approx(400.0 / b_far, rel=0.01)
    assert ratios == sorted(ratios) and ratios[-1] > 3900


def test_oracle_floor_caps_the_modelled_ratio() -> None:
    # with the default 1 % floor, a fully loaded 200 G core hop still offers 2 G
    t_ca, t_nk, _, _ = run(16384, 0.0, min_fraction=0.01)
    assert t_ca / t_nk == pytest.approx(400.0 / 2.0, rel=0.01)
