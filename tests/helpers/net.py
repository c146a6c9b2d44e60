"""Loopback ports and the prefix of the emulated networks tests build."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_prefix(suffix: str = "") -> str:
    """Prefix of an emulated network a test builds: a two-letter base
    (NETKV_TEST_PREFIX, default "nt", so that two suites can share a machine)
    and a letter per network that stays up while others are built."""
    base = os.environ.get("NETKV_TEST_PREFIX", "nt")
    if len(base) != 2 or not base.isalpha() or not base.islower():
        raise ValueError(f"NETKV_TEST_PREFIX must be two lowercase letters, got {base!r}")
    return base + suffix


test_prefix.__test__ = False  # type: ignore[attr-defined]
