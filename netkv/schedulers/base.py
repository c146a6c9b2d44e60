"""Scheduler interface, decisions, configuration checking and the registry."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Mapping, Sequence, TypeVar

from ..oracle import Estimate, Oracle
from ..request import BLOCK_TOKENS, DecodeView, Request


class NoEligibleDecode(Exception):
    """No decode instance can admit the request (the message says why)."""


@dataclass(frozen=True)
class Decision:
    decode: str
    score_terms: dict[str, float]
    tokens_to_send: int
    bytes_to_send: int
    estimate: Estimate | None


@dataclass(frozen=True)
class Param:
    """One configuration key: default and allowed closed range."""

    default: float
    minimum: float
    maximum: float
    help: str


class Scheduler:
    """Picks the decode instance for a request whose prefill ran on ``prefill``.

    Subclasses set ``name``, ``doc`` (one line) and ``params`` (the allowed
    configuration keys); ``self.cfg`` holds the checked values, defaults filled
    in.  ``choose`` never returns an ineligible decode and raises
    :class:`NoEligibleDecode` when there is none."""

    name: ClassVar[str] = ""
    doc: ClassVar[str] = ""
    params: ClassVar[Mapping[str, Param]] = {}
    uses_network: ClassVar[bool] = False

    def __init__(self, config: Mapping[str, object], *, kv_bytes_per_token: int, seed: int = 0) -> None:
        if isinstance(kv_bytes_per_token, bool) or not isinstance(kv_bytes_per_token, int) or kv_bytes_per_token < 1:
            raise ValueError(f"kv_bytes_per_token must be a whole number >= 1, got {kv_bytes_per_token!r}")
        self.kv_bytes_per_token = kv_bytes_per_token
        self.seed = seed
        self.cfg = check_config(self.name, config, self.params)

    def choose(self, request: Request, prefill: str, decodes: Sequence[DecodeView], oracle: Oracle,
               now_s: float) -> Decision:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg})"


def check_config(scheduler: str, config: Mapping[str, object], params: Mapping[str, Param]) -> dict[str, float]:
    allowed = ", ".join(sorted(params)) or "(none)"
    for key in config:
        if key not in params:
            raise ValueError(f"unknown config key {key!r} for scheduler {scheduler}; allowed: {allowed}")
    out: dict[str, float] = {}
    for key, p in params.items():
        raw = config.get(key, p.default)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ValueError(f"scheduler {scheduler}: {key} must be a number, got {raw!r}")
        value = float(raw)
        if not (math.isfinite(value) and p.minimum <= value <= p.maximum):
            raise ValueError(f"scheduler {scheduler}: {key} must be in [{p.minimum:g}, {p.maximum:g}], got {raw!r}")
        out[key] = value
    return out


# -- registry -------------------------------------------------------------------
SCHEDULERS: dict[str, type[Scheduler]] = {}
S = TypeVar("S", bound=type[Scheduler])


def register(cls: S) -> S:
    if not cls.name or not cls.doc:
        raise ValueError(f"{cls.__name__} needs a name and a one-line doc to be registered")
    if cls.name in SCHEDULERS:
        raise ValueError(f"scheduler name {cls.name!r} registered twice")
    SCHEDULERS[cls.name] = cls
    return cls


def create(name: str, config: Mapping[str, object] | None = None, *, kv_bytes_per_token: int,
           seed: int = 0) -> Scheduler:
    cls = SCHEDULERS.get(name)
    if cls is None:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    return cls(config or {}, kv_bytes_per_token=kv_bytes_per_token, seed=seed)


def describe() -> dict[str, str]:
    return {name: cls.doc for name, cls in SCHEDULERS.items()}


# -- shared helpers ---------------------------------------------------------------
def no_eligible(request: Request, decodes: Sequence[DecodeView]) -> NoEligibleDecode:
    """The exception for a request no decode can admit, saying why."""
    if not decodes:
        return NoEligibleDecode(f"request {request.request_id}: no decode instances given")
    need = request.input_tokens + request.output_tokens
    full = [d.name for d in decodes if not d.has_room()]
    short = [d for d in decodes if d.has_room() and d.free_kv_tokens < need]
    parts = []
    if full:
        parts.append(f"{len(full)} without a batch slot or queue room ({', '.join(full[:4])}{', ...' if len(full) > 4 else ''})")
    if short:
        most = max(d.free_kv_tokens for d in short)
        parts.append(f"{len(short)} short of KV memory (most free: {most} tokens)")
    return NoEligibleDecode(
        f"request {request.request_id} needs {need} KV tokens; none of {len(decodes)} decodes is eligible: "
        + "; ".join(parts)
    )


def eligible_views(request: Request, decodes: Iterable[DecodeView]) -> list[DecodeView]:
    need = request.input_tokens + request.output_tokens
    return [d for d in decodes
            if (d.active_batch < d.max_batch or d.queue_len < d.max_queue) and d.free_kv_tokens >= need]


def send_tokens(request: Request, matched_blocks: int) -> int:
    return request.input_tokens - min(request.input_tokens, matched_blocks * BLOCK_TOKENS)


K = TypeVar("K")


def argmin_by_name(items: Iterable[tuple[float, str, K]]) -> tuple[float, str, K]:
    """The item with the lowest score; equal scores go to the smaller name
    (plain string order).  The shared tie-break of every scheduler."""
    best: tuple[float, str, K] | None = None
    for item in items:
        if best is None or item[0] < best[0] or (item[0] == best[0] and item[1] < best[1]):
            best = item
    if best is None:
        raise ValueError("argmin of nothing")
    return best


# The queue-wait model shared by ``netkv`` and ``static_topology``.
LOAD_PARAMS: Mapping[str, Param] = {
    "slot_wait_ms": Param(240.0, 0.0, 1e6, "expected ms until one batch slot frees, per request ahead"),
    "step_ms_per_active": Param(0.1, 0.0, 1e3, "first-token delay added by each request already decoding"),
}


def load_ms(d: DecodeView, slot_wait_ms: float, step_ms_per_active: float) -> float:
    """Estimated wait before ``d`` emits the request's first token, besides the transfer.

    ``ahead = queue_len + active_batch + 1 - max_batch`` requests must leave
    before the new one gets a batch slot; each takes ``slot_wait_ms``.  Every
    request already in the batch makes a decode step slower by
    ``step_ms_per_active``."""
    ahead = d.queue_len + d.active_batch + 1 - d.max_batch
    return (slot_wait_ms * ahead if ahead > 0 else 0.0) + step_ms_per_active * d.active_batch


CostFn = Callable[[Mapping[str, float]], float]
