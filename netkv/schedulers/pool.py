"""A columnar, incrementally updated set of decode instances.

A router that makes thousands of decisions per second keeps its view of the
decode instances across decisions and updates one instance per event (a request
admitted or finished, blocks cached or evicted) instead of rebuilding every
:class:`DecodeView`.  :class:`DecodePool` is that state: numpy columns for the
counters and an inverted index ``block hash id -> instances holding it`` (the
same idea as a KV router's global block index), so the prefix match of a
request costs O(instances holding its leading blocks), not O(|D| x blocks).

It is also a ``Sequence[DecodeView]``: every scheduler accepts it, and the
``netkv`` scheduler uses its columns for a vectorized O(|D|) decision.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator, Sequence, overload

import numpy as np

from ..request import DecodeView

_VERSIONS = itertools.count(1)


class DecodePool(Sequence[DecodeView]):
    def __init__(self, views: Iterable[DecodeView]) -> None:
        views = list(views)
        self.names: list[str] = [v.name for v in views]
        self.position: dict[str, int] = {}
        for i, name in enumerate(self.names):
            if name in self.position:
                raise ValueError(f"decode {name} listed twice")
            self.position[name] = i
        self.queue_len = np.array([v.queue_len for v in views], dtype=np.int64)
        self.active_batch = np.array([v.active_batch for v in views], dtype=np.int64)
        self.max_batch = np.array([v.max_batch for v in views], dtype=np.int64)
        self.free_kv_tokens = np.array([v.free_kv_tokens for v in views], dtype=np.int64)
        self.max_queue = np.array([v.max_queue for v in views], dtype=np.int64)
        self.used_kv_tokens = np.array([v.used_kv_tokens for v in views], dtype=np.int64)
        self.blocks: list[set[int]] = [set(v.cached_blocks) for v in views]
        self.holders: dict[int, set[int]] = {}
        for i, v in enumerate(views):
            for h in v.cached_blocks:
                self.holders.setdefault(h, set()).add(i)
        self._views: list[DecodeView | None] = list(views)
        # Changes when the set or order of instances changes (never, for now:
        # a pool's membership is fixed; build a new pool to change it).
        self.names_version = next(_VERSIONS)
        # Changes whenever a counter column changes (not on cache-block updates).
        self.state_version = next(_VERSIONS)

    # -- Sequence ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    @overload
    def __getitem__(self, i: int) -> DecodeView: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[DecodeView]: ...

    def __getitem__(self, i: int | slice) -> DecodeView | Sequence[DecodeView]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        view = self._views[i]
        if view is None:
            view = DecodeView(
                self.names[i], int(self.queue_len[i]), int(self.active_batch[i]), int(self.max_batch[i]),
                int(self.free_kv_tokens[i]), frozenset(self.blocks[i]), int(self.max_queue[i]),
                int(self.used_kv_tokens[i]),
            )
            self._views[i] = view
        return view

    def __iter__(self) -> Iterator[DecodeView]:
        for i in range(len(self.names)):
            yield self[i]

    # -- updates ---------------------------------------------------------------------
    def _at(self, name: str) -> int:
        try:
            return self.position[name]
        except KeyError:
            raise KeyError(f"decode {name!r} is not in this pool") from None

    def update(self, name: str, *, queue_len: int | None = None, active_batch: int | None = None,
               free_kv_tokens: int | None = None, used_kv_tokens: int | None = None) -> None:
        i = self._at(name)
        for label, value, column in (("queue_len", queue_len, self.queue_len),
                                     ("active_batch", active_batch, self.active_batch),
                                     ("free_kv_tokens", free_kv_tokens, self.free_kv_tokens),
                                     ("used_kv_tokens", used_kv_tokens, self.used_kv_tokens)):
            if value is not None:
                if value < 0:
                    raise ValueError(f"decode {name}: {label} must be >= 0, got {value}")
                column[i] = value
        self._views[i] = None
        self.state_version = next(_VERSIONS)

    def add_blocks(self, name: str, hash_ids: Iterable[int]) -> None:
        i = self._at(name)
        for h in hash_ids:
            if h not in self.blocks[i]:
                self.blocks[i].add(h)
                self.holders.setdefault(h, set()).add(i)
        self._views[i] = None

    def remove_blocks(self, name: str, hash_ids: Iterable[int]) -> None:
        i = self._at(name)
        for h in hash_ids:
            if h in self.blocks[i]:
                self.blocks[i].discard(h)
                holders = self.holders[h]
                holders.discard(i)
                if not holders:
                    del self.holders[h]
        self._views[i] = None

    # -- queries -------------------------------------------------------------------------
    def matched_blocks(self, hash_ids: Sequence[int]) -> dict[int, int]:
        """``instance index -> leading blocks of hash_ids it holds``, for every
        instance holding at least the first block."""
        out: dict[int, int] = {}
        if not hash_ids:
            return out
        alive = self.holders.get(hash_ids[0])
        if not alive:
            return out
        alive = set(alive)
        for k in range(1, len(hash_ids)):
            holders = self.holders.get(hash_ids[k])
            survivors = alive & holders if holders else set()
            for i in alive - survivors:
                out[i] = k
            alive = survivors
            if not alive:
                return out
        for i in alive:
            out[i] = len(hash_ids)
        return out
