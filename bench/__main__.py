"""Benchmarks: ``python -m bench NAME [options]`` runs one and prints one JSON
object as its last line of output.  ``python -m bench`` lists them.

Each benchmark is a module ``bench/<name>.py`` with ``main(argv) -> int``.
Targets are checked here, by measuring, not by timed tests: the machines are
shared and noisy, so a benchmark reports its figures and whether each met its
target, and the numbers are read, not asserted.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)])
                  if not m.name.startswith("_") and m.name != "common")


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("benchmarks: " + ", ".join(names))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"bench: unknown benchmark {name!r}; known: {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    return int(module.main(rest))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
