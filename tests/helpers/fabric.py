"""Helpers shared by the integration tests (root, real emulation)."""

from __future__ import annotations

from typing import Any, Iterator

from fabric.config import TestbedConfig
from fabric.net import Testbed
from tests.helpers.net import free_port, test_prefix


def running_testbed(suffix: str, topology: str = "tiny", **settings: Any) -> Iterator[Testbed]:
    """Body of a fixture: a testbed of its own prefix, up for the fixture's
    scope and swept afterwards, also when the tests fail."""
    bed = Testbed(TestbedConfig(topology=topology, prefix=test_prefix(suffix), of_port=free_port(),
                                rest_port=free_port(), **settings))
    bed.up()
    try:
        yield bed
    finally:
        bed.down()


def cross_pair(bed: Testbed, via: str) -> tuple[str, str]:
    """A cross-rack pair of the tiny fabric whose installed path crosses ``via``."""
    for src in ("g0", "g1"):
        for dst in ("g2", "g3"):
            if via in bed.topo.path(src, dst):
                return src, dst
    raise AssertionError(f"no g0/g1 -> g2/g3 pair crosses {via}")
