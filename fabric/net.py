"""Bring-up and teardown of one emulated fabric.

``Testbed(config).up()`` does, in order (each step timed):

1. validate the configuration and the machine (root, commands, Open vSwitch
   running or startable, datapath, free loopback ports, prefix not in use);
2. record itself in ``/run/netkv/<prefix>/state.json`` so that a crash at any
   later point can be swept (:mod:`fabric.cleanup`);
3. start the controller (``python -m controller``) on 127.0.0.1;
4. build the topology in Mininet: one namespace per GPU host, one Open vSwitch
   bridge per switch, one veth pair per link with explicit port numbers.  On
   the userspace datapath every switch is by default its own ``ovs-vswitchd``
   in its own namespace (:mod:`fabric.switches`, ``switch_mode``); with
   ``switch_mode=shared`` (and on the kernel datapath) the machine's one
   Open vSwitch serves every bridge;
5. tune every interface: MTU, htb shaping at the emulated rate on both ends
   (:mod:`fabric.shaping`), offloads off on the userspace datapath, IPv6 off,
   slow start after idle off and static ARP inside every host;
6. wait until the controller has installed and confirmed every switch's routes;
7. check reachability between GPU hosts at every tier distance.

``down()`` is :func:`fabric.cleanup.sweep` for this prefix, so a normal stop,
an exception during bring-up, Ctrl-C and ``netkv down`` from another terminal
all remove the same things.

Faults applied to a running fabric (links down and up, re-rated, switches and
the controller killed and started again) are :mod:`fabric.faults`; its checks
(reachability, flow tables) are :mod:`fabric.verify`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

from controller.client import ControllerClient, loopback_url
from fabric import cleanup, remote, shaping, switches, system
from fabric.config import TestbedConfig, emulated_mbps
from fabric.system import BringUpError
from fabric.verify import verify_reachability
from netkv.repo import REPO_ROOT, child_env
from topologies import Link, Topology

LOG = logging.getLogger("netkv.testbed")
DATA_PORT = 7000  # the port every worker listens on inside its host namespace


@dataclass
class BringUpReport:
    topology: str
    gpus: int
    switches: int
    links: int
    datapath: str
    scale: float
    switch_mode: str = ""
    switch_processes: int = 0
    up_s: float = 0.0
    verify_s: float = 0.0
    steps_s: dict[str, float] = field(default_factory=dict)
    pings_ok: int = 0
    pings_total: int = 0
    pings_by_tier: dict[int, int] = field(default_factory=dict)
    failed_pairs: list[tuple[str, str]] = field(default_factory=list)
    tcp_congestion: str = ""
    # a testbed on several servers: the preflight of every server, where each
    # pod runs, and every link that crosses machines (tunnel, MTU, shaped rate)
    servers: dict[str, Any] | None = None
    placement: list[dict[str, Any]] | None = None
    crossing_links: list[dict[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        for key in ("servers", "placement", "crossing_links"):
            if out[key] is None:
                del out[key]  # one machine: the report as it always was
        return out


class Testbed:
    """One emulated fabric.  Use as a context manager or call up()/down()."""

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, config: TestbedConfig, server_check: Any = None) -> None:
        """``server_check``: a passed ``fabric.cluster.ClusterCheck`` of the
        servers (a testbed on several), so that the preflight does not ask again."""
        self.config = config
        self.server_check = server_check
        self.topo: Topology = config.validate()
        self.prefix = config.prefix
        self.net: Any = None  # mininet.net.Mininet once built
        self.controller: subprocess.Popen[bytes] | None = None
        self.datapath = ""
        self.switch_mode = ""  # 'per_switch' or 'shared' once preflight has chosen
        self.switch_pids: dict[str, int] = {}  # per_switch: ovs-vswitchd pid of each switch
        self.run_dir = cleanup.state_dir(self.prefix)
        # Past one machine (fabric/remote.py): which server runs each node; on
        # one machine every node is local and every command runs unchanged.
        self.sites = remote.Sites(config.cluster_plan(self.topo), self.run_dir)
        self.relays: dict[str, subprocess.Popen[bytes]] = {}  # worker -> its OpenFlow relay's ssh session
        self.worker_sessions: remote.WorkerSessions | None = None  # a replay's workers on other servers
        self.report = BringUpReport(self.topo.name, len(self.topo.gpus), len(self.topo.switches),
                                    len(self.topo.links), "", config.scale)
        self._ctl_log: Any = None
        # Links re-rated away from the topology's rate (Link.key -> real
        # Gbit/s): told to the controller, and again after it restarts.
        self.link_rates_gbps: dict[tuple[str, str], float] = {}
        # True once preflight found the prefix free: from then on this object
        # owns everything named with it, and only then may down() sweep it.
        self.owns_prefix = False

    # -- names --------------------------------------------------------------
    def mn_name(self, node: str) -> str:
        return self.prefix + node

    def intf(self, node: str, port: int) -> str:
        return f"{self.prefix}{node}-eth{port}"

    def host(self, name: str) -> Any:
        return self.net.get(self.mn_name(name))

    def host_pid(self, name: str) -> int:
        return int(self.host(name).pid)

    @property
    def rest_url(self) -> str:
        return loopback_url(self.config.rest_port)

    @property
    def api(self) -> ControllerClient:
        return ControllerClient(self.rest_url)

    def emulated_mbps(self, link: Link) -> float:
        return emulated_mbps(link.rate_gbps, self.config.scale)

    def data_addr(self, name: str) -> tuple[str, int]:
        return self.topo.ip_of(name), DATA_PORT

    def in_host(self, name: str, argv: Sequence[str]) -> list[str]:
        """argv that runs a command inside a node's namespaces (a GPU host, or
        a switch of the per_switch mode)."""
        return self.sites.on(name, ["mnexec", "-a", str(self.host_pid(name)), *argv])

    def in_switch(self, name: str, argv: Sequence[str]) -> list[str]:
        """argv that runs a command where a switch's interfaces are: its own
        namespace (per_switch) or the root namespace (shared)."""
        if self.per_switch:
            return self.sites.on(name, ["ip", "netns", "exec", switches.netns_name(self.prefix, name), *argv])
        return list(argv)

    @property
    def per_switch(self) -> bool:
        return self.switch_mode == "per_switch"

    def switch_paths(self, name: str) -> switches.SwitchPaths:
        return switches.paths_of(self.run_dir, name)

    def switch_processes(self) -> dict[str, int]:
        """The ovs-vswitchd process(es) forwarding this fabric: one per switch
        (per_switch), or the machine's shared one under the name ``shared``."""
        if self.per_switch:  # the ones on this machine (a switch on another server is not sampled here)
            return {n: pid for n, pid in self.switch_pids.items() if self.sites.is_local(n)}
        pid = switches.read_pid(system.OVS_PIDFILE)
        return {"shared": pid} if pid is not None else {}

    def dead_switches(self) -> list[str]:
        """Switches whose ovs-vswitchd is no longer running (per_switch mode)."""
        return sorted(name for name, pid in self.switch_pids.items()
                      if self.sites.is_local(name) and not switches.vswitchd_alive(pid))

    def appctl(self, switch: str, *command: str) -> str:
        """``ovs-appctl`` to the process that serves ``switch`` (its stdout)."""
        argv = (switches.appctl_argv(self.switch_paths(switch), *command) if self.per_switch
                else ["ovs-appctl", *command])
        return system.run(self.sites.on(switch, argv), check=False).stdout

    def popen(self, name: str, argv: Sequence[str], *, kind: str, marker: str | None = None,
              **popen_args: Any) -> subprocess.Popen[bytes]:
        """Start a process inside a GPU host and record its pid for cleanup.

        On another server the process runs there in a worker session
        (:class:`fabric.remote.WorkerSessions`) from the checkout, with the
        worker environment; ``popen_args`` then apply to the local ssh (its
        ``cwd`` and ``env`` describe this machine and are left out), and the
        pid recorded and returned is that ssh's: ending it ends the process."""
        server = self.sites.server_of(name)
        if server is None:
            proc: subprocess.Popen[bytes] = self.host(name).popen(list(argv), **popen_args)
        else:
            if self.worker_sessions is None:
                self.worker_sessions = remote.WorkerSessions(self.run_dir)
            local = self.worker_sessions.argv(server, self.host_pid(name), argv)
            popen_args = {k: v for k, v in popen_args.items() if k not in ("cwd", "env")}
            proc = subprocess.Popen(local, start_new_session=True, **popen_args)
        cleanup.record_pid(self.prefix, proc.pid, marker or os.path.basename(argv[0]), kind)
        return proc

    # -- lifecycle ------------------------------------------------------------
    def __enter__(self) -> "Testbed":
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self, *, verify: bool = True) -> BringUpReport:
        t0 = time.monotonic()
        steps = self.report.steps_s
        self._preflight()
        self.owns_prefix = True
        steps["preflight"] = time.monotonic() - t0
        try:
            self.write_state()
            t = time.monotonic()
            self.start_controller()
            if self.sites.cluster:
                self.start_relays()
            steps["controller"] = time.monotonic() - t
            t = time.monotonic()
            self._build()
            steps["build"] = time.monotonic() - t
            t = time.monotonic()
            self._tune()
            steps["tune"] = time.monotonic() - t
            t = time.monotonic()
            self.wait_routes()
            steps["routes"] = time.monotonic() - t
            self.report.up_s = time.monotonic() - t0
            if verify:
                t = time.monotonic()
                verify_reachability(self)
                self.report.verify_s = time.monotonic() - t
        except BaseException:
            self.down()
            raise
        return self.report

    def down(self) -> cleanup.Leftovers:
        """Remove everything this instance created (safe to call twice).

        An instance that never got past preflight owns nothing and removes
        nothing: the prefix may belong to another running testbed."""
        if not self.owns_prefix:
            return cleanup.Leftovers()
        if self._ctl_log is not None:
            self._ctl_log.close()
            self._ctl_log = None
        remote_left = remote.sweep_workers(self.prefix, self.sites.workers, self.run_dir) if self.sites.cluster else {}
        left = cleanup.sweep(self.prefix)
        left.servers.update(remote_left)
        if self.sites.cluster:
            remote.remove_mce_dir()
        if self.controller is not None:
            try:
                self.controller.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self.controller = None
        self.net = None
        return left

    # -- steps ----------------------------------------------------------------
    def _preflight(self) -> None:
        system.require_root()
        system.require_binaries()
        if self.sites.cluster:
            self._preflight_servers()
        if self.config.switch_mode == "per_switch" or self.sites.cluster:  # across servers: per_switch only
            self.datapath = "user"
        else:
            self.datapath = system.choose_datapath(self.config.datapath)
        self.switch_mode = switches.resolve_mode(self.config.switch_mode, self.datapath)
        if self.per_switch:
            system.require_binaries(switches.SWITCH_BINARIES)
            if not switches.OVS_SCHEMA.exists():
                raise system.PreflightError(f"the Open vSwitch schema {switches.OVS_SCHEMA} is missing; "
                                            f"run the install script")
            try:
                switches.check_socket_paths(self.run_dir, [self.mn_name(sw.name) for sw in self.topo.switches])
            except ValueError as exc:
                raise system.PreflightError(str(exc)) from None
        else:
            system.ensure_ovs()
        self.report.datapath = "kernel" if self.datapath == "kernel" else "userspace"
        self.report.switch_mode = self.switch_mode
        left = cleanup.leftovers(self.prefix)
        if left.total:
            owner = (cleanup.read_state(self.prefix) or {}).get("owner_pid")
            if isinstance(owner, int) and system.process_alive(owner):
                raise BringUpError(f"a testbed with prefix {self.prefix!r} is already up (pid {owner}); "
                                   f"stop it with `netkv down --prefix {self.prefix}` or use another --prefix")
            raise BringUpError(f"prefix {self.prefix!r} has leftovers of an earlier run "
                               f"({left.total} objects); remove them with `netkv clean --prefix {self.prefix}`")
        if self.config.link_delay_ms > 0 and not system.netem_available(self.prefix):
            raise system.PreflightError(
                f"link_delay_ms={self.config.link_delay_ms:g} needs the netem qdisc, which this kernel lacks "
                f"(CONFIG_NET_SCH_NETEM); use link_delay_ms=0 here, or the Vagrant VM")
        system.require_ports_free(self.config.of_port, self.config.rest_port)
        available = system.tcp_congestion_controls()
        self.report.tcp_congestion = self.config.tcp_congestion or system.default_tcp_congestion()
        if self.config.tcp_congestion and available and self.config.tcp_congestion not in available:
            raise BringUpError(f"TCP congestion control {self.config.tcp_congestion!r} is not available on this "
                               f"kernel; available: {', '.join(available)}")
        if system.ip_forward_enabled():
            LOG.warning("net.ipv4.ip_forward is 1 in the root namespace: emulated frames seen by its "
                        "kernel could be routed out; the testbed itself never enables it")

    def _preflight_servers(self) -> None:
        """A testbed on several servers: every server ready (ssh as root with a
        key, the same commit, Open vSwitch, the clock offset known), the switch
        processes one per switch (the mode the bring-up across servers
        supports), and the prefix free on every other server too."""
        from fabric import cluster

        if self.config.switch_mode == "shared" or self.config.datapath == "kernel":
            raise system.PreflightError("a testbed on several servers runs one switch process per switch on the "
                                        "userspace datapath (switch_mode per_switch or auto, datapath user or "
                                        "auto); the shared switch and the kernel datapath are not supported "
                                        "across servers")
        # the clock offsets are measured and reported; their bound is a replay's (fabric.cluster)
        result = (self.server_check if self.server_check is not None
                  else cluster.check_servers(self.sites.servers, bound_s=None))
        self.report.servers = result.to_json()
        assert self.sites.plan is not None
        plan_json = self.sites.plan.to_json(self.topo)
        self.report.placement, self.report.crossing_links = plan_json["placement"], plan_json["crossing_links"]
        if not result.ok:
            raise system.PreflightError(result.problem_line())
        for server in self.sites.workers:
            status = cluster.run_command(self.sites.on_server(server, remote.status_argv(self.prefix)), 60.0)
            left = remote.leftovers_total(status.stdout)
            if left is None:
                raise BringUpError(f"{server.label}: cannot read the state of prefix {self.prefix!r} there "
                                   f"({status.first_line()})")
            if left:
                raise BringUpError(f"prefix {self.prefix!r} has {left} leftover objects on {server.label}; remove "
                                   f"them with `netkv clean --prefix {self.prefix} --servers ...` or use another "
                                   f"--prefix")

    def write_state(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "prefix": self.prefix,
            "owner_pid": os.getpid(),
            "owner_cmdline": " ".join(sys.argv),
            "started_s": time.time(),
            "config": self.config.to_json(),
            "rest_port": self.config.rest_port,
            "datapath": self.report.datapath,
            "switch_mode": self.switch_mode,
        }
        if self.switch_pids:
            state["switch_pids"] = dict(self.switch_pids)
        if self.controller is not None:
            state["controller_pid"] = self.controller.pid
        if self.net is not None:
            state["node_pids"] = {n.name: n.pid for n in self.net.hosts + self.net.switches
                                  + self.net.controllers if getattr(n, "pid", None)}
        cleanup.write_state(self.prefix, state)

    def _controller_argv(self) -> list[str]:
        argv = [sys.executable, "-m", "controller", "--topology", self.config.topology,
                "--scale", repr(float(self.config.scale)),
                "--of-port", str(self.config.of_port), "--rest-port", str(self.config.rest_port),
                *(["--of-host", self.sites.head.address, "--of-mgmt", "--netns-switches",
                   ",".join(sw.name for sw in self.topo.switches if self.sites.is_local(sw.name))]
                  if self.sites.head is not None else []),
                "--poll-interval-s", repr(float(self.config.poll_interval_s)),
                "--prefix", self.prefix]
        if self.per_switch:
            argv += ["--of-unix", str(switches.controller_socket(self.run_dir)), "--switch-netns"]
        for key, value in sorted(self.config.params.items()):
            argv += ["--param", f"{key}={value}"]
        return argv

    def start_controller(self) -> None:
        log_path = self.run_dir / "controller.log"
        if self._ctl_log is not None:
            self._ctl_log.close()
        # a restart (fault event) appends to the first controller's log
        self._ctl_log = open(log_path, "ab" if self.controller is not None else "wb")
        self.controller = subprocess.Popen(self._controller_argv(), stdout=self._ctl_log,
                                           stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
                                           env=child_env(), start_new_session=True)
        self.write_state()

        def api_up() -> bool:
            if self.controller is None or self.controller.poll() is not None:
                return True
            return self.rest_get("/status") is not None

        # os-ken's imports take a few seconds here; under software emulation (scripts/vm-check's
        # qemu guest) ten times that, so a longer configured ready timeout also bounds this wait.
        api_timeout_s = max(30.0, self.config.ready_timeout_s)
        system.wait_until(api_up, timeout_s=api_timeout_s)
        if self.controller.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise BringUpError(f"the controller exited during start-up: {tail[0]} (log: {log_path})")
        if self.rest_get("/status") is None:
            raise BringUpError(f"the controller's API did not answer on {self.rest_url} within {api_timeout_s:.0f} s "
                               f"(log: {log_path})")
        for key, rate_gbps in sorted(self.link_rates_gbps.items()):  # a restarted controller learns them again
            self.tell_controller_rate(key, rate_gbps)

    def rest_post(self, path: str, body: Any, timeout_s: float = 2.0) -> Any:
        """POST ``body`` as JSON to the controller; the answer, or None if it
        did not accept it (down, or a 4xx)."""
        return self.api.post(path, body, timeout_s=timeout_s)

    def rest_get(self, path: str, timeout_s: float = 2.0) -> Any:
        """GET from the controller; the answer, or None when it is down."""
        return self.api.get(path, timeout_s=timeout_s)

    def _build(self) -> None:
        if not self.sites.cluster:
            self._build_net()
            return
        try:
            self._build_net()
        except (BringUpError, system.PreflightError):
            raise
        except Exception as exc:  # MCE raises bare Exceptions (a tunnel it could not make, ...): one line
            text = " ".join(str(exc).split())
            raise BringUpError(f"Mininet Cluster Edition: {text[:400]}") from None

    def _build_net(self) -> None:
        from mininet.link import Link as MnLink
        from mininet.log import setLogLevel
        from mininet.net import Mininet
        from mininet.node import OVSSwitch, RemoteController

        setLogLevel("error")
        common = dict(topo=None, build=False, controller=None, autoSetMacs=False, autoStaticArp=False,
                      ipBase="10.0.0.0/16", waitConnected=False)
        where: Callable[[str], dict[str, Any]] = lambda node: {}
        crossing: dict[tuple[str, str], int] = {}
        gre_link: Any = None
        if self.sites.cluster:  # Mininet Cluster Edition: every node on the server the plan gives it
            mce = remote.mce()
            head = self.sites.head
            assert head is not None and self.sites.plan is not None
            servers = ["localhost", *(w.address for w in self.sites.workers)]
            net = mce["net"](switch=mce["switch"], host=mce["host"], link=mce["link"], servers=servers,
                             serverIP={"localhost": head.address, **{w.address: w.address for w in self.sites.workers}},
                             user="root", precheck=False, **common)

            def where(node: str) -> dict[str, Any]:
                server = self.sites.server_of(node)
                # user root on every node: MCE would otherwise take SUDO_USER (ssh as the user
                # who ran sudo), while the preflight checked root's key
                return ({"server": "localhost", "serverIP": head.address, "user": "root"} if server is None
                        else {"server": server.address, "serverIP": server.address, "user": "root"})

            crossing = {(c.lower, c.upper): c.gre_key for c in self.sites.plan.crossing}
            gre_link = mce["gre_link"]
        else:
            if self.per_switch:
                switch_cls: Any = switches.isolated_switch_class()
            else:
                switch_cls = partial(OVSSwitch, datapath=self.datapath, protocols="OpenFlow13",
                                     failMode="secure", batch=True)
            net = Mininet(switch=switch_cls, link=MnLink, **common)
        self.net = net
        if not self.per_switch:  # per_switch: each instance is told the controller's Unix socket itself
            net.addController(self.mn_name("ctl"), controller=RemoteController, ip="127.0.0.1",
                              port=self.config.of_port)
        for node in self.topo.nodes.values():
            if node.is_gpu:
                net.addHost(self.mn_name(node.name), ip=f"{self.topo.ip_of(node.name)}/16",
                            mac=self.topo.mac_of(node.name), **where(node.name))
            else:
                net.addSwitch(self.mn_name(node.name), dpid=f"{node.dpid:016x}", **where(node.name))
        self.write_state()  # node shells exist from here on
        for link in self.topo.links:
            key = crossing.get((link.a, link.b))
            if key is not None:  # a gretap tunnel; MCE numbers its keys with a class counter: give ours
                gre_link.GRE_KEY = key - 1
                net.addLink(self.mn_name(link.a), self.mn_name(link.b), port1=link.a_port, port2=link.b_port,
                            cls=gre_link)
            else:
                net.addLink(self.mn_name(link.a), self.mn_name(link.b), port1=link.a_port, port2=link.b_port)
        net.start()
        self.write_state()
        if self.per_switch:
            self._start_switch_instances()

    def _start_switch_instances(self) -> None:
        """One ovsdb-server and one ovs-vswitchd per switch, inside the switch's
        namespace, all switches in parallel (see fabric.switches)."""
        target = f"unix:{switches.controller_socket(self.run_dir)}"
        jemalloc = self.config.switch_jemalloc

        def start_one(name: str) -> int:
            """The switch's daemons where it lives: the same commands on any
            server (on the head they run as they are, elsewhere over ssh)."""
            sw = self.topo.node(name)
            p = self.switch_paths(name)
            own = switches.daemon_vars(p, jemalloc=jemalloc)
            on = partial(self.sites.on, name)
            system.run(on(["mkdir", "-p", str(p.root)]))
            system.run(on(["ip", "netns", "attach", switches.netns_name(self.prefix, name), str(self.host_pid(name))]))
            system.run(on(switches.ovsdb_create_argv(p)))
            system.run(on(switches.ovsdb_server_argv(p), own))
            system.run(on(switches.bridge_config_argv(p, self.mn_name(name), sw.dpid, self.switch_ports(name), target)))
            system.run(on(switches.vswitchd_argv(p, switches.netns_name(self.prefix, name)), own))
            text = system.run(on(["cat", str(p.vswitchd_pidfile)]), check=False).stdout.strip()
            if not text.isdigit():
                server = self.sites.server_of(name)
                where = "" if server is None else f" on {server.label}"
                raise BringUpError(f"ovs-vswitchd of {name} wrote no pid file (log{where}: "
                                   f"{p.log('ovs-vswitchd')})")
            return int(text)

        names = [sw.name for sw in self.topo.switches]
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = {name: pool.submit(start_one, name) for name in names}
            errors = []
            for name, fut in futures.items():
                try:
                    self.switch_pids[name] = fut.result()
                except (RuntimeError, system.PreflightError) as exc:
                    errors.append(f"{name}: {exc}")
        self.write_state()
        if errors:
            raise BringUpError(f"{len(errors)} of {len(names)} switch instances failed to start; first: "
                               f"{errors[0][:400]}")
        self.report.switch_processes = len(self.switch_pids)

    def _tune(self) -> None:
        cfg = self.config
        mtu = cfg.mtu_bytes
        host_ifs: dict[str, list[tuple[str, float]]] = {}
        switch_ifs: dict[str, list[tuple[str, float]]] = {}
        for link in self.topo.links:
            mbps = self.emulated_mbps(link)
            for node in (link.a, link.b):
                ifname = self.intf(node, link.port_of(node))
                side = host_ifs if self.topo.node(node).is_gpu else switch_ifs
                side.setdefault(node, []).append((ifname, mbps))
        commands: list[list[str]] = []
        inputs: list[str | None] = []

        def configure_switch_ends(ifs: list[tuple[str, float]], where: Callable[[list[str]], list[str]]) -> None:
            """Switch ends: MTU, shaping, IPv6 off, offloads off.  No address is
            ever put on a switch port."""
            commands.append(where(["ip", "-batch", "-"]))
            inputs.append("".join(f"link set dev {i} mtu {mtu} up\n" for i, _ in ifs))
            commands.append(where(["tc", "-batch", "-"]))
            inputs.append("".join(line + "\n" for i, mbps in ifs for line in
                                  shaping.tc_batch_lines(i, mbps, mtu, cfg.queue_packets, cfg.link_delay_ms)))
            commands.append(where(["sysctl", "-q", "-w", *(f"net.ipv6.conf.{i}.disable_ipv6=1" for i, _ in ifs)]))
            inputs.append(None)
            if self.datapath == "user":
                for i, _ in ifs:
                    commands.append(where(shaping.ethtool_offloads_off(i)))
                    inputs.append(None)

        if self.per_switch:  # every switch's ends in its own namespace
            for name, ifs in switch_ifs.items():
                configure_switch_ends(ifs, partial(self.in_host, name))
        else:  # the root namespace holds every switch end
            configure_switch_ends([x for ifs in switch_ifs.values() for x in ifs], list)
        # Host namespaces.
        for name, ifs in host_ifs.items():
            commands.append(self.in_host(name, ["sysctl", "-q", "-w", *shaping.host_sysctls(cfg.tcp_congestion)]))
            inputs.append(None)
            commands.append(self.in_host(name, ["ip", "-batch", "-"]))
            inputs.append("\n".join(self.host_ip_lines(name, [i for i, _ in ifs])) + "\n")
            tc_lines = [l for ifname, mbps in ifs
                        for l in shaping.tc_batch_lines(ifname, mbps, mtu, cfg.queue_packets, cfg.link_delay_ms)]
            commands.append(self.in_host(name, ["tc", "-batch", "-"]))
            inputs.append("\n".join(tc_lines) + "\n")
            if self.datapath == "user":
                for ifname, _ in ifs:
                    commands.append(self.in_host(name, shaping.ethtool_offloads_off(ifname)))
                    inputs.append(None)
        system.check_all(system.run_many(commands, inputs=inputs, workers=self.parallel), "configuring the GPU hosts")

    def host_ip_lines(self, name: str, ifnames: list[str]) -> list[str]:
        """``ip -batch`` lines of a GPU host: its links up at the MTU, static
        ARP for every other GPU and the fabric route (also after a link_up: a
        link set down loses its routes and neighbours)."""
        lines = [f"link set dev {ifname} mtu {self.config.mtu_bytes} up" for ifname in ifnames]
        lines += [f"neigh replace {self.topo.ip_of(g.name)} lladdr {self.topo.mac_of(g.name)} "
                  f"nud permanent dev {ifnames[0]}" for g in self.topo.gpus if g.name != name]
        lines.append(shaping.fabric_route(ifnames[0], self.topo.ip_of(name)))
        return lines

    def switch_ports(self, name: str) -> list[tuple[str, int]]:
        """(interface, OpenFlow port) of every port of the switch ``name``."""
        return [(self.intf(name, link.port_of(name)), link.port_of(name)) for link in self.topo.links_of(name)]

    @property
    def parallel(self) -> int:
        """Commands run at once: over ssh, below sshd's sessions per connection."""
        return remote.SESSIONS_PER_SERVER if self.sites.cluster else 16

    def start_relays(self) -> None:
        """On every other server, the OpenFlow relay its switch processes
        connect to (their Unix socket there -> the controller on the head's
        management address), over an ``ssh -tt`` session of its own: ending
        that session (teardown, or this process dying) ends the relay."""
        head = self.sites.head
        assert head is not None
        sock = switches.controller_socket(self.run_dir)
        for server in self.sites.workers:
            system.run(self.sites.on_server(server, ["mkdir", "-p", str(sock.parent)]))
            log = open(self.run_dir / f"relay-{server.name}.log", "wb")
            argv = remote.ssh_mux_argv(server, self.run_dir, remote.relay_argv(self.run_dir, head, self.config.of_port),
                                       tty=True)
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            log.close()
            cleanup.record_pid(self.prefix, proc.pid, "controller.relay", "relay")
            self.relays[server.name] = proc

            def listening(server: Any = server, proc: subprocess.Popen[bytes] = proc) -> bool:
                if proc.poll() is not None:
                    return True
                return system.run(self.sites.on_server(server, ["test", "-S", str(sock)]), check=False).returncode == 0

            system.wait_until(listening, timeout_s=60, interval_s=0.5)
            if proc.poll() is not None:
                raise BringUpError(f"the OpenFlow relay on {server.label} exited (log: "
                                   f"{self.run_dir / f'relay-{server.name}.log'})")

    def tell_controller_rate(self, key: tuple[str, str], rate_gbps: float) -> float | None:
        if self.controller is None or self.controller.poll() is not None:
            return None
        answer = self.rest_post(f"/links/{key[0]}/{key[1]}", {"rate_gbps": rate_gbps})
        return None if answer is None else float(answer["rate_gbps"])

    def wait_routes(self) -> None:
        status: dict[str, Any] = {}

        def ready() -> bool:
            nonlocal status
            if self.controller is not None and self.controller.poll() is not None:
                raise BringUpError("the controller exited; see " + str(self.run_dir / "controller.log"))
            status = self.rest_get("/status") or {}
            return bool(status.get("ready"))

        if not system.wait_until(ready, timeout_s=self.config.ready_timeout_s, interval_s=0.2):
            raise BringUpError(
                f"routes not installed within {self.config.ready_timeout_s:.0f} s: "
                f"{status.get('switches_ready', 0)} of {status.get('switches_expected', '?')} switches ready "
                f"(controller log: {self.run_dir / 'controller.log'})")
