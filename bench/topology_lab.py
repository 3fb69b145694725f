"""The chain across switches with oversubscribed uplinks: topology-aware order against name order.

    .venv/bin/python bench/topology_lab.py [--nodes 32] [--switches 4] [--link 100] [--uplink 100]
                                           [--size-mib 48] [--paced] [--quick]

Builds a lab (``ktopo``) of ``--switches`` switches chained by uplinks shaped to ``--uplink`` Mbit/s,
node links shaped to ``--link``, with node names **interleaved** over the switches (node-1 on sw1,
node-2 on sw2, ...: ``LabPlan(interleave=True)``), so that name order zigzags between switches. The
server (10.77.0.1) sits on sw1. In one run: the chain in kasched's order (by switch, then name: each
uplink crossed once), then the same nodes in name order (``ordered=False``), where every hop may cross
one or more uplinks, each carrying the stream several times. Prints each time, E = (size / time) / link
rate and the ratio, then ``RATIO`` lines. With ``--paced``, the server's kernel sends at most the
link rate in both orders (``BroadcastOptions.source_rate``, the site setting ``broadcast_source_rate``).
Removes the lab at the end, also on failure.

The nodes boot the deployment system (a 23 MB initrd by TFTP) with uplinks at 10 Gbit/s, and the
links and uplinks are shaped to the rates asked only then: through a shaped uplink, 8 nodes' TFTP
boots at 10 Mbit/s outlasted the firmware's 120 s.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import labkit
from broadcast_lab import Bench, warm_up
from labkit import ratio_line

from kasched.lab.network import shape_node_links, shape_uplinks
from kasched.lab.system import inside_netns
from kasched.lab.topology import LabPlan
from kasched.transports.chain import BroadcastOptions, natural_key

LAB = "ktopo"


def measure(labrun: labkit.LabRun, size_mib: int, link: int, uplink: int, rounds: int, paced: bool) -> None:
    image = labrun.work / "image.bin"
    image.write_bytes(os.urandom(size_mib << 20))
    size, link_bytes = image.stat().st_size, link * 1e6 / 8
    plan = labrun.plan
    shape_node_links(plan, list(plan.nodes_list), f"{link}mbit")
    shape_uplinks(plan, f"{uplink}mbit")
    per_switch = plan.nodes / plan.switches
    print(f"image {size_mib} MiB, {plan.nodes} nodes on {plan.switches} switches (names interleaved), "
          f"links {link} Mbit/s, uplinks {uplink} Mbit/s (oversubscription {per_switch:.0f} x {link} Mbit/s"
          f" behind one {uplink} Mbit/s uplink){', server paced to the link rate' if paced else ''}\n",
          flush=True)  # fmt: skip
    options = BroadcastOptions(source_rate=link_bytes if paced else None)
    by_name = sorted(labrun.nodes, key=lambda n: natural_key(n["name"]))
    print("name order: " + " ".join(f"{n['name']}@{n['switch']}" for n in by_name[:8]) + " ...")
    best: dict[str, float] = {}
    with inside_netns(labrun.netns):
        bench = Bench(labrun, image, link)
        warm_up(bench, by_name)  # untimed: else the first order measured pays for the nodes' cold start
        for attempt in range(rounds):
            for label, ordered in (("topology-aware", True), ("name order", False)):
                phases = bench.chain(by_name, options, ordered=ordered)
                print(f"round {attempt + 1} {label:<15} {phases['total']:7.2f} s  "
                      f"E {size / phases['total'] / link_bytes:.2f}"
                      f"  (startup {phases['startup']:.2f} s, stream {phases['stream']:.2f} s, "
                      f"E stream {size / phases['stream'] / link_bytes:.2f})", flush=True)  # fmt: skip
                best[label] = min(best.get(label, float("inf")), phases["total"])
        bench.server.shutdown()
    topo, named = best["topology-aware"], best["name order"]
    print(f"\nbest of {rounds}: topology-aware {topo:.2f} s, name order {named:.2f} s")
    print(ratio_line("topology-aware E", size / topo / link_bytes))
    print(ratio_line("name-order E", size / named / link_bytes))
    print(ratio_line("name-order/topology-aware time", named / topo), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--switches", type=int, default=4)
    parser.add_argument("--link", type=int, default=100, help="node link rate, Mbit/s")
    parser.add_argument("--uplink", type=int, default=100, help="uplink rate between switches, Mbit/s")
    parser.add_argument("--size-mib", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--paced", action="store_true", help="the server sends at most the link rate (both orders)")
    parser.add_argument("--quick", action="store_true", help="4 nodes on 2 switches, 8 MiB: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.switches, args.size_mib = 4, 2, 8
    name = LAB + ("q" if args.quick else "")  # smoke runs never touch a full run's lab
    if min(args.link, args.uplink, args.size_mib, args.rounds, args.nodes, args.switches) <= 0:
        parser.error("--nodes, --switches, --link, --uplink, --size-mib, --rounds: more than 0")
    # booted unshaped behind the switches (see above), shaped to the rates asked in measure()
    plan = LabPlan(name, nodes=args.nodes, switches=args.switches, link=f"{args.link}mbit",
                   uplink="10gbit", interleave=True)  # fmt: skip
    with labkit.lab_up(plan) as labrun:
        measure(labrun, args.size_mib, args.link, args.uplink, args.rounds, args.paced)
    return 0


if __name__ == "__main__":
    sys.exit(main())
