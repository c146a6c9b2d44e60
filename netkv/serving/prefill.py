"""A prefill instance of the serving model, and the router's choice of one.

:class:`PrefixCache` is the LRU cache of 512-token KV blocks keyed by the
trace's ``hash_ids``.  A prefill worker keeps one for real; the frontend keeps
an identical mirror per prefill instance, updated in the same (FIFO) order, so
it knows what each instance holds without asking.

:class:`PrefillChooser` picks the prefill instance for a request the way
production routers do: it is *cache-aware* and *load-aware*.  For every live
instance it estimates when the request's prefill would finish there::

    cost_ms = pending_ms(instance) + prefill_ms(uncached tokens at that instance)

where ``pending_ms`` is the predicted compute of the prefills already queued
or running on it, and the uncached tokens are those beyond the longest
leading run of the request's blocks found in the instance's cache.  The
smallest cost wins; ties go to the longer cached prefix, then the shorter
queue, then the host name.  This is the prefill selection of Mooncake's
Conductor (Qin et al., FAST'25, Algorithm 1 "KVCache-centric scheduling":
per instance, prefix-match length, queueing time and prefill time give an
estimated TTFT; the lowest wins) and the shape of the cost used by the
Dynamo KV router and SGLang's cache-aware router (cached-prefix overlap
traded against load).

Policies (``prefill_policy``): ``"cache_load"`` (the rule above, default),
``"least_loaded"`` (ignore caches: smallest pending_ms), ``"round_robin"``
(ignore both; a baseline).

:class:`PrefillCompute` is the instance itself, whichever engine drives it:
requests are served first come, first served, one at a time; each looks up
its leading blocks in the cache, computes the uncached tokens
(:meth:`PerfModel.prefill_ms`) and then inserts its blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

from netkv.perfmodel import BLOCK_TOKENS, PerfModel

PREFILL_POLICIES = ("cache_load", "least_loaded", "round_robin")


class PrefillChoiceError(ValueError):
    """No prefill instance can take the request, or a bad policy."""


class PrefixCache:
    """LRU set of block hash ids with a capacity in blocks."""

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks!r}")
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self._snapshot: frozenset[int] | None = None

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: object) -> bool:
        return block in self._blocks

    def matched_blocks(self, hash_ids: Iterable[int]) -> int:
        """Length of the leading run of ``hash_ids`` in the cache (no LRU update)."""
        n = 0
        for h in hash_ids:
            if h not in self._blocks:
                break
            n += 1
        return n

    def cached_tokens(self, hash_ids: Sequence[int], input_tokens: int) -> int:
        """Prompt tokens whose KV is reusable.  At least one token is always
        computed (the last position's logits give the first output token)."""
        return max(0, min(self.matched_blocks(hash_ids) * BLOCK_TOKENS, input_tokens - 1))

    def insert(self, hash_ids: Iterable[int]) -> None:
        """Mark every block most recently used, evicting the least recent."""
        self._snapshot = None
        for h in hash_ids:
            if h in self._blocks:
                self._blocks.move_to_end(h)
            else:
                self._blocks[h] = None
                if len(self._blocks) > self.capacity_blocks:
                    self._blocks.popitem(last=False)

    def snapshot(self) -> frozenset[int]:
        """The cached blocks as a frozenset (rebuilt only after an insert)."""
        if self._snapshot is None:
            self._snapshot = frozenset(self._blocks)
        return self._snapshot


@dataclass
class PrefillInstance:
    """The frontend's view of one prefill instance."""

    name: str
    cache: PrefixCache
    pending_ms: float = 0.0  # predicted compute of queued + running prefills
    queue_len: int = 0  # assigned, prefill not finished
    alive: bool = True


@dataclass(frozen=True)
class PrefillChoice:
    name: str
    cached_tokens: int
    predicted_prefill_ms: float
    cost_ms: float


class PrefillChooser:
    def __init__(self, perf: PerfModel, policy: str = "cache_load") -> None:
        if policy not in PREFILL_POLICIES:
            raise PrefillChoiceError(f"unknown prefill policy {policy!r}; known: {', '.join(PREFILL_POLICIES)}")
        self.perf = perf
        self.policy = policy
        self._rr = 0

    def choose(self, hash_ids: Sequence[int], input_tokens: int, instances: Sequence[PrefillInstance]) -> PrefillChoice:
        live = [i for i in instances if i.alive]
        if not live:
            raise PrefillChoiceError("no live prefill instance")
        best: tuple[tuple[float, int, int, str], PrefillChoice] | None = None
        if self.policy == "round_robin":
            inst = live[self._rr % len(live)]
            self._rr += 1
            cached = inst.cache.cached_tokens(hash_ids, input_tokens)
            t_ms = self.perf.prefill_ms(input_tokens - cached, cached)
            return PrefillChoice(inst.name, cached, t_ms, inst.pending_ms + t_ms)
        for inst in live:
            cached = inst.cache.cached_tokens(hash_ids, input_tokens)
            t_ms = self.perf.prefill_ms(input_tokens - cached, cached)
            cost = inst.pending_ms + (t_ms if self.policy == "cache_load" else 0.0)
            key = (round(cost, 6), -cached, inst.queue_len, inst.name)
            if best is None or key < best[0]:
                best = (key, PrefillChoice(inst.name, cached, t_ms, cost))
        assert best is not None
        return best[1]


class PrefillCompute:
    """One prefill instance's compute and its prefix cache (the engine keeps
    the FIFO queue and the clock)."""

    def __init__(self, perf: PerfModel) -> None:
        self.perf = perf
        self.cache = PrefixCache(perf.prefix_cache_blocks)

    def start(self, hash_ids: Sequence[int], input_tokens: int) -> tuple[int, float]:
        """A request's prefill begins: (its cached tokens, how long it computes in ms)."""
        cached = self.cache.cached_tokens(hash_ids, input_tokens)
        return cached, self.perf.prefill_ms(input_tokens - cached, cached)

    def finish(self, hash_ids: Iterable[int]) -> None:
        """The prefill ended: its blocks are in the cache now."""
        self.cache.insert(hash_ids)
