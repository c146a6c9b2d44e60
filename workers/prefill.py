"""Prefill worker: ``python -m workers.prefill --host g0 --control RUN/ctl.sock``.

One instance per prefill GPU host.  Requests arrive from the frontend over the
control socket and are served first come, first served, one at a time:

1. look up the request's leading 512-token blocks in the LRU prefix cache
   (:class:`netkv.serving.prefill.PrefixCache`, capacity from the perf model);
2. "compute" the uncached tokens: sleep :meth:`PerfModel.prefill_ms`;
3. insert the request's blocks into the cache, report ``prefilled``;
4. hand the KV payload (``wire_bytes`` = real KV bytes / scale factor, sent
   by the frontend) to the sender of the decode host.

Each decode host has one sender task and one TCP connection, opened on first
use and reused; transfers to the same decode go out in order, transfers to
different decodes in parallel, and compute of the next request overlaps them.
A transfer that cannot be delivered is reported as ``send_failed``; the next
transfer to that host tries a fresh connection.

Tensor parallelism (``--ranks-json``, ``tp`` GPU hosts): the worker plays the
whole instance from its rank-0 host.  A request's KV goes as ``tp`` concurrent
flows, rank i's share from rank i's host to rank i of the decode instance
(the ``rank_addrs`` and ``rank_wire_bytes`` of the ``prefill`` message), each
over its own reused connection (one sender per decode instance and rank, its
socket opened in rank i's network namespace: :mod:`workers.netns`).  ``sent``
is reported once every rank's flow is written (start: the earliest rank's
first byte, end: the latest rank's last byte); the first failing rank reports
``send_failed``.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

from netkv.perfmodel import PerfModel
from netkv.serving.prefill import PrefillCompute

from .common import Control, Rank, base_parser, build_perf, log, parse_ranks
from .netns import tcp_socket_in
from .protocol import kv_header

CHUNK_BYTES = 256 * 1024
_ZEROS = memoryview(bytes(CHUNK_BYTES))


@dataclass
class Job:
    request_id: str
    input_tokens: int
    hash_ids: list[int]
    decode: str
    addrs: list[tuple[str, int]]  # rank i's KV listener of the decode instance (one at tp 1)
    wire_bytes: list[int]  # bytes of rank i's flow
    starts_s: list[float] = field(default_factory=list)  # of the rank flows written so far
    ends_s: list[float] = field(default_factory=list)
    failed: bool = False


class Sender:
    """The reused KV connection from one rank to the same rank of one decode
    instance (at tp 1: to the decode host), and its queue."""

    def __init__(self, worker: "PrefillWorker", decode: str, addr: tuple[str, int], rank: int = 0) -> None:
        self.worker = worker
        self.decode = decode
        self.addr = addr
        self.rank = rank
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.writer: asyncio.StreamWriter | None = None
        self.reader: asyncio.StreamReader | None = None
        self.task = asyncio.create_task(self.run())

    async def _connection(self) -> asyncio.StreamWriter:
        # The decode never writes on this connection: an end of file from it means
        # it closed (its worker exited); a fresh connection reaches a restarted one.
        if self.writer is None or self.writer.is_closing() or (self.reader is not None and self.reader.at_eof()):
            if self.writer is not None:
                self.writer.close()
            netns = self.worker.ranks[self.rank].netns
            if netns is None:
                self.reader, self.writer = await asyncio.open_connection(self.addr[0], self.addr[1])
            else:
                sock = tcp_socket_in(netns)  # the flow leaves from this rank's own host
                try:
                    sock.setblocking(False)
                    await asyncio.get_running_loop().sock_connect(sock, self.addr)
                except BaseException:
                    sock.close()
                    raise
                self.reader, self.writer = await asyncio.open_connection(sock=sock)
        return self.writer

    async def run(self) -> None:
        while True:
            job = await self.queue.get()
            wire_bytes = job.wire_bytes[self.rank]
            try:
                writer = await asyncio.wait_for(self._connection(), timeout=10.0)
                start_s = time.time()
                writer.write(kv_header(job.request_id, wire_bytes))
                left = wire_bytes
                while left > 0:
                    n = min(left, CHUNK_BYTES)
                    writer.write(_ZEROS[:n])
                    left -= n
                    await writer.drain()
                await writer.drain()
                end_s = time.time()
            except (OSError, asyncio.TimeoutError) as exc:
                src = self.worker.host if len(self.worker.ranks) == 1 else \
                    f"rank {self.rank} ({self.worker.ranks[self.rank].host}) of {self.worker.host}"
                reason = f"KV transfer {src}->{self.decode} {self.addr[0]}:{self.addr[1]} failed: {exc!r}"
                log(self.worker.host, reason)
                if self.writer is not None:
                    self.writer.close()
                self.writer = None
                if not job.failed:
                    job.failed = True
                    self.worker.control.send({"t": "send_failed", "id": job.request_id, "reason": reason})
                continue
            job.starts_s.append(start_s)
            job.ends_s.append(end_s)
            if len(job.ends_s) == len(job.addrs) and not job.failed:  # the last rank's flow is written
                self.worker.control.send({"t": "sent", "id": job.request_id, "start_s": min(job.starts_s),
                                          "end_s": max(job.ends_s)})


class PrefillWorker:
    def __init__(self, host: str, control: Control, perf: PerfModel, ranks: list[Rank] | None = None) -> None:
        self.host = host
        self.control = control
        self.compute_model = PrefillCompute(perf)
        self.ranks = ranks if ranks is not None else [Rank(host, None)]
        self.jobs: asyncio.Queue[Job] = asyncio.Queue()
        self.senders: dict[tuple[str, int], Sender] = {}

    async def compute(self) -> None:
        while True:
            job = await self.jobs.get()
            start_s = time.time()
            cached, t_ms = self.compute_model.start(job.hash_ids, job.input_tokens)
            await asyncio.sleep(t_ms / 1000.0)
            self.compute_model.finish(job.hash_ids)
            end_s = time.time()
            self.control.send(
                {"t": "prefilled", "id": job.request_id, "start_s": start_s, "end_s": end_s, "cached_tokens": cached}
            )
            for rank, addr in enumerate(job.addrs):
                sender = self.senders.get((job.decode, rank))
                if sender is None or sender.addr != addr:
                    sender = self.senders[(job.decode, rank)] = Sender(self, job.decode, addr, rank)
                sender.queue.put_nowait(job)

    async def handle(self, msg: dict[str, Any]) -> bool:
        kind = msg["t"]
        if kind == "stop":
            return False
        if kind == "prefill":
            ip, port = msg["addr"]
            addrs = [(str(ip), int(port))]
            wire = [int(msg["wire_bytes"])]
            if "rank_addrs" in msg:  # tensor parallelism: one flow per rank
                addrs = [(str(a[0]), int(a[1])) for a in msg["rank_addrs"]]
                wire = [int(b) for b in msg["rank_wire_bytes"]]
            if len(addrs) != len(self.ranks) or len(wire) != len(self.ranks):
                self.control.send({"t": "send_failed", "id": msg["id"],
                                   "reason": f"{len(addrs)} rank address(es) and {len(wire)} rank size(s) for an "
                                             f"instance of {len(self.ranks)} rank(s)"})
                return True
            self.jobs.put_nowait(
                Job(msg["id"], int(msg["input_tokens"]), list(msg["hash_ids"]), msg["decode"], addrs, wire)
            )
            return True
        log(self.host, f"ignoring unknown control message {kind!r}")
        return True


async def amain() -> None:
    args = base_parser("prefill").parse_args()
    perf = build_perf(args)
    ranks = parse_ranks(args, perf)
    control = await Control.connect(args.control)
    worker = PrefillWorker(args.host, control, perf, ranks)
    compute = asyncio.create_task(worker.compute())
    control.send({"t": "hello", "host": args.host, "role": "prefill", "pid": os.getpid()})
    tp_note = "" if len(ranks) == 1 else f", tp {len(ranks)} on {', '.join(r.host for r in ranks)}"
    log(args.host, f"prefill worker up: {perf.model.name} on {perf.gpu.name}, cache {perf.prefix_cache_blocks} blocks"
                   f"{tp_note}")
    await control.serve(worker.handle)
    compute.cancel()
    log(args.host, "prefill worker stopping")


if __name__ == "__main__":
    asyncio.run(amain())
