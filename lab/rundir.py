"""The run directory's names, in one place: what `netkv run`, `netkv sweep`
and `netkv report` write and read back (docs/design.md, "Run directories")."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from netkv.repo import REPO_ROOT

TELEMETRY_SERIES = "telemetry.jsonl"  # per replay: the controller's link table at every poll
NETWORK_FILE = "network.json"  # per replay: TCP retransmissions and queue drops over it (lab.emulator)
WINDOW_DIR = re.compile(r"^w(\d+)-")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def window_dir_name(index: int, start_s: float) -> str:
    """Sub-run directory of one window of a campaign."""
    return f"w{index}-{start_s:g}s"


def window_runs(run: Path) -> list[Path]:
    """The windows' run directories of a campaign, in window order."""
    found = [(int(m.group(1)), p) for p in run.iterdir()
             if p.is_dir() and (m := WINDOW_DIR.match(p.name)) and (p / "experiment.json").is_file()]
    return [p for _, p in sorted(found)]


def default_out_dir(kind: str) -> Path:
    """runs/<time>-<kind> in the repository."""
    return REPO_ROOT / "runs" / (time.strftime("%Y%m%d-%H%M%S") + f"-{kind}")


# -- running -------------------------------------------------------------------------------
def provenance() -> dict[str, Any]:
    """Versions of what a run stands on, and the project's git commit."""
    def first_line(argv: list[str]) -> str | None:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=REPO_ROOT)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None

    def package(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    try:
        from mininet.net import VERSION as mininet_version
    except ImportError:
        mininet_version = None
    commit = first_line(["git", "rev-parse", "HEAD"])
    dirty = first_line(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "git_commit": commit,
        "git_dirty": None if commit is None else bool(dirty),
        "open_vswitch": first_line(["ovs-vswitchd", "--version"]),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "os_ken": package("os-ken"),
        "mininet": mininet_version,
        "iperf3": first_line(["iperf3", "--version"]),
        "recorded_epoch_s": round(time.time(), 3),
    }
