"""Pieces both worker kinds use: arguments, the control connection.

Kept import-light: a worker imports asyncio, json, struct and
:mod:`netkv.perfmodel` / :mod:`netkv.prefill` only (no numpy), so 64 of them
fit a small machine (each well under 40 MB RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
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
    return p


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
