"""Start the NetKV controller: ``python -m controller --help``.

The testbed starts this process itself (``netkv up``); running it by hand is
for debugging.  The OpenFlow listener and the REST API bind loopback only.
"""

from __future__ import annotations

import argparse
import logging
import sys

import topologies
from topologies import TopologyError

from .client import DEFAULT_REST_PORT
from .relay import UnixRelay
from .rest import require_loopback, require_management_address, serve
from .state import ControllerState


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m controller", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", default=topologies.DEFAULT_TOPOLOGY, choices=topologies.names(),
                    help="topology to route (default: %(default)s)")
    ap.add_argument("--param", action="append", metavar="KEY=VALUE", default=[],
                    help="topology parameter, repeatable")
    ap.add_argument("--scale", type=float, required=True,
                    help="real bit/s per emulated bit/s, to report real-world link loads")
    ap.add_argument("--of-host", default="127.0.0.1",
                    help="OpenFlow listen address: loopback, or with --of-mgmt this machine's management address")
    ap.add_argument("--of-mgmt", action="store_true",
                    help="--of-host is the head's management address of a testbed on several servers (their "
                         "switches connect to it); one unicast IPv4 address of this machine, never 0.0.0.0")
    ap.add_argument("--netns-switches", metavar="NAME,...", default=None,
                    help="with --switch-netns: only these switches have their namespaces on this machine "
                         "(the others run on other servers; their egress queues are not read)")
    ap.add_argument("--of-port", type=int, default=6653, help="OpenFlow listen port")
    ap.add_argument("--of-unix", metavar="PATH", default=None,
                    help="also accept switches on this Unix socket, relayed to the OpenFlow listener "
                         "(for switch processes in their own network namespaces)")
    ap.add_argument("--switch-netns", action="store_true",
                    help="every switch has a network namespace named <prefix><switch>: read its "
                         "egress queues there")
    ap.add_argument("--rest-host", default="127.0.0.1", help="REST API listen address (loopback only)")
    ap.add_argument("--rest-port", type=int, default=DEFAULT_REST_PORT, help="REST API listen port")
    ap.add_argument("--poll-interval-s", type=float, default=0.5,
                    help="port-statistics polling interval in seconds (0.1 .. 60)")
    ap.add_argument("--prefix", default="nk",
                    help="the testbed instance's name prefix (bridges and interfaces carry it: switch t1's "
                         "port 3 is <prefix>t1-eth3); used to read egress queues (default %(default)s)")
    ap.add_argument("--history-len", type=int, default=600,
                    help="samples kept per directed link (ring buffer, %(default)s)")
    ap.add_argument("--queue-interval-s", type=float, default=1.0,
                    help="seconds between egress-queue reads with tc (0 = off; default %(default)s)")
    ap.add_argument("--verbose", action="store_true", help="debug logging")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.of_mgmt:
            require_management_address(args.of_host)
        else:
            require_loopback(args.of_host)
        require_loopback(args.rest_host)
        topo = topologies.build(args.topology, topologies.parse_params(args.param))
        if args.prefix is not None and not (args.prefix.isalnum() and args.prefix.islower() and len(args.prefix) <= 8):
            raise ValueError(f"--prefix must be 1..8 lowercase letters/digits, got {args.prefix!r}")
        if not (args.queue_interval_s == 0 or 0.05 <= args.queue_interval_s <= 60):
            raise ValueError(f"--queue-interval-s must be 0 or 0.05..60, got {args.queue_interval_s}")
        state = ControllerState(topo, scale=args.scale, poll_interval_s=args.poll_interval_s,
                                history_len=args.history_len, prefix=args.prefix)
    except (TopologyError, ValueError) as exc:
        print(f"controller: {exc}", file=sys.stderr)
        return 2

    from os_ken import cfg
    from os_ken.base.app_manager import AppManager
    import os_ken.controller.controller  # noqa: F401 - registers the ofp-* options

    from . import app

    cfg.CONF(args=["--ofp-listen-host", args.of_host, "--ofp-tcp-listen-port", str(args.of_port)],
             project="os_ken")
    app.RUNTIME = state
    app.QUEUE_INTERVAL_S = args.queue_interval_s
    if args.switch_netns:
        local = None if args.netns_switches is None else set(args.netns_switches.split(","))
        app.QUEUE_NETNS = tuple(args.prefix + sw.name for sw in topo.switches if local is None or sw.name in local)
    try:
        server = serve(state, args.rest_host, args.rest_port)
    except OSError as exc:
        print(f"controller: cannot listen on {args.rest_host}:{args.rest_port}: {exc}", file=sys.stderr)
        return 2
    relay = None
    if args.of_unix:
        try:
            relay = UnixRelay(args.of_unix, args.of_host, args.of_port).start()
        except OSError as exc:
            server.shutdown()
            print(f"controller: cannot listen on {args.of_unix}: {exc}", file=sys.stderr)
            return 2
    try:
        AppManager.run_apps(["controller.app"])
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        if relay is not None:
            relay.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
