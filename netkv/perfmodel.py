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

from dataclasses import dataclass
from typing import Mapping

from .checks import is_finite_number

BLOCK_TOKENS = 512  # same block size as netkv.request.BLOCK_TOKENS (Mooncake hash_ids)
# Largest tensor-parallel degree: one NVLink domain of an 8-GPU HGX H100 / A100
# server (and the 8 GPUs per server of the default fat-tree).
MAX_TP = 8


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
    # Longest sequence (input + output tokens) the model serves: max_position_embeddings of its config.json.
    max_context_tokens: int
    # Tensor-parallel degree the model is served with by default: the smallest
    # power of two whose per-GPU share of the weights leaves room for KV cache
    # on an 80 GB GPU (see docs/workers.md, "Tensor parallelism").
    default_tp: int = 1

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer, every KV head: 2 x layers x kv_heads x head_dim x dtype.
        This is the whole instance's figure: under tensor parallelism each of
        the ``tp`` GPUs holds ``1/tp`` of it (see :attr:`PerfModel.kv_bytes_per_token_per_rank`)."""
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
    nvlink_bytes_per_s: float  # total NVLink bandwidth of one GPU, both directions (datasheet figure)


MODELS: Mapping[str, ModelSpec] = {
    # meta-llama/Llama-3.1-8B config.json; 8.03 B parameters (model card); 131,072 positions.
    "llama-3.1-8b": ModelSpec("llama-3.1-8b", 8_030_000_000, 32, 4096, 32, 8, 128, 2, 131072),
    # Qwen/Qwen2.5-7B config.json; 7.61 B parameters (model card); 131,072 positions.
    "qwen2.5-7b": ModelSpec("qwen2.5-7b", 7_610_000_000, 28, 3584, 28, 4, 128, 2, 131072),
    # mistralai/Mistral-7B-v0.1 config.json; 7.24 B parameters; 32,768 positions (4,096-token sliding window).
    "mistral-7b": ModelSpec("mistral-7b", 7_240_000_000, 32, 4096, 32, 8, 128, 2, 32768),
    # Multi-head attention (kv_heads == attention_heads): 4x-5x the KV per token of the GQA models.
    # meta-llama/Llama-2-7b-hf config.json (32 layers, hidden 4096, 32 heads, no
    # num_key_value_heads, i.e. MHA; float16); 6,738,415,616 parameters counted from that
    # config (embeddings + lm_head 2 x 32000 x 4096, per layer 4 x 4096^2 attention +
    # 3 x 4096 x 11008 MLP + 2 norms, final norm), the model card's "7B" (6.74 B).
    "llama-2-7b": ModelSpec("llama-2-7b", 6_738_415_616, 32, 4096, 32, 32, 128, 2, 4096),
    # meta-llama/Llama-2-13b-hf config.json (40 layers, hidden 5120, 40 heads, MHA, float16,
    # intermediate 13824); 13,015,864,320 parameters counted the same way (model card "13B");
    # both Llama 2 models: 4,096 positions.
    "llama-2-13b": ModelSpec("llama-2-13b", 13_015_864_320, 40, 5120, 40, 40, 128, 2, 4096),
    # facebook/opt-13b config.json (40 layers, hidden 5120, 40 heads, ffn 20480, float16,
    # vocab 50272, 2048 positions + 2 offset); 12,853,473,280 parameters counted from that config
    # (tied embeddings 50272 x 5120 + positions 2050 x 5120, per layer 4 x (5120^2 + 5120) attention
    # + 2 x 5120 x 20480 + 20480 + 5120 MLP + 2 layer norms x 2 x 5120, final layer norm).
    "opt-13b": ModelSpec("opt-13b", 12_853_473_280, 40, 5120, 40, 40, 128, 2, 2048),
    # meta-llama/Llama-3.1-70B config.json (80 layers, hidden 8192, 64 heads, 8 KV heads, bf16,
    # intermediate 28672, vocab 128256); 70,553,706,496 parameters counted from that config
    # (model card: 70.6 B); 131,072 positions.  141 GB of bf16 weights: served with tensor
    # parallelism, TP 4 by default.
    "llama-3.1-70b": ModelSpec("llama-3.1-70b", 70_553_706_496, 80, 8192, 64, 8, 128, 2, 131072, default_tp=4),
}

GPUS: Mapping[str, GpuSpec] = {
    # NVIDIA H100 Tensor Core GPU datasheet, SXM column: BF16 1,979 TFLOPS is
    # *with sparsity*; dense is half, 989.4 TFLOPS.  80 GB HBM3 at 3.35 TB/s.
    # NVLink: 900 GB/s per GPU (fourth-generation NVLink, total of both directions).
    "h100-sxm": GpuSpec("h100-sxm", 989.4e12, 80_000_000_000, 3.35e12, 900e9),
    # NVIDIA A100 datasheet, SXM 80GB column: BF16 312 TFLOPS dense,
    # 80 GB HBM2e at 2,039 GB/s; NVLink 600 GB/s (third generation, both directions).
    "a100-sxm-80gb": GpuSpec("a100-sxm-80gb", 312e12, 80_000_000_000, 2.039e12, 600e9),
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
DEFAULT_ALLREDUCE_EFFICIENCY = 0.8  # fraction of one direction's NVLink bandwidth a TP all-reduce reaches
DEFAULT_ALLREDUCE_LATENCY_US = 0.0  # fixed cost of one all-reduce (launch, sync); off by default


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
    tp: int = 1  # tensor-parallel degree: GPUs of one instance (build() defaults it to the model's default_tp)
    allreduce_efficiency: float = DEFAULT_ALLREDUCE_EFFICIENCY
    allreduce_latency_us: float = DEFAULT_ALLREDUCE_LATENCY_US

    def __post_init__(self) -> None:
        tp = self.tp
        if isinstance(tp, bool) or not isinstance(tp, int) or not 1 <= tp <= MAX_TP:
            raise PerfModelError(f"tp must be a whole number in [1, {MAX_TP}], got {tp!r}")
        if self.model.kv_heads % tp or self.model.attention_heads % tp:
            raise PerfModelError(
                f"tp={tp} must divide {self.model.name}'s {self.model.kv_heads} KV heads and "
                f"{self.model.attention_heads} attention heads (heads are split across the TP GPUs)"
            )
        if not 0.0 <= self.allreduce_latency_us < 1e6:
            raise PerfModelError(f"allreduce_latency_us must be in [0, 1e6), got {self.allreduce_latency_us!r}")
        for label in ("prefill_mfu", "decode_hbm_efficiency", "decode_mfu", "gpu_memory_fraction",
                      "allreduce_efficiency"):
            value = getattr(self, label)
            if not 0.0 < value <= 1.0:
                raise PerfModelError(f"{label} must be in (0, 1], got {value!r}")
        if self.activation_reserve_bytes < 0:
            raise PerfModelError(f"activation_reserve_bytes must be >= 0, got {self.activation_reserve_bytes!r}")
        if not 0.0 <= self.step_overhead_ms < 1000.0:
            raise PerfModelError(f"step_overhead_ms must be in [0, 1000), got {self.step_overhead_ms!r}")
        if self.kv_capacity_tokens < BLOCK_TOKENS:
            raise PerfModelError(
                f"{self.model.name} ({self.model.weight_bytes} weight bytes, tp={tp}) leaves no room for KV "
                f"cache on {self.gpu.name} ({self.gpu.hbm_bytes} bytes x {self.gpu_memory_fraction} usable "
                f"per GPU); a larger tp spreads the weights over more GPUs"
            )

    # -- sizes ---------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes of one token on the whole instance (all ``tp`` GPUs): what a
        prefill-to-decode transfer moves per token in total."""
        return self.model.kv_bytes_per_token

    @property
    def kv_bytes_per_token_per_rank(self) -> int:
        """KV bytes of one token held by each TP GPU (KV heads are split evenly,
        since ``tp`` divides ``kv_heads``): a transfer between two TP-``tp``
        instances is ``tp`` parallel rank-to-rank flows of this many bytes per token."""
        return self.model.kv_bytes_per_token // self.tp

    def rank_flow_bytes(self, kv_bytes: int) -> list[int]:
        """A transfer of ``kv_bytes`` between two TP-``tp`` instances as ``tp``
        rank-to-rank flows (rank i to rank i): each carries its rank's share of
        the KV heads, ``kv_bytes / tp``; the remainder of an uneven split goes to
        the first flows, one byte each, so the flows add up to ``kv_bytes``."""
        if isinstance(kv_bytes, bool) or not isinstance(kv_bytes, int) or kv_bytes < 0:
            raise PerfModelError(f"kv_bytes must be a whole number >= 0, got {kv_bytes!r}")
        share, extra = divmod(kv_bytes, self.tp)
        return [share + (1 if i < extra else 0) for i in range(self.tp)]

    @property
    def weight_bytes_per_gpu(self) -> int:
        """Each TP GPU holds ``1/tp`` of the weights (rounded up)."""
        return -(-self.model.weight_bytes // self.tp)

    @property
    def kv_capacity_bytes(self) -> int:
        """HBM left for KV cache on the whole instance: on each of its ``tp``
        GPUs, the usable HBM less that GPU's share of the weights and the
        activation reserve."""
        usable = int(self.gpu.hbm_bytes * self.gpu_memory_fraction)
        per_gpu = max(0, usable - self.weight_bytes_per_gpu - self.activation_reserve_bytes)
        return per_gpu * self.tp

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

    def allreduce_ms(self, tokens: int) -> float:
        """Tensor-parallel communication of one forward pass over ``tokens``
        tokens: 2 all-reduces per layer (after attention and after the MLP,
        Megatron-style), each of ``hidden_size x tokens x dtype_bytes`` bytes.
        A ring all-reduce moves ``2 (tp - 1) / tp`` times the message through
        each GPU's link in one direction, at half the datasheet NVLink figure
        (which counts both directions) times ``allreduce_efficiency``, plus
        ``allreduce_latency_us`` per all-reduce.  Not overlapped with compute.
        Zero at ``tp = 1``."""
        if self.tp == 1 or tokens <= 0:
            return 0.0
        count = 2 * self.model.layers
        message_bytes = self.model.hidden_size * tokens * self.model.dtype_bytes
        per_direction_bytes_per_s = self.gpu.nvlink_bytes_per_s / 2.0 * self.allreduce_efficiency
        wire_s = 2.0 * (self.tp - 1) / self.tp * message_bytes / per_direction_bytes_per_s
        return count * (wire_s * 1e3 + self.allreduce_latency_us / 1e3)

    def prefill_ms(self, uncached_tokens: int, cached_tokens: int = 0) -> float:
        """Compute time of one prefill: FLOPs over the TP group's aggregate
        peak x MFU (compute-bound), plus the TP all-reduces (:meth:`allreduce_ms`)."""
        if uncached_tokens == 0:
            return 0.0
        flops = self.prefill_flops(uncached_tokens, cached_tokens)
        compute_ms = flops / (self.tp * self.gpu.peak_bf16_flops_per_s * self.prefill_mfu) * 1e3
        return compute_ms + self.allreduce_ms(uncached_tokens) + self.step_overhead_ms

    # -- decode ----------------------------------------------------------------
    def decode_step_ms(self, batch_size: int, context_tokens: int) -> float:
        """Time of one decode iteration producing one token for each of
        ``batch_size`` requests holding ``context_tokens`` KV tokens in total.

        Memory-bound: every step reads all weights once plus every request's
        KV cache, at ``hbm_bytes_per_s x decode_hbm_efficiency``.  The compute
        time (2 x params x batch + attention) is a floor that only binds at
        very large batches.  With tensor parallelism each of the ``tp`` GPUs
        reads its ``1/tp`` share in parallel (aggregate HBM bandwidth and
        compute of the group), and the step adds the all-reduces of
        ``batch_size`` tokens (:meth:`allreduce_ms`)."""
        if batch_size < 1:
            raise PerfModelError(f"batch_size must be >= 1, got {batch_size!r}")
        if context_tokens < 0:
            raise PerfModelError(f"context_tokens must be >= 0, got {context_tokens!r}")
        bytes_read = self.model.weight_bytes + context_tokens * self.model.kv_bytes_per_token
        memory_ms = bytes_read / (self.tp * self.gpu.hbm_bytes_per_s * self.decode_hbm_efficiency) * 1e3
        flops = 2.0 * self.model.params * batch_size + 4.0 * self.model.layers * self.model.attention_width * context_tokens
        compute_ms = flops / (self.tp * self.gpu.peak_bf16_flops_per_s * self.decode_mfu) * 1e3
        return max(memory_ms, compute_ms) + self.allreduce_ms(batch_size) + self.step_overhead_ms

    def describe(self) -> dict[str, object]:
        return {
            "model": self.model.name,
            "gpu": self.gpu.name,
            "tp": self.tp,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_bytes_per_token_per_rank": self.kv_bytes_per_token_per_rank,
            "weight_bytes": self.model.weight_bytes,
            "weight_bytes_per_gpu": self.weight_bytes_per_gpu,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "prefix_cache_blocks": self.prefix_cache_blocks,
            "prefill_mfu": self.prefill_mfu,
            "decode_hbm_efficiency": self.decode_hbm_efficiency,
            "decode_mfu": self.decode_mfu,
            "gpu_memory_fraction": self.gpu_memory_fraction,
            "activation_reserve_bytes": self.activation_reserve_bytes,
            "step_overhead_ms": self.step_overhead_ms,
            "allreduce_efficiency": self.allreduce_efficiency,
            "allreduce_latency_us": self.allreduce_latency_us,
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
    "tp",
    "allreduce_efficiency",
    "allreduce_latency_us",
)
INT_OVERRIDE_KEYS = ("activation_reserve_bytes", "tp")


def build(model: str = DEFAULT_MODEL, gpu: str = DEFAULT_GPU, overrides: Mapping[str, float] | None = None) -> PerfModel:
    """A :class:`PerfModel` by names; ``overrides`` may set only the keys in
    :data:`PERF_OVERRIDE_KEYS`.  ``tp`` defaults to the model's ``default_tp``."""
    if not isinstance(model, str) or model not in MODELS:
        raise PerfModelError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    if not isinstance(gpu, str) or gpu not in GPUS:
        raise PerfModelError(f"unknown gpu {gpu!r}; known: {', '.join(GPUS)}")
    spec = MODELS[model]
    values: dict[str, float | int] = {"tp": spec.default_tp}
    if overrides:
        unknown = sorted(set(overrides) - set(PERF_OVERRIDE_KEYS), key=str)
        if unknown:
            raise PerfModelError(f"unknown perf-model key {unknown[0]!r}; known: {', '.join(PERF_OVERRIDE_KEYS)}")
        for key, raw in overrides.items():
            if key in INT_OVERRIDE_KEYS:
                values[key] = _override_int(key, raw)
            elif not is_finite_number(raw):
                raise PerfModelError(f"perf-model key {key!r} must be a finite number, got {raw!r}")
            else:
                values[key] = float(raw)
    # one construction with every value, so the capacity check sees them all together
    return PerfModel(spec, GPUS[gpu], **values)  # type: ignore[arg-type]


def _override_int(key: str, raw: object) -> int:
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise PerfModelError(f"perf-model key {key!r} must be a whole number, got {raw!r}")
    return raw
