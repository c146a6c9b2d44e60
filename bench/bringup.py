"""Bring-up benchmark: build, verify and tear down the default 64-GPU fabric.

Prints one JSON object (last line): topology, gpus, switches, links, datapath,
up_s, verify_s, down_s, leftovers (bridges, interfaces, processes of the
testbed still present after teardown), per-step times, and the targets
(up and verified < 20 s, down < 10 s, no leftovers) with whether each was met.
With --repeat N the times are the median of N rounds and every round is listed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from fabric.config import TestbedConfig
from fabric.net import BringUpError, Testbed
from fabric.system import PreflightError

TARGETS = {"up_plus_verify_s": 20.0, "down_s": 10.0, "leftovers": 0}


def one_round(cfg: TestbedConfig) -> dict[str, object]:
    tb = Testbed(cfg)
    report = tb.up()
    t0 = time.monotonic()
    left = tb.down()
    down_s = time.monotonic() - t0
    return {"up_s": round(report.up_s, 3), "verify_s": round(report.verify_s, 3),
            "down_s": round(down_s, 3), "steps_s": {k: round(v, 3) for k, v in report.steps_s.items()},
            "pings": f"{report.pings_ok}/{report.pings_total}", "datapath": report.datapath,
            "switch_mode": report.switch_mode, "leftovers": left.as_dict()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench bringup", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", default="fattree")
    ap.add_argument("--repeat", type=int, default=1, help="rounds (median reported)")
    ap.add_argument("--prefix", default="nb", help="instance prefix for the benchmark's network")
    ap.add_argument("--of-port", type=int, default=16633)
    ap.add_argument("--rest-port", type=int, default=18088)
    ap.add_argument("--switch-mode", default=TestbedConfig.switch_mode,
                    help="auto, per_switch or shared (default: the testbed's, %(default)s)")
    args = ap.parse_args(argv)
    cfg = TestbedConfig(topology=args.topology, prefix=args.prefix, of_port=args.of_port,
                        rest_port=args.rest_port, switch_mode=args.switch_mode)
    try:
        topo = cfg.validate()
        rounds = [one_round(cfg) for _ in range(max(1, args.repeat))]
    except (BringUpError, PreflightError, ValueError) as exc:
        print(json.dumps({"bench": "bringup", "error": str(exc)}))
        return 1

    def median(key: str) -> float:
        return round(statistics.median(float(r[key]) for r in rounds), 3)  # type: ignore[arg-type]

    left = rounds[-1]["leftovers"]
    total_left = max(int(r["leftovers"]["total"]) for r in rounds)  # type: ignore[index]
    result = {
        "bench": "bringup",
        "topology": topo.name, "gpus": len(topo.gpus), "switches": len(topo.switches),
        "links": len(topo.links), "datapath": rounds[0]["datapath"], "switch_mode": rounds[0]["switch_mode"],
        "scale": cfg.scale,
        "up_s": median("up_s"), "verify_s": median("verify_s"), "down_s": median("down_s"),
        "leftovers": left, "rounds": rounds, "targets": TARGETS,
    }
    result["met"] = {
        "up_plus_verify_s": result["up_s"] + result["verify_s"] < TARGETS["up_plus_verify_s"],  # type: ignore[operator]
        "down_s": result["down_s"] < TARGETS["down_s"],  # type: ignore[operator]
        "leftovers": total_left == 0,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
