"""Requests and decode-instance views, the inputs of every scheduler.

A request's prompt is cut into blocks of :data:`BLOCK_TOKENS` tokens; each
block is named by a hash id (as in the Mooncake trace format, where block ``i``
covers tokens ``[i*512, (i+1)*512)`` and its id identifies the whole prefix up
to and including that block).  A decode instance that already holds the first
``k`` blocks of a request only needs the KV cache of the remaining tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AbstractSet, Iterable

BLOCK_TOKENS = 512


@dataclass(frozen=True)
class Request:
    request_id: str
    arrival_ms: float
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.input_tokens < 0:
            raise ValueError(f"request {self.request_id}: input_tokens must be >= 0, got {self.input_tokens}")
        if self.output_tokens < 0:
            raise ValueError(f"request {self.request_id}: output_tokens must be >= 0, got {self.output_tokens}")



@dataclass(frozen=True)
class DecodeView:
    """What a router knows about one decode instance when it decides.

    * ``queue_len``: requests waiting for a batch slot (not yet decoding).
    * ``active_batch`` / ``max_batch``: requests decoding now / batch slots.
    * ``free_kv_tokens``: KV memory still free, in tokens.
    * ``cached_blocks``: prefix-block hash ids whose KV cache it holds.
    * ``max_queue``: waiting requests it accepts; a request is admitted when it
      can take a batch slot now or wait in a queue shorter than this.
    * ``used_kv_tokens``: KV tokens held by the requests on the instance
      (decoding and waiting); the ``kv_router`` baseline's "active blocks".
      Producers that do not track it leave 0.
    """

    name: str
    queue_len: int
    active_batch: int
    max_batch: int
    free_kv_tokens: int
    cached_blocks: frozenset[int] = field(default_factory=frozenset)
    max_queue: int = 64
    used_kv_tokens: int = 0

    def __post_init__(self) -> None:
        for label in ("queue_len", "active_batch", "free_kv_tokens", "max_queue", "used_kv_tokens"):
            value = getattr(self, label)
            if value < 0:
                raise ValueError(f"decode {self.name}: {label} must be >= 0, got {value}")
        if self.max_batch < 1:
            raise ValueError(f"decode {self.name}: max_batch must be >= 1, got {self.max_batch}")

    @property
    def load(self) -> int:
        """Requests on the instance: decoding plus waiting."""
        return self.active_batch + self.queue_len

    def has_room(self) -> bool:
        """A free batch slot, or room in the waiting queue."""
        return self.active_batch < self.max_batch or self.queue_len < self.max_queue

    def eligible(self, request: Request) -> bool:
        """Room to admit the request and KV memory for all its tokens.

        Memory is checked for input + output tokens without crediting cached
        prefix blocks: the cached copy may be evicted or shared, so admission
        is conservative and never depends on cache state."""
        return self.has_room() and self.free_kv_tokens >= request.input_tokens + request.output_tokens


def matched_prefix_blocks(hash_ids: Iterable[int], cached_blocks: AbstractSet[int]) -> int:
    """Length of the leading run of ``hash_ids`` present in ``cached_blocks``."""
    n = 0
    for h in hash_ids:
        if h not in cached_blocks:
            break
        n += 1
    return n


def tokens_to_send(request: Request, cached_blocks: AbstractSet[int]) -> int:
    """Prompt tokens whose KV cache must cross the network to this decode."""
    matched = matched_prefix_blocks(request.hash_ids, cached_blocks)
    return request.input_tokens - min(request.input_tokens, matched * BLOCK_TOKENS)
