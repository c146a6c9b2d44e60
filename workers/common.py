"""Pieces both worker kinds use: arguments, the control connection.

Kept import-light: a worker imports asyncio, json, struct and
:mod:`netkv.perfmodel` / :mod:`netkv.serving.prefill` only (no numpy), so 64 of them
fit a small machine (each well under 40 MB RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from netkv import perfmodel
from netkv.perfmodel import PerfModel

from .protocol import MAX_LINE_BYTES, decode, encode


def base_parser(role: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m workers.{role}", description=f"NetKV {role} worker")
    p.add_argument("--host", required=True, help="GPU host name this worker plays (e.g. g5)")
    p.add_argument("--control", required=True, help="path of the frontend's Unix control socket")
    p.add_argument("--model", default=perfmodel.DEFAULT_MODEL, help="model name in netkv.perfmodel.MODELS")
    p.add_argument("--gpu", default=perfmodel.DEFAULT_GPU, help="GPU name in netkv.perfmodel.GPUS")
    p.add_argument("--perf-json", default="{}", help="perf-model overrides as a JSON object")
    p.add_argument("--ranks-json", default=None,
                   help="tensor parallelism: the instance's GPU hosts in rank order, a JSON list of "
                        '{"host", "netns" (path of the host\'s network namespace, null: this one)'
                        '[, "ip", "port" (decode: the rank\'s KV listener)]}; absent: one GPU host')
    return p


@dataclass(frozen=True)
class Rank:
    """One GPU host of a (tensor-parallel) instance."""

    host: str
    netns: str | None  # namespace to open its sockets in; None: the worker's own
    ip: str = ""  # decode: where the rank's KV listener binds
    port: int = 0


def parse_ranks(args: argparse.Namespace, perf: PerfModel, listen: tuple[str, int] | None = None) -> list[Rank]:
    """The instance's ranks from ``--ranks-json`` (rank 0 is ``--host``, in the
    worker's own namespace), or the one host ``--host`` without it; their number
    must be the perf model's ``tp``.  ``listen`` is a decode's ``--listen-ip/--listen-port``."""
    if args.ranks_json is None:
        ranks = [Rank(args.host, None, *(listen or ("", 0)))]
    else:
        raw = json.loads(args.ranks_json)
        if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
            raise SystemExit(f"--ranks-json must be a JSON list of objects, got {args.ranks_json!r}")
        want = {"host", "netns"} | ({"ip", "port"} if listen is not None else set())
        ranks = []
        for i, r in enumerate(raw):
            if set(r) != want:
                raise SystemExit(f"--ranks-json rank {i} must have exactly the keys {sorted(want)}, got {sorted(r)}")
            ranks.append(Rank(str(r["host"]), None if r["netns"] is None else str(r["netns"]),
                              *((str(r["ip"]), int(r["port"])) if listen is not None else ("", 0))))
        if not ranks or ranks[0].host != args.host or ranks[0].netns is not None:
            raise SystemExit(f"--ranks-json: rank 0 must be --host {args.host} in this namespace (netns null)")
        if listen is not None and (ranks[0].ip, ranks[0].port) != listen:
            raise SystemExit(f"--ranks-json: rank 0 must listen on --listen-ip/--listen-port {listen[0]}:{listen[1]}")
    if len(ranks) != perf.tp:
        raise SystemExit(f"{len(ranks)} rank host(s) given for a model served at tp={perf.tp}")
    return ranks


def build_perf(args: argparse.Namespace) -> PerfModel:
    overrides = json.loads(args.perf_json)
    if not isinstance(overrides, dict):
        raise SystemExit(f"--perf-json must be a JSON object, got {args.perf_json!r}")
    return perfmodel.build(args.model, args.gpu, overrides)


def log(host: str, text: str) -> None:
    print(f"{time.time():.3f} {host}[{os.getpid()}] {text}", file=sys.stderr, flush=True)


class Control:
    """The worker's end of the control socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: str) -> "Control":
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE_BYTES)
        return cls(reader, writer)

    def send(self, msg: dict[str, Any]) -> None:
        self.writer.write(encode(msg))

    async def serve(self, handle: Callable[[dict[str, Any]], Awaitable[bool]]) -> None:
        """Feed each message to ``handle`` until it returns False or the
        frontend goes away."""
        while True:
            line = await self.reader.readline()
            if not line:
                return
            if not await handle(decode(line)):
                return
