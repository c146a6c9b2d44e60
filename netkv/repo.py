"""Where the repository is, and how a child process of the testbed finds its code.

The project's data lives in the repository (traces/, scenarios/,
experiments/, the tuned weights), and every process the testbed starts (the
controller, the workers) runs this checkout's code: one definition of both.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    """Environment for a process the testbed starts: this one, with the
    repository first on PYTHONPATH (it imports this tree, from any working
    directory or network namespace) and unbuffered output (a killed process's
    log is complete)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env
