"""A decode instance of the serving model: admission, batching and KV memory.

One :class:`DecodeBatcher` is one decode instance, whichever engine drives it
(the emulator's decode worker process over real time, or an in-process engine
over simulated time); every time is passed in.

A request is *ready* once both are there: the router's ``expect`` (its
lengths and payload size) and every byte of its KV payload (every rank's flow
with tensor parallelism); the arrival of the last byte is its
``transfer_end``.  Ready requests wait in FIFO order and are admitted into
the running batch when a batch slot is free (``max_batch``) and KV memory for
all its tokens (input + output, from the perf model's KV capacity) can be
reserved; a later request never overtakes one that waits for memory.
Continuous batching: each iteration takes :meth:`PerfModel.decode_step_ms` for
the current batch size and total context, and at its end every request in the
batch has one more token.  The first token of a request is emitted at the end
of the first iteration that includes it; the request completes with its last
token, frees its memory and is reported (:class:`Done`) with its time stamps
and time-between-tokens statistics.  New requests join at iteration
boundaries.  A request that could never fit (input + output larger than the
whole KV capacity) is rejected at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from netkv.perfmodel import PerfModel
from netkv.stats import percentile


@dataclass
class Expect:
    input_tokens: int
    output_tokens: int
    wire_bytes: int
    rank_wire_bytes: list[int] = field(default_factory=list)  # tensor parallelism: each rank's flow


@dataclass
class Active:
    request_id: str
    input_tokens: int
    output_tokens: int
    transfer_end_s: float
    admit_s: float
    token_times_s: list[float] = field(default_factory=list)

    @property
    def reserved_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class Done:
    """A finished request, as the decode reports it (epoch seconds)."""

    request_id: str
    transfer_end_s: float
    admit_s: float
    first_token_s: float
    completion_s: float
    tbt_mean_ms: float | None
    tbt_p99_ms: float | None


# One rank's flow of a payload: (when its last byte arrived, its bytes, the sender's address).
RankArrival = tuple[float, int, str]


@dataclass(frozen=True)
class Input:
    """What an input did to its request: ``rejected`` says why the request can
    never be served; ``parts`` are its rank flows when this input completed it."""

    rejected: str | None = None
    parts: dict[int, RankArrival] | None = None


def tbt_stats_ms(times_s: list[float]) -> tuple[float | None, float | None]:
    """Mean and p99 (linear interpolation) of the gaps between token times."""
    gaps = [(b - a) * 1000.0 for a, b in zip(times_s, times_s[1:])]
    if not gaps:
        return None, None
    return (times_s[-1] - times_s[0]) * 1000.0 / len(gaps), percentile(gaps, 99)


class DecodeBatcher:
    def __init__(self, perf: PerfModel, max_batch: int, ranks: int = 1) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.perf = perf
        self.max_batch = max_batch
        self.ranks = ranks
        self.capacity_tokens = perf.kv_capacity_tokens
        self.reserved_tokens = 0
        self.expected: dict[str, Expect] = {}
        self.arrived: dict[str, dict[int, RankArrival]] = {}  # id -> rank -> its flow's arrival
        self.ready: deque[tuple[str, Expect, float]] = deque()
        self.active: list[Active] = []

    # -- inputs ----------------------------------------------------------------
    def expect(self, rid: str, exp: Expect) -> Input:
        """The router's word that ``rid`` comes, with its lengths and payload size."""
        need = exp.input_tokens + exp.output_tokens
        if need > self.capacity_tokens:
            return Input(rejected=f"needs {need} KV tokens, instance capacity is {self.capacity_tokens}")
        self.expected[rid] = exp
        return self._maybe_ready(rid)

    def kv_arrived(self, rid: str, rank: int, end_s: float, payload_bytes: int, sender: str) -> Input:
        """The last byte of one rank's flow of ``rid``'s payload arrived at ``end_s``."""
        self.arrived.setdefault(rid, {})[rank] = (end_s, payload_bytes, sender)
        return self._maybe_ready(rid)

    def _maybe_ready(self, rid: str) -> Input:
        parts = self.arrived.get(rid)
        if rid not in self.expected or parts is None or len(parts) < self.ranks:
            return Input()  # the expect message or a rank's flow is still on its way
        exp = self.expected.pop(rid)
        del self.arrived[rid]
        if self.ranks == 1:
            end_s, got, _ = parts[0]
            if got != exp.wire_bytes:
                return Input(f"KV payload of {got} bytes, expected {exp.wire_bytes}", parts)
        else:
            got_per_rank = [parts[i][1] for i in range(self.ranks)]
            if got_per_rank != exp.rank_wire_bytes:
                return Input(f"KV payload of {got_per_rank} bytes per rank, expected {exp.rank_wire_bytes}", parts)
            end_s = max(p[0] for p in parts.values())
        self.ready.append((rid, exp, end_s))
        return Input(parts=parts)

    # -- the engine --------------------------------------------------------
    def admit(self, now_s: float) -> list[Active]:
        """Admit ready requests in FIFO order while a slot and memory are free."""
        admitted: list[Active] = []
        while self.ready and len(self.active) < self.max_batch:
            rid, exp, end_s = self.ready[0]
            need = exp.input_tokens + exp.output_tokens
            if self.reserved_tokens + need > self.capacity_tokens:
                break  # FIFO: wait for memory rather than let later requests overtake
            self.ready.popleft()
            self.reserved_tokens += need
            active = Active(rid, exp.input_tokens, exp.output_tokens, end_s, now_s)
            self.active.append(active)
            admitted.append(active)
        return admitted

    def step_ms(self) -> float:
        """How long the next iteration of the current batch takes."""
        context = sum(a.input_tokens + len(a.token_times_s) for a in self.active)
        return self.perf.decode_step_ms(len(self.active), context)

    def end_step(self, now_s: float) -> list[Done]:
        """An iteration ended at ``now_s``: one more token for every request in
        the batch; the requests that got their last one leave it."""
        still: list[Active] = []
        finished: list[Done] = []
        for a in self.active:
            a.token_times_s.append(now_s)
            if len(a.token_times_s) < a.output_tokens:
                still.append(a)
                continue
            self.reserved_tokens -= a.reserved_tokens
            mean_ms, p99_ms = tbt_stats_ms(a.token_times_s)
            finished.append(Done(a.request_id, a.transfer_end_s, a.admit_s, a.token_times_s[0], now_s,
                                 mean_ms, p99_ms))
        self.active = still
        return finished
