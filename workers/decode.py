"""Decode worker: ``python -m workers.decode --host g1 --control RUN/ctl.sock
--listen-ip 10.0.0.2 --listen-port 7070``.

One instance per decode GPU host.  It listens for KV payloads on its data
address (the only socket it has on the emulated network) and learns of each
request from the frontend's ``expect`` message.  Admission, batching, KV
memory and the iteration times are the serving model's
:class:`netkv.serving.decode.DecodeBatcher`; this process gives it real time
(one asyncio task sleeps through each iteration) and real bytes (the receive
time of a payload's last byte is its ``transfer_end``), and reports
``admitted``, ``done`` and ``rejected`` over the control socket.

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
import os
import socket
import time
from dataclasses import asdict
from typing import Any

from netkv.perfmodel import PerfModel
from netkv.serving.decode import DecodeBatcher, Expect, Input

from .common import Control, Rank, base_parser, build_perf, log, parse_ranks
from .netns import tcp_socket_in
from .protocol import KV_HEADER, ProtocolError, parse_kv_header

READ_BYTES = 1024 * 1024
LATE_TOLERANCE_S = 0.002  # an iteration that ends later than this restarts the schedule from now


class DecodeWorker:
    def __init__(self, host: str, control: Control, perf: PerfModel, max_batch: int,
                 ranks: list[Rank] | None = None) -> None:
        self.host = host
        self.control = control
        self.ranks = ranks if ranks is not None else [Rank(host, None)]
        self.batcher = DecodeBatcher(perf, max_batch, len(self.ranks))
        self.wake = asyncio.Event()

    @property
    def capacity_tokens(self) -> int:
        return self.batcher.capacity_tokens

    # -- inputs ------------------------------------------------------------
    def _after_input(self, rid: str, result: Input) -> None:
        if result.parts is not None and len(self.ranks) > 1:
            parts = result.parts
            log(self.host, f"KV {rid} complete: " + "; ".join(
                f"rank {i} {parts[i][1]} B {parts[i][2]}->{r.ip}:{r.port} end {parts[i][0]:.6f}"
                for i, r in enumerate(self.ranks)))
        if result.rejected is not None:
            self.control.send({"t": "rejected", "id": rid, "reason": result.rejected})
        elif result.parts is not None:
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
                self._after_input(rid, self.batcher.kv_arrived(rid, rank, time.time(), total, str(peer[0])))
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
            self._after_input(rid, self.batcher.expect(rid, exp))
            return True
        log(self.host, f"ignoring unknown control message {kind!r}")
        return True

    # -- the engine -------------------------------------------------------
    def _admit(self) -> None:
        for a in self.batcher.admit(time.time()):
            self.control.send({"t": "admitted", "id": a.request_id, "transfer_end_s": a.transfer_end_s,
                               "admit_s": a.admit_s})

    async def engine(self) -> None:
        loop = asyncio.get_running_loop()
        anchor: float | None = None  # loop time the next iteration starts at
        while True:
            self._admit()
            if not self.batcher.active:
                anchor = None
                self.wake.clear()
                await self.wake.wait()
                continue
            start = loop.time() if anchor is None else anchor
            deadline = start + self.batcher.step_ms() / 1000.0
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            anchor = deadline if loop.time() - deadline < LATE_TOLERANCE_S else None
            for done in self.batcher.end_step(time.time()):
                msg = asdict(done)
                msg["id"] = msg.pop("request_id")
                self.control.send({"t": "done", **msg})


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
