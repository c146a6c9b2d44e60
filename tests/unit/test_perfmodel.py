"""Perf model: published constants, monotonicity, capacity, override checks."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from netkv import perfmodel
from netkv.perfmodel import PerfModelError

PM = perfmodel.build()


def test_llama_8b_h100_constants() -> None:
    assert PM.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert PM.model.weight_bytes == 16_060_000_000
    # (0.9 x 80e9 - 16.06e9 - 4e9) / 131072 tokens, in 512-token blocks
    assert PM.kv_capacity_tokens == (72_000_000_000 - 16_060_000_000 - 4_000_000_000) // 131072
    assert PM.prefix_cache_blocks == PM.kv_capacity_tokens // 512
    # decode at batch 1 is weight-read bound: 16.06 GB / (3.35 TB/s x 0.8) = 5.99 ms
    assert PM.decode_step_ms(1, 0) == pytest.approx(16.06e9 / (3.35e12 * 0.8) * 1e3)
    # 8k-token prefill: 2 x 8.03e9 x 8192 + 4 x 32 x 4096 x 8192 x 8193 / 2 FLOPs at 0.5 x 989.4 TFLOP/s
    flops = 2 * 8.03e9 * 8192 + 4 * 32 * 4096 * 8192 * 8193 / 2
    assert PM.prefill_ms(8192) == pytest.approx(flops / (989.4e12 * 0.5) * 1e3)


@given(st.integers(0, 200_000), st.integers(1, 5000), st.integers(0, 100_000))
def test_prefill_monotonic_in_tokens_and_context(n: int, extra: int, cached: int) -> None:
    assert PM.prefill_ms(n + extra, cached) > PM.prefill_ms(n, cached)
    if n > 0:
        assert PM.prefill_ms(n, cached + extra) > PM.prefill_ms(n, cached)


@given(st.integers(1, 512), st.integers(1, 64), st.integers(0, 400_000), st.integers(1, 10_000))
def test_decode_monotonic_in_batch_and_context(batch: int, more: int, ctx: int, more_ctx: int) -> None:
    assert PM.decode_step_ms(batch + more, ctx) >= PM.decode_step_ms(batch, ctx)
    assert PM.decode_step_ms(batch, ctx + more_ctx) > PM.decode_step_ms(batch, ctx)


def test_huge_batch_becomes_compute_bound() -> None:
    # at batch 4096 with no context the compute floor exceeds the weight read
    assert PM.decode_step_ms(4096, 0) > PM.decode_step_ms(1, 0)


def test_other_models_and_gpus() -> None:
    q = perfmodel.build("qwen2.5-7b", "a100-sxm-80gb")
    assert q.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2
    assert q.decode_step_ms(1, 0) > perfmodel.build("qwen2.5-7b", "h100-sxm").decode_step_ms(1, 0)


def test_errors_name_bad_value_and_range() -> None:
    with pytest.raises(PerfModelError, match="unknown model 'gpt-5'; known: llama-3.1-8b"):
        perfmodel.build("gpt-5")
    with pytest.raises(PerfModelError, match="unknown gpu 'h200'"):
        perfmodel.build(gpu="h200")
    with pytest.raises(PerfModelError, match=r"prefill_mfu must be in \(0, 1\], got 1.5"):
        perfmodel.build(overrides={"prefill_mfu": 1.5})
    with pytest.raises(PerfModelError, match="unknown perf-model key 'mfu'"):
        perfmodel.build(overrides={"mfu": 0.3})
    with pytest.raises(PerfModelError, match="batch_size must be >= 1, got 0"):
        PM.decode_step_ms(0, 10)
    with pytest.raises(PerfModelError, match="leaves no room for KV cache"):
        perfmodel.build(overrides={"gpu_memory_fraction": 0.2})
    assert perfmodel.build(overrides={"prefill_mfu": 0.25}).prefill_ms(1000) == pytest.approx(2 * PM.prefill_ms(1000))
