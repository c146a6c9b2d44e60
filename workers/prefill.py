"""Prefill worker: ``python -m workers.prefill --host g0 --control RUN/ctl.sock``.

One instance per prefill GPU host.  Requests arrive from the frontend over the
control socket and are served first come, first served, one at a time:

1. look up the request's leading 512-token blocks in the LRU prefix cache
   (:class:`netkv.prefill.PrefixCache`, capacity from the perf model);
2. "compute" the uncached tokens: sleep :meth:`PerfModel.prefill_ms`;
3. insert the request's blocks into the cache, report ``prefilled``;
4. hand the KV payload (``wire_bytes`` = real KV bytes / scale factor, sent
   by the frontend) to the sender of the decode host.

Each decode host has one sender task and one TCP connection, opened on first
use and reused; transfers to the same decode go out in order, transfers to
different decodes in parallel, and compute of the next request overlaps them.
A transfer that cannot be delivered is reported as ``send_failed``; the next
transfer to that host tries a fresh connection.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

from netkv.perfmodel import PerfModel
from netkv.prefill import PrefixCache

from .common import Control, base_parser, build_perf, log
from .protocol import kv_header

CHUNK_BYTES = 256 * 1024
_ZEROS = memoryview(bytes(CHUNK_BYTES))


@dataclass
class Job:
    request_id: str
    input_tokens: int
    hash_ids: list[int]
    decode: str
    addr: tuple[str, int]
    wire_bytes: int


class Sender:
    """The reused KV connection to one decode host, and its queue."""

    def __init__(self, worker: "PrefillWorker", decode: str, addr: tuple[str, int]) -> None:
        self.worker = worker
        self.decode = decode
        self.addr = addr
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
            self.reader, self.writer = await asyncio.open_connection(self.addr[0], self.addr[1])
        return self.writer

    async def run(self) -> None:
        while True:
            job = await self.queue.get()
            try:
                writer = await asyncio.wait_for(self._connection(), timeout=10.0)
                start_s = time.time()
                writer.write(kv_header(job.request_id, job.wire_bytes))
                left = job.wire_bytes
                while left > 0:
                    n = min(left, CHUNK_BYTES)
                    writer.write(_ZEROS[:n])
                    left -= n
                    await writer.drain()
                await writer.drain()
                end_s = time.time()
            except (OSError, asyncio.TimeoutError) as exc:
                reason = f"KV transfer {self.worker.host}->{self.decode} {self.addr[0]}:{self.addr[1]} failed: {exc!r}"
                log(self.worker.host, reason)
                if self.writer is not None:
                    self.writer.close()
                self.writer = None
                self.worker.control.send({"t": "send_failed", "id": job.request_id, "reason": reason})
                continue
            self.worker.control.send({"t": "sent", "id": job.request_id, "start_s": start_s, "end_s": end_s})


class PrefillWorker:
    def __init__(self, host: str, control: Control, cache_blocks: int, perf: PerfModel) -> None:
        self.host = host
        self.control = control
        self.cache = PrefixCache(cache_blocks)
        self.perf = perf
        self.jobs: asyncio.Queue[Job] = asyncio.Queue()
        self.senders: dict[str, Sender] = {}

    async def compute(self) -> None:
        while True:
            job = await self.jobs.get()
            start_s = time.time()
            cached = self.cache.cached_tokens(job.hash_ids, job.input_tokens)
            t_ms = self.perf.prefill_ms(job.input_tokens - cached, cached)
            await asyncio.sleep(t_ms / 1000.0)
            self.cache.insert(job.hash_ids)
            end_s = time.time()
            self.control.send(
                {"t": "prefilled", "id": job.request_id, "start_s": start_s, "end_s": end_s, "cached_tokens": cached}
            )
            sender = self.senders.get(job.decode)
            if sender is None or sender.addr != job.addr:
                sender = self.senders[job.decode] = Sender(self, job.decode, job.addr)
            sender.queue.put_nowait(job)

    async def handle(self, msg: dict[str, Any]) -> bool:
        kind = msg["t"]
        if kind == "stop":
            return False
        if kind == "prefill":
            ip, port = msg["addr"]
            self.jobs.put_nowait(
                Job(msg["id"], int(msg["input_tokens"]), list(msg["hash_ids"]), msg["decode"],
                    (str(ip), int(port)), int(msg["wire_bytes"]))
            )
            return True
        log(self.host, f"ignoring unknown control message {kind!r}")
        return True


async def amain() -> None:
    args = base_parser("prefill").parse_args()
    perf = build_perf(args)
    control = await Control.connect(args.control)
    worker = PrefillWorker(args.host, control, perf.prefix_cache_blocks, perf)
    compute = asyncio.create_task(worker.compute())
    control.send({"t": "hello", "host": args.host, "role": "prefill", "pid": os.getpid()})
    log(args.host, f"prefill worker up: {perf.model.name} on {perf.gpu.name}, cache {perf.prefix_cache_blocks} blocks")
    await control.serve(worker.handle)
    compute.cancel()
    log(args.host, "prefill worker stopping")


if __name__ == "__main__":
    asyncio.run(amain())
