"""What both sides of a qemu guest check share: the shared directory's names,
one-line errors, commands run with their failures as errors, and reading the
JSON a side leaves behind."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from fabric.system import run as system_run

SHARE_TAG = "netkvjob"


GUEST_SHARE = "/mnt/netkvjob"


GUEST_REPO = "/vagrant"  # where the Vagrantfile's synced folder puts the repository


def say(text: str) -> None:
    print(f"vm-check: {text}", file=sys.stderr, flush=True)


class VmCheckError(RuntimeError):
    """The check cannot go on; one line for the user."""


def run(argv: Sequence[str], *, timeout_s: float = 3600, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """fabric.system.run on the host, with its failures as VmCheckError and a
    longer default timeout (image builds take many minutes)."""
    try:
        return system_run(argv, check=check, timeout_s=timeout_s, env=env)
    except RuntimeError as exc:  # PreflightError is one
        raise VmCheckError(str(exc)) from None


def tail(path: Path, lines: int = 20) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                if isinstance(data, dict):
                    return data
    return None
