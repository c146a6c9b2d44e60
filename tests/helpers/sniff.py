"""Count the IPv4 packets from SRC to DST that cross one interface, with
scapy, for SECONDS; run where the interface is (a switch's namespace in the
per_switch mode):  python -m tests.helpers.sniff IFACE SRC DST SECONDS

Prints ``ready`` once the capture runs, then the count as its last line."""

from __future__ import annotations

import sys
import time


def main(argv: list[str]) -> int:
    iface, src, dst, seconds = argv[0], argv[1], argv[2], float(argv[3])
    from scapy.all import IP, AsyncSniffer  # type: ignore[attr-defined,import-untyped,unused-ignore]

    count = 0

    def on_packet(pkt: object) -> None:
        nonlocal count
        if IP in pkt and pkt[IP].src == src and pkt[IP].dst == dst:  # type: ignore[operator,index]
            count += 1

    sniffer = AsyncSniffer(iface=iface, prn=on_packet, store=False)
    sniffer.start()
    time.sleep(0.5)
    print("ready", flush=True)
    time.sleep(seconds)
    sniffer.stop()
    print(count, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
