"""Perf model: published constants, monotonicity, capacity, override checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


# -- larger-KV models and tensor parallelism ------------------------------------------------

def _params_from_llama_config(hidden: int, intermediate: int, layers: int, vocab: int, heads: int,
                              kv_heads: int, head_dim: int) -> int:
    """Parameter count of a Llama-architecture config.json: untied embedding and lm_head,
    q/o (hidden x heads*head_dim), k/v (hidden x kv_heads*head_dim), gate/up/down MLP,
    two RMS norms per layer and a final one."""
    per_layer = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * intermediate + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden


@pytest.mark.parametrize("name, config", [
    # (hidden, intermediate, layers, vocab, heads, kv_heads, head_dim) from each model's config.json
    ("llama-3.1-8b", (4096, 14336, 32, 128256, 32, 8, 128)),
    ("llama-2-7b", (4096, 11008, 32, 32000, 32, 32, 128)),
    ("llama-2-13b", (5120, 13824, 40, 32000, 40, 40, 128)),
    ("llama-3.1-70b", (8192, 28672, 80, 128256, 64, 8, 128)),
])
def test_llama_shapes_and_parameter_counts(name: str, config: tuple[int, ...]) -> None:
    hidden, intermediate, layers, vocab, heads, kv_heads, head_dim = config
    spec = perfmodel.MODELS[name]
    assert (spec.layers, spec.hidden_size, spec.attention_heads, spec.kv_heads, spec.head_dim) == \
        (layers, hidden, heads, kv_heads, head_dim)
    assert spec.head_dim * spec.attention_heads == spec.hidden_size
    counted = _params_from_llama_config(hidden, intermediate, layers, vocab, heads, kv_heads, head_dim)
    # the 8B entry keeps the model card's rounded 8.03e9; the others are the exact count
    assert spec.params == pytest.approx(counted, rel=1e-3)


def test_opt_13b_parameter_count() -> None:
    h, ffn, layers, vocab, positions = 5120, 20480, 40, 50272, 2048 + 2  # OPT offsets positions by 2
    per_layer = 4 * (h * h + h) + (h * ffn + ffn) + (ffn * h + h) + 2 * 2 * h
    assert perfmodel.MODELS["opt-13b"].params == vocab * h + positions * h + layers * per_layer + 2 * h


def test_mha_models_have_several_times_the_kv_per_token() -> None:
    base = perfmodel.MODELS["llama-3.1-8b"].kv_bytes_per_token
    assert perfmodel.MODELS["llama-2-7b"].kv_bytes_per_token == 2 * 32 * 32 * 128 * 2 == 4 * base
    assert perfmodel.MODELS["llama-2-13b"].kv_bytes_per_token == 2 * 40 * 40 * 128 * 2 == 819_200
    assert perfmodel.MODELS["opt-13b"].kv_bytes_per_token == 819_200
    assert perfmodel.MODELS["llama-3.1-70b"].kv_bytes_per_token == 2 * 80 * 8 * 128 * 2 == 327_680


def test_default_tp_is_the_smallest_power_of_two_that_fits() -> None:
    for name, spec in perfmodel.MODELS.items():
        pm = perfmodel.build(name)
        assert pm.tp == spec.default_tp
        if spec.default_tp > 1:
            with pytest.raises(PerfModelError, match=f"tp={spec.default_tp // 2}.*leaves no room"):
                perfmodel.build(name, overrides={"tp": spec.default_tp // 2})
    assert perfmodel.build("llama-3.1-70b").tp == 4


def test_tp_splits_weights_and_kv_across_the_gpus() -> None:
    for tp in (4, 8):
        pm = perfmodel.build("llama-3.1-70b", overrides={"tp": tp})
        assert pm.kv_bytes_per_token_per_rank * tp == pm.kv_bytes_per_token == 327_680
        assert pm.weight_bytes_per_gpu == -(-pm.model.weight_bytes // tp)
        per_gpu = int(80e9 * 0.9) - pm.weight_bytes_per_gpu - 4_000_000_000
        assert pm.kv_capacity_bytes == tp * per_gpu
        assert pm.kv_capacity_tokens == tp * per_gpu // 327_680
    # a TP-1 model's per-rank figure is the whole figure
    assert PM.kv_bytes_per_token_per_rank == PM.kv_bytes_per_token


def test_tp_prefill_and_decode_use_the_group_plus_allreduce() -> None:
    one = perfmodel.build("llama-2-7b")
    four = perfmodel.build("llama-2-7b", overrides={"tp": 4})
    n = 8192
    comm_ms = 2 * 32 * (2 * 3 / 4) * (4096 * n * 2) / (900e9 / 2 * 0.8) * 1e3
    assert four.allreduce_ms(n) == pytest.approx(comm_ms)
    assert four.prefill_ms(n) == pytest.approx(one.prefill_ms(n) / 4 + comm_ms)
    assert one.allreduce_ms(n) == 0.0
    comm1 = 2 * 32 * (2 * 3 / 4) * (4096 * 1 * 2) / (900e9 / 2 * 0.8) * 1e3
    assert four.decode_step_ms(1, n) == pytest.approx(one.decode_step_ms(1, n) / 4 + comm1)
    # TP-4 is faster than TP-1 but not four times faster
    assert one.prefill_ms(n) / 4 < four.prefill_ms(n) < one.prefill_ms(n)
    slow = perfmodel.build("llama-2-7b", overrides={"tp": 4, "allreduce_efficiency": 0.4})
    assert slow.allreduce_ms(n) == pytest.approx(2 * comm_ms)
    lat = perfmodel.build("llama-2-7b", overrides={"tp": 4, "allreduce_latency_us": 10.0})
    assert lat.decode_step_ms(1, 0) == pytest.approx(four.decode_step_ms(1, 0) + 2 * 32 * 10e-3)


@given(st.sampled_from(sorted(perfmodel.MODELS)), st.integers(1, 200_000), st.integers(0, 100_000))
def test_tp_times_stay_positive_and_monotonic(name: str, n: int, cached: int) -> None:
    pm = perfmodel.build(name)
    assert 0 < pm.prefill_ms(n, cached) < pm.prefill_ms(n + 1, cached)
    assert pm.decode_step_ms(2, cached) >= pm.decode_step_ms(1, cached) > 0


@pytest.mark.parametrize("tp, fragment", [
    (3, "tp=3 must divide llama-3.1-70b's 8 KV heads"),
    (16, r"tp must be a whole number in \[1, 8\], got 16"),
    (0, r"tp must be a whole number in \[1, 8\], got 0"),
    (2.5, "perf-model key 'tp' must be a whole number, got 2.5"),
    (True, "perf-model key 'tp' must be a whole number, got True"),
    ("4", "perf-model key 'tp' must be a whole number, got '4'"),
])
def test_bad_tp_is_refused(tp: object, fragment: str) -> None:
    with pytest.raises(PerfModelError, match=fragment):
        perfmodel.build("llama-3.1-70b", overrides={"tp": tp})  # type: ignore[dict-item]


def test_tp_as_float_whole_number_and_other_override_errors() -> None:
    assert perfmodel.build("llama-3.1-70b", overrides={"tp": 8.0}).tp == 8
    with pytest.raises(PerfModelError, match=r"allreduce_efficiency must be in \(0, 1\]"):
        perfmodel.build(overrides={"allreduce_efficiency": 0.0})
    with pytest.raises(PerfModelError, match="'prefill_mfu' must be a finite number, got nan"):
        perfmodel.build(overrides={"prefill_mfu": float("nan")})


def test_rank_flows_add_up_to_the_transfer() -> None:
    pm = perfmodel.build("llama-3.1-70b")
    tokens = 5000
    flows = pm.rank_flow_bytes(tokens * pm.kv_bytes_per_token)
    assert flows == [tokens * pm.kv_bytes_per_token_per_rank] * pm.tp == [409_600_000] * 4
    assert pm.rank_flow_bytes(10) == [3, 3, 2, 2]
    assert PM.rank_flow_bytes(12345) == [12345]
    with pytest.raises(PerfModelError, match="kv_bytes must be a whole number >= 0, got -1"):
        pm.rank_flow_bytes(-1)


def test_overrides_are_checked_together() -> None:
    # TP 2 leaves no KV room for 70B with the default memory fraction and reserve, but does when
    # both are overridden in the same call: the capacity check must see every override at once
    with pytest.raises(PerfModelError, match="leaves no room"):
        perfmodel.build("llama-3.1-70b", overrides={"tp": 2})
    pm = perfmodel.build("llama-3.1-70b", overrides={"tp": 2, "gpu_memory_fraction": 1.0,
                                                     "activation_reserve_bytes": 1_000_000_000})
    assert pm.tp == 2 and pm.kv_capacity_tokens == 2 * (80_000_000_000 - pm.weight_bytes_per_gpu
                                                        - 1_000_000_000) // 327_680
