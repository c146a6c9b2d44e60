"""First-principles compute and memory model of one GPU serving instance.

Workers use it to decide how long to *pretend* to compute: a prefill worker
sleeps :meth:`PerfModel.prefill_ms` for the tokens it did not find in its
prefix cache, a decode worker sleeps :meth:`PerfModel.decode_step_ms` per
iteration of its batch.  Nothing here is measured on this machine; every
constant is a published figure (model config, GPU datasheet) or a named,
documented assumption (efficiencies).  Sources are listed in docs/workers.md.

Units are carried in names: ``*_ms`` milliseconds, ``*_bytes`` bytes,
``*_tokens`` tokens, ``*_flops`` floating point operations, ``*_per_s`` per
second.  This module must stay import-light (no numpy): every worker process
imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

BLOCK_TOKENS = 512  # same block size as netkv.request.BLOCK_TOKENS (Mooncake hash_ids)


class PerfModelError(ValueError):
    """A model/GPU name or a perf-model parameter is not acceptable."""


@dataclass(frozen=True)
class ModelSpec:
    """Transformer shape; figures from the model's published config.json."""

    name: str
    params: int  # parameters (count)
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int  # bytes per weight / KV element (bf16 = 2)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer, every KV head: 2 x layers x kv_heads x head_dim x dtype."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def attention_width(self) -> int:
        """Query heads x head dim: the width of the QK^T and AV products."""
        return self.attention_heads * self.head_dim


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet figures of one GPU."""

    name: str
    peak_bf16_flops_per_s: float  # dense (no sparsity) BF16 tensor-core peak
    hbm_bytes: int
    hbm_bytes_per_s: float


MODELS: Mapping[str, ModelSpec] = {
    # meta-llama/Llama-3.1-8B config.json; 8.03 B parameters (model card).
    "llama-3.1-8b": ModelSpec("llama-3.1-8b", 8_030_000_000, 32, 4096, 32, 8, 128, 2),
    # Qwen/Qwen2.5-7B config.json; 7.61 B parameters (model card).
    "qwen2.5-7b": ModelSpec("qwen2.5-7b", 7_610_000_000, 28, 3584, 28, 4, 128, 2),
    # mistralai/Mistral-7B-v0.1 config.json; 7.24 B parameters.
    "mistral-7b": ModelSpec("mistral-7b", 7_240_000_000, 32, 4096, 32, 8, 128, 2),
}

GPUS: Mapping[str, GpuSpec] = {
    # NVIDIA H100 Tensor Core GPU datasheet, SXM column: BF16 1,979 TFLOPS is
    # *with sparsity*; dense is half, 989.4 TFLOPS.  80 GB HBM3 at 3.35 TB/s.
    "h100-sxm": GpuSpec("h100-sxm", 989.4e12, 80_000_000_000, 3.35e12),
    # NVIDIA A100 datasheet, SXM 80GB column: BF16 312 TFLOPS dense,
    # 80 GB HBM2e at 2,039 GB/s.
    "a100-sxm-80gb": GpuSpec("a100-sxm-80gb", 312e12, 80_000_000_000, 2.039e12),
}

DEFAULT_MODEL = "llama-3.1-8b"
DEFAULT_GPU = "h100-sxm"

# Assumptions (not measured here; see docs/workers.md):
DEFAULT_PREFILL_MFU = 0.5  # fraction of dense peak reached by long-prompt prefill
DEFAULT_DECODE_HBM_EFFICIENCY = 0.8  # fraction of peak HBM bandwidth reached by decode
DEFAULT_DECODE_MFU = 0.5  # compute ceiling of a decode step (only binds at huge batches)
DEFAULT_GPU_MEMORY_FRACTION = 0.9  # share of HBM the engine may use (vLLM's default 0.9)
DEFAULT_ACTIVATION_RESERVE_BYTES = 4_000_000_000  # activations, CUDA graphs, workspace
DEFAULT_STEP_OVERHEAD_MS = 0.0  # fixed per-iteration cost (scheduler, launch); off by default


@dataclass(frozen=True)
class PerfModel:
    model: ModelSpec
    gpu: GpuSpec
    prefill_mfu: float = DEFAULT_PREFILL_MFU
    decode_hbm_efficiency: float = DEFAULT_DECODE_HBM_EFFICIENCY
    decode_mfu: float = DEFAULT_DECODE_MFU
    gpu_memory_fraction: float = DEFAULT_GPU_MEMORY_FRACTION
    activation_reserve_bytes: int = DEFAULT_ACTIVATION_RESERVE_BYTES
    step_overhead_ms: float = DEFAULT_STEP_OVERHEAD_MS

    def __post_init__(self) -> None:
        for label in ("prefill_mfu", "decode_hbm_efficiency", "decode_mfu", "gpu_memory_fraction"):
            value = getattr(self, label)
            if not 0.0 < value <= 1.0:
                raise PerfModelError(f"{label} must be in (0, 1], got {value!r}")
        if self.activation_reserve_bytes < 0:
            raise PerfModelError(f"activation_reserve_bytes must be >= 0, got {self.activation_reserve_bytes!r}")
        if not 0.0 <= self.step_overhead_ms < 1000.0:
            raise PerfModelError(f"step_overhead_ms must be in [0, 1000), got {self.step_overhead_ms!r}")
        if self.kv_capacity_tokens < BLOCK_TOKENS:
            raise PerfModelError(
                f"{self.model.name} ({self.model.weight_bytes} weight bytes) leaves no room for KV cache on "
                f"{self.gpu.name} ({self.gpu.hbm_bytes} bytes x {self.gpu_memory_fraction} usable)"
            )

    # -- sizes ---------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token

    @property
    def kv_capacity_bytes(self) -> int:
        """HBM left for KV cache after weights and the activation reserve."""
        usable = int(self.gpu.hbm_bytes * self.gpu_memory_fraction)
        return max(0, usable - self.model.weight_bytes - self.activation_reserve_bytes)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_capacity_bytes // self.model.kv_bytes_per_token

    @property
    def prefix_cache_blocks(self) -> int:
        """Prefix-cache capacity of one instance in 512-token blocks."""
        return self.kv_capacity_tokens // BLOCK_TOKENS

    # -- prefill ---------------------------------------------------------------
    def prefill_flops(self, uncached_tokens: int, cached_tokens: int = 0) -> float:
        """FLOPs to prefill ``uncached_tokens`` after ``cached_tokens`` of reused prefix.

        Linear layers: 2 FLOPs per parameter per token (multiply + add).
        Attention: token i (0-based among the new ones) attends to
        ``cached_tokens + i + 1`` positions; QK^T and AV each cost
        2 x attention_width FLOPs per position per layer, so the total is
        ``4 x layers x width x (n x cached + n (n + 1) / 2)`` (causal mask)."""
        if uncached_tokens < 0 or cached_tokens < 0:
            raise PerfModelError(
                f"token counts must be >= 0, got uncached={uncached_tokens!r}, cached={cached_tokens!r}"
            )
        n = uncached_tokens
        linear = 2.0 * self.model.params * n
        positions = n * cached_tokens + n * (n + 1) / 2.0
        attention = 4.0 * self.model.layers * self.model.attention_width * positions
        return linear + attention

    def prefill_ms(self, uncached_tokens: int, cached_tokens: int = 0) -> float:
        """Compute time of one prefill (compute-bound: FLOPs / (peak x MFU))."""
        if uncached_tokens == 0:
            return 0.0
        flops = self.prefill_flops(uncached_tokens, cached_tokens)
        return flops / (self.gpu.peak_bf16_flops_per_s * self.prefill_mfu) * 1e3 + self.step_overhead_ms

    # -- decode ----------------------------------------------------------------
    def decode_step_ms(self, batch_size: int, context_tokens: int) -> float:
        """Time of one decode iteration producing one token for each of
        ``batch_size`` requests holding ``context_tokens`` KV tokens in total.

        Memory-bound: every step reads all weights once plus every request's
        KV cache, at ``hbm_bytes_per_s x decode_hbm_efficiency``.  The compute
        time (2 x params x batch + attention) is a floor that only binds at
        very large batches."""
        if batch_size < 1:
            raise PerfModelError(f"batch_size must be >= 1, got {batch_size!r}")
        if context_tokens < 0:
            raise PerfModelError(f"context_tokens must be >= 0, got {context_tokens!r}")
        bytes_read = self.model.weight_bytes + context_tokens * self.model.kv_bytes_per_token
        memory_ms = bytes_read / (self.gpu.hbm_bytes_per_s * self.decode_hbm_efficiency) * 1e3
        flops = 2.0 * self.model.params * batch_size + 4.0 * self.model.layers * self.model.attention_width * context_tokens
        compute_ms = flops / (self.gpu.peak_bf16_flops_per_s * self.decode_mfu) * 1e3
        return max(memory_ms, compute_ms) + self.step_overhead_ms

    def describe(self) -> dict[str, object]:
        return {
            "model": self.model.name,
            "gpu": self.gpu.name,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "weight_bytes": self.model.weight_bytes,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "prefix_cache_blocks": self.prefix_cache_blocks,
            "prefill_mfu": self.prefill_mfu,
            "decode_hbm_efficiency": self.decode_hbm_efficiency,
            "decode_mfu": self.decode_mfu,
            "gpu_memory_fraction": self.gpu_memory_fraction,
            "activation_reserve_bytes": self.activation_reserve_bytes,
            "step_overhead_ms": self.step_overhead_ms,
            "prefill_ms_8k_tokens": round(self.prefill_ms(8192), 3),
            "decode_step_ms_batch1_ctx8k": round(self.decode_step_ms(1, 8192), 3),
        }


PERF_OVERRIDE_KEYS = (
    "prefill_mfu",
    "decode_hbm_efficiency",
    "decode_mfu",
    "gpu_memory_fraction",
    "activation_reserve_bytes",
    "step_overhead_ms",
)


def build(model: str = DEFAULT_MODEL, gpu: str = DEFAULT_GPU, overrides: Mapping[str, float] | None = None) -> PerfModel:
    """A :class:`PerfModel` by names; ``overrides`` may set only the keys in
    :data:`PERF_OVERRIDE_KEYS`."""
    if model not in MODELS:
        raise PerfModelError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    if gpu not in GPUS:
        raise PerfModelError(f"unknown gpu {gpu!r}; known: {', '.join(GPUS)}")
    pm = PerfModel(MODELS[model], GPUS[gpu])
    if overrides:
        unknown = sorted(set(overrides) - set(PERF_OVERRIDE_KEYS))
        if unknown:
            raise PerfModelError(f"unknown perf-model key {unknown[0]!r}; known: {', '.join(PERF_OVERRIDE_KEYS)}")
        values: dict[str, float | int] = {}
        for key, raw in overrides.items():
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                raise PerfModelError(f"perf-model key {key!r} must be a number, got {raw!r}")
            values[key] = int(raw) if key == "activation_reserve_bytes" else float(raw)
        pm = replace(pm, **values)  # type: ignore[arg-type]
    return pm
