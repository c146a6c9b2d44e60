"""Decode worker: ``python -m workers.decode --host g1 --control RUN/ctl.sock
--listen-ip 10.0.0.2 --listen-port 7070``.

One instance per decode GPU host.  It listens for KV payloads on its data
address (the only socket it has on the emulated network) and learns of each
request from the frontend's ``expect`` message.  A request is *ready* once
both are there: the expect message and every byte of its KV payload; the
receive time of the last byte is its ``transfer_end``.

Ready requests wait in FIFO order and are admitted into the running batch
when a batch slot is free (``--max-batch``) and KV memory for all its tokens
(input + output, from the perf model's KV capacity) can be reserved.
Continuous batching: each iteration takes :meth:`PerfModel.decode_step_ms`
for the current batch size and total context, and at its end every request
in the batch has one more token.  The first token of a request is emitted at
the end of the first iteration that includes it; the request completes with
its last token, frees its memory and is reported (``done``) with its
timestamps and time-between-tokens statistics.  New requests join at
iteration boundaries.  A request that could never fit (input + output larger
than the whole KV capacity) is ``rejected`` at once.

Tensor parallelism (``--ranks-json``, ``tp`` GPU hosts): the worker plays the
whole instance from its rank-0 host and has one KV listener per rank, rank i's
on rank i's address (its socket opened in rank i's network namespace:
:mod:`workers.netns`).  A request's payload is ``tp`` flows, one per rank
(sizes in the ``expect`` message's ``rank_wire_bytes``); it is ready when
every rank's flow is complete, and its ``transfer_end`` is the last one's.
One log line per request names each rank's flow: bytes, sender and receiver
address, end time.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from netkv.perfmodel import PerfModel

from .common import Control, Rank, base_parser, build_perf, log, parse_ranks
from .netns import tcp_socket_in
from .protocol import KV_HEADER, ProtocolError, parse_kv_header

READ_BYTES = 1024 * 1024
LATE_TOLERANCE_S = 0.002  # an iteration that ends later than this restarts the schedule from now


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


def tbt_stats_ms(times_s: list[float]) -> tuple[float | None, float | None]:
    """Mean and p99 (linear interpolation) of the gaps between token times."""
    gaps = sorted((b - a) * 1000.0 for a, b in zip(times_s, times_s[1:]))
    if not gaps:
        return None, None
    pos = (len(gaps) - 1) * 0.99
    lo = math.floor(pos)
    hi = min(lo + 1, len(gaps) - 1)
    return (times_s[-1] - times_s[0]) * 1000.0 / len(gaps), gaps[lo] + (gaps[hi] - gaps[lo]) * (pos - lo)


class DecodeWorker:
    def __init__(self, host: str, control: Control, perf: PerfModel, max_batch: int,
                 ranks: list[Rank] | None = None) -> None:
        self.host = host
        self.control = control
        self.perf = perf
        self.max_batch = max_batch
        self.ranks = ranks if ranks is not None else [Rank(host, None)]
        self.capacity_tokens = perf.kv_capacity_tokens
        self.reserved_tokens = 0
        self.expected: dict[str, Expect] = {}
        # id -> rank -> (that rank's transfer_end_s, payload bytes, sender address)
        self.arrived: dict[str, dict[int, tuple[float, int, str]]] = {}
        self.ready: deque[tuple[str, Expect, float]] = deque()
        self.active: list[Active] = []
        self.wake = asyncio.Event()

    # -- inputs ------------------------------------------------------------
    def _maybe_ready(self, rid: str) -> None:
        if rid not in self.expected or rid not in self.arrived:
            return
        if len(self.arrived[rid]) < len(self.ranks):
            return  # a rank's flow is still on its way
        exp = self.expected.pop(rid)
        parts = self.arrived.pop(rid)
        if len(self.ranks) == 1:
            end_s, got, _ = parts[0]
            if got != exp.wire_bytes:
                self.control.send(
                    {"t": "rejected", "id": rid, "reason": f"KV payload of {got} bytes, expected {exp.wire_bytes}"}
                )
                return
        else:
            got_per_rank = [parts[i][1] for i in range(len(self.ranks))]
            if got_per_rank != exp.rank_wire_bytes:
                self.control.send({"t": "rejected", "id": rid, "reason": f"KV payload of {got_per_rank} bytes "
                                   f"per rank, expected {exp.rank_wire_bytes}"})
                return
            end_s = max(p[0] for p in parts.values())
            log(self.host, f"KV {rid} complete: " + "; ".join(
                f"rank {i} {parts[i][1]} B {parts[i][2]}->{r.ip}:{r.port} end {parts[i][0]:.6f}"
                for i, r in enumerate(self.ranks)))
        self.ready.append((rid, exp, end_s))
        self.wake.set()

    async def on_kv_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               rank: int = 0) -> None:
        peer = writer.get_extra_info("peername")
        if len(self.ranks) == 1:
            log(self.host, f"KV connection from {peer}")
        else:
            r = self.ranks[rank]
            log(self.host, f"KV connection from {peer} to rank {rank} ({r.host} {r.ip}:{r.port})")
        try:
            while True:
                try:
                    head = await reader.readexactly(KV_HEADER.size)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        log(self.host, f"KV connection from {peer} closed inside a frame header")
                    return
                id_len, left = parse_kv_header(head)
                rid = (await reader.readexactly(id_len)).decode()
                total = left
                while left > 0:
                    chunk = await reader.read(min(left, READ_BYTES))
                    if not chunk:
                        log(self.host, f"KV connection from {peer} closed with {left} of {total} bytes of {rid} missing")
                        return
                    left -= len(chunk)
                self.arrived.setdefault(rid, {})[rank] = (time.time(), total, str(peer[0]))
                self._maybe_ready(rid)
        except (OSError, ProtocolError, asyncio.IncompleteReadError) as exc:
            log(self.host, f"KV connection from {peer} failed: {exc!r}")
        finally:
            writer.close()

    async def handle(self, msg: dict[str, Any]) -> bool:
        kind = msg["t"]
        if kind == "stop":
            return False
        if kind == "expect":
            rid = msg["id"]
            exp = Expect(int(msg["input_tokens"]), int(msg["output_tokens"]), int(msg["wire_bytes"]),
                         [int(b) for b in msg.get("rank_wire_bytes", [])])
            need = exp.input_tokens + exp.output_tokens
            if need > self.capacity_tokens:
                self.control.send(
                    {"t": "rejected", "id": rid,
                     "reason": f"needs {need} KV tokens, instance capacity is {self.capacity_tokens}"}
                )
                return True
            self.expected[rid] = exp
            self._maybe_ready(rid)
            return True
        log(self.host, f"ignoring unknown control message {kind!r}")
        return True

    # -- the engine -------------------------------------------------------
    def _admit(self) -> None:
        while self.ready and len(self.active) < self.max_batch:
            rid, exp, end_s = self.ready[0]
            need = exp.input_tokens + exp.output_tokens
            if self.reserved_tokens + need > self.capacity_tokens:
                return  # FIFO: wait for memory rather than let later requests overtake
            self.ready.popleft()
            self.reserved_tokens += need
            now = time.time()
            self.active.append(Active(rid, exp.input_tokens, exp.output_tokens, end_s, now))
            self.control.send({"t": "admitted", "id": rid, "transfer_end_s": end_s, "admit_s": now})

    async def engine(self) -> None:
        loop = asyncio.get_running_loop()
        anchor: float | None = None  # loop time the next iteration starts at
        while True:
            self._admit()
            if not self.active:
                anchor = None
                self.wake.clear()
                await self.wake.wait()
                continue
            start = loop.time() if anchor is None else anchor
            context = sum(a.input_tokens + len(a.token_times_s) for a in self.active)
            deadline = start + self.perf.decode_step_ms(len(self.active), context) / 1000.0
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            anchor = deadline if loop.time() - deadline < LATE_TOLERANCE_S else None
            now = time.time()
            still: list[Active] = []
            for a in self.active:
                a.token_times_s.append(now)
                if len(a.token_times_s) < a.output_tokens:
                    still.append(a)
                    continue
                self.reserved_tokens -= a.reserved_tokens
                mean_ms, p99_ms = tbt_stats_ms(a.token_times_s)
                self.control.send({
                    "t": "done", "id": a.request_id, "transfer_end_s": a.transfer_end_s, "admit_s": a.admit_s,
                    "first_token_s": a.token_times_s[0], "completion_s": now,
                    "tbt_mean_ms": mean_ms, "tbt_p99_ms": p99_ms,
                })
            self.active = still


def rank_listener(rank: Rank) -> socket.socket:
    """The bound, listening KV socket of one rank, in that rank's namespace."""
    sock = tcp_socket_in(rank.netns)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((rank.ip, rank.port))
        sock.listen(100)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def amain() -> None:
    parser = base_parser("decode")
    parser.add_argument("--listen-ip", required=True, help="data address to bind for KV payloads")
    parser.add_argument("--listen-port", type=int, required=True, help="TCP port to bind for KV payloads")
    parser.add_argument("--max-batch", type=int, default=128, help="requests decoded together at most")
    args = parser.parse_args()
    if args.max_batch < 1:
        raise SystemExit(f"--max-batch must be >= 1, got {args.max_batch}")
    perf = build_perf(args)
    ranks = parse_ranks(args, perf, (args.listen_ip, args.listen_port))
    control = await Control.connect(args.control)
    worker = DecodeWorker(args.host, control, perf, args.max_batch, ranks)
    if len(ranks) == 1:
        servers = [await asyncio.start_server(worker.on_kv_connection, args.listen_ip, args.listen_port,
                                              reuse_address=True)]
    else:
        servers = [await asyncio.start_server(functools.partial(worker.on_kv_connection, rank=i),
                                              sock=rank_listener(r)) for i, r in enumerate(ranks)]
    engine = asyncio.create_task(worker.engine())
    control.send({"t": "hello", "host": args.host, "role": "decode", "pid": os.getpid()})
    listen = f"{args.listen_ip}:{args.listen_port}" if len(ranks) == 1 else \
        ", ".join(f"rank {i} {r.host} {r.ip}:{r.port}" for i, r in enumerate(ranks))
    log(args.host, f"decode worker up on {listen}, "
                   f"KV capacity {worker.capacity_tokens} tokens, max batch {args.max_batch}")
    await control.serve(worker.handle)
    engine.cancel()
    for server in servers:
        server.close()
    log(args.host, "decode worker stopping")


if __name__ == "__main__":
    asyncio.run(amain())
