"""The simulated network: SimGrid's flow-level TCP model over a topology.

The simulator engine's counterpart of :mod:`fabric` (the emulated network).
:mod:`sim.platform` builds a SimGrid platform from a
:class:`topologies.Topology` (one host per GPU, one split-duplex link per
topology link at its real rate, the controller's ECMP route per GPU pair) and
says what model and parameters it runs; :mod:`sim.network` moves bytes over
it on a simulated clock, keeps per-link byte counters and samples them into
:class:`netkv.telemetry.TelemetrySnapshot`; :mod:`sim.isolate` runs one
simulation in a process of its own (SimGrid keeps one engine per process).

Nothing above the network is here: the serving model is :mod:`netkv.serving`,
driven by :mod:`lab.simulator`.  SimGrid is imported only inside a simulation's
own process, so importing this package costs nothing and needs no SimGrid.
"""
