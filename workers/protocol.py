"""Wire formats shared by the frontend and the workers.

Control plane (out of band, Unix-domain stream socket ``<run_dir>/ctl.sock``):
one JSON object per line, key ``"t"`` names the message.  Timestamps are wall
clock seconds (``time.time()``) under keys ending in ``_s``, and only they end
so: a worker on another server stamps with that server's clock, and the
frontend puts every such key on its own (:func:`workers.driver.on_head_clock`).

worker -> frontend
    ``hello``       {host, role, pid}: connected and ready (a decode worker
                    sends it only once its KV listener is bound)
    ``prefilled``   {id, start_s, end_s, cached_tokens}: prefill compute done
    ``sent``        {id, start_s, end_s}: KV payload written (start = first byte
                    handed to TCP; end = last byte handed to TCP)
    ``send_failed`` {id, reason}: the KV payload could not be delivered
    ``admitted``    {id, transfer_end_s, admit_s}: decode took the request into its batch
    ``done``        {id, transfer_end_s, admit_s, first_token_s, completion_s,
                    tbt_mean_ms, tbt_p99_ms}
    ``rejected``    {id, reason}: decode cannot ever hold the request
frontend -> worker
    ``prefill``     {id, input_tokens, hash_ids, decode, addr: [ip, port], wire_bytes}
    ``expect``      {id, input_tokens, output_tokens, wire_bytes}
    ``stop``        {}: exit now

With tensor parallelism (``tp`` > 1; a worker plays a whole instance from its
rank-0 host) ``prefill`` also carries ``rank_addrs`` (the decode instance's
listener of each rank, rank 0 first; ``addr`` is rank 0's) and
``rank_wire_bytes`` (each rank flow's bytes; ``wire_bytes`` is their sum), and
``expect`` carries ``rank_wire_bytes``.  ``sent`` then spans every rank's
flow (earliest start, latest end).

Data plane (the only traffic on the emulated network): one TCP connection per
(prefill, decode) pair, kept open and reused (tensor parallelism: per pair and
rank, from rank i's host to rank i's listener).  Each KV transfer is a 14-byte
header ``!4sHQ`` (magic ``b"NKV1"``, request-id length, payload length) then
the request id (UTF-8) then ``payload length`` bytes of KV payload.
"""

from __future__ import annotations

import json
import struct
from typing import Any

CONTROL_SOCKET_NAME = "ctl.sock"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
KV_MAGIC = b"NKV1"
KV_HEADER = struct.Struct("!4sHQ")
MAX_LINE_BYTES = 16 * 1024 * 1024  # a control line (hash_ids of a 1M-token prompt fit easily)


class ProtocolError(ValueError):
    """A peer sent something this protocol does not allow."""


def encode(msg: dict[str, Any]) -> bytes:
    return (json.dumps(msg, separators=(",", ":")) + "\n").encode()


def decode(line: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"control line is not JSON: {line[:80]!r} ({exc})") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise ProtocolError(f"control message without a type: {line[:80]!r}")
    return msg


def kv_header(request_id: str, payload_bytes: int) -> bytes:
    rid = request_id.encode()
    if len(rid) > 0xFFFF:
        raise ProtocolError(f"request id of {len(rid)} bytes is longer than 65535")
    return KV_HEADER.pack(KV_MAGIC, len(rid), payload_bytes) + rid


def parse_kv_header(raw: bytes) -> tuple[int, int]:
    """``(id_length, payload_bytes)`` of a 14-byte header."""
    magic, id_len, payload = KV_HEADER.unpack(raw)
    if magic != KV_MAGIC:
        raise ProtocolError(f"bad KV frame magic {magic!r}")
    return id_len, payload
