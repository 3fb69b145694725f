"""The chain when one node dies mid-stream: time with the fault against time without, in one run.

    .venv/bin/python bench/fault_lab.py [--nodes 8] [--size-mib 48] [--link 100]
                                        [--faults kill,link,link-stall] [--stall-timeout 30]
                                        [--ack-timeout 3] [--quick]

Builds a lab (``kfault``) of ``--nodes`` nodes on one switch, links shaped to ``--link`` Mbit/s, and
broadcasts a random image with the chain: once with no fault, then once per fault, where a node in the
middle of the chain is hit when about 40 % of the no-fault stream time has passed:

* ``kill``: every process of the node's network namespace is SIGKILLed (sshd, the agent, its init:
  the node is gone, its kernel answers with resets);
* ``link``: the node's switch port is set down (a cable pulled, or the node powered off: no reset,
  its predecessor's sends just stop progressing), detected when what the predecessor sent stays
  unacknowledged for ``--ack-timeout`` seconds;
* ``link-stall``: the same with the ack timeout off (0), as before it existed: detected after
  ``--stall-timeout`` seconds without keepalives.

Prints each time (whole operation, and the stream alone), T / T(no fault), the nodes failed (only the
faulty one is expected), then ``RATIO`` lines. Removes the lab at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import labkit
from broadcast_lab import Bench
from labkit import ratio_line

from kasched.lab.system import inside_netns, netns_pids
from kasched.lab.topology import LabPlan
from kasched.transports.chain import BroadcastOptions

LAB = "kfault"


def fault_action(labrun: labkit.LabRun, kind: str, node: dict, delay: float) -> Callable[[], None]:
    """What hits ``node`` after ``delay`` seconds of stream."""
    plan_node = labrun.plan.node(node["name"])

    def hit() -> None:
        time.sleep(delay)
        if kind == "kill":
            for pid in netns_pids(plan_node.netns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        else:
            subprocess.run(["ip", "-n", labrun.netns, "link", "set", plan_node.lab_port, "down"], check=True)
        print(f"  {kind}: {node['name']} hit after {delay:.2f} s of stream", flush=True)

    return hit


def measure(labrun: labkit.LabRun, size_mib: int, link: int, faults: list[str], stall: float, ack: float) -> None:
    image = labrun.work / "image.bin"
    image.write_bytes(os.urandom(size_mib << 20))
    size, link_bytes = image.stat().st_size, link * 1e6 / 8
    options = BroadcastOptions(stall_timeout=stall, ack_timeout=ack)
    print(f"image {size_mib} MiB, {len(labrun.nodes)} nodes, links {link} Mbit/s, stall timeout {stall:g} s,"
          f" ack timeout {ack:g} s\n")  # fmt: skip
    victims = labrun.nodes[1:-1] or labrun.nodes  # middle nodes (never the tail), a new one per fault
    with inside_netns(labrun.netns):
        bench = Bench(labrun, image, link)
        base = bench.chain(labrun.nodes, options)
        print(f"no fault   {base['total']:7.2f} s (stream {base['stream']:.2f} s, "
              f"E {size / base['total'] / link_bytes:.2f})", flush=True)  # fmt: skip
        results = {}
        for index, kind in enumerate(faults):
            victim = victims[(len(victims) // 2 + index) % len(victims)]
            alive = [n for n in labrun.nodes if n is not victim and n["name"] not in results]
            hit = fault_action(labrun, kind, victim, 0.4 * base["stream"])
            run_options = replace(options, ack_timeout=0.0) if kind == "link-stall" else options
            phases = bench.chain([*alive, victim], run_options, during=hit)
            results[victim["name"]] = phases
            print(f"{kind:<10} {phases['total']:7.2f} s (stream {phases['stream']:.2f} s)  "
                  f"T/T(no fault) {phases['total'] / base['total']:.2f}, "
                  f"stream {phases['stream'] / base['stream']:.2f};"
                  f" nodes failed: {phases['failed']:.0f} (expected 1)", flush=True)  # fmt: skip
            print(ratio_line(f"{kind} T/T(no fault)", phases["total"] / base["total"]))
            print(ratio_line(f"{kind} stream T/T(no fault)", phases["stream"] / base["stream"]), flush=True)
        bench.server.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--size-mib", type=int, default=48)
    parser.add_argument("--link", type=int, default=100, help="node link rate, Mbit/s")
    parser.add_argument("--faults", default="kill,link,link-stall")
    parser.add_argument("--stall-timeout", type=float, default=BroadcastOptions.stall_timeout)
    parser.add_argument("--ack-timeout", type=float, default=BroadcastOptions.ack_timeout)
    parser.add_argument("--quick", action="store_true", help="4 nodes, 8 MiB, kill only: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.size_mib, args.faults = 4, 8, "kill"
    faults = [f for f in args.faults.split(",") if f]
    if not faults or set(faults) - {"kill", "link", "link-stall"}:
        parser.error("--faults: kill, link and/or link-stall")
    if args.stall_timeout <= 0 or args.ack_timeout < 0:
        parser.error("--stall-timeout: more than 0; --ack-timeout: 0 (off) or more")
    if args.nodes < 3 + len(faults) - 1:
        parser.error("--nodes: at least 3, plus one per extra fault")
    name = LAB + ("q" if args.quick else "")  # smoke runs never touch a full run's lab
    plan = LabPlan(name, nodes=args.nodes, switches=1, link=f"{args.link}mbit",
                   uplink="10gbit")
    with labkit.lab_up(plan) as labrun:
        measure(labrun, args.size_mib, args.link, faults, args.stall_timeout, args.ack_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
