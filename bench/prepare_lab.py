"""The broadcast step's start: each node's partition prepared, then its agent started in a second SSH
session (as before), against both in one session, the agent starting while ``mkfs.ext4`` runs.

    .venv/bin/python bench/prepare_lab.py [--nodes 8,32] [--link 100] [--rounds 3] [--quick]

Builds a lab (``kprep``) of the largest ``--nodes`` count, boots the nodes into the deployment system,
then for each node count and round, the two ways in turn (so that the machine's load weighs on both):

* ``separate``: the deployment's preparation (``umount; mkfs.ext4 -F`` the deploy partition
  ``/dev/sda3``; ``mount`` it) through the transports' tree exec (``NodeShell.run_each``, window 32),
  then ``start_agents`` (window 32);
* ``together``: ``start_agents(prepare=...)``, the same command in the agent's session.

Each time runs until every agent said ready (and prepared), which is when the stream could start; then
a 1 MiB image goes through the chain into each node's mounted partition (a raw sink), so that the
agents end as in a deployment and the preparation is shown to have worked (every node's sha256 is
checked). Prints each round's times, the best of each way, then ``RATIO separate / together``.
Removes the lab at the end, also on failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import labkit
from labkit import ratio_line

from kasched.deploy.nodes import NodeShell, checked
from kasched.lab.system import inside_netns
from kasched.lab.topology import LabPlan
from kasched.transports.chain import BroadcastOptions, ChainNode, broadcast
from kasched.transports.chain_ssh import AgentLaunch, start_agents
from kasched.transports.ssh_session import SshAuth

LAB = "kprep"
PREPARE = "umount /mnt/kasched 2>/dev/null; mkfs.ext4 -q -F -L kasched /dev/sda3 && mkdir -p /mnt/kasched && " \
          "mount /dev/sda3 /mnt/kasched"  # fmt: skip
SINK = {"kind": "raw", "dest": "/mnt/kasched/image.bin"}
WINDOW = 32  # the deployment's (NodeShell and start_agents defaults)


class Start:
    """One way of getting the nodes ready, timed, then a small broadcast through the agents."""

    def __init__(self, labrun: labkit.LabRun, image: Path) -> None:
        self.labrun, self.image = labrun, image
        self.auth = SshAuth.from_key_file("root", str(labrun.key))
        self.shell = NodeShell(labrun.key, labrun.addresses, window=WINDOW, pins=labrun.pins())

    def separate(self, nodes: list[dict]) -> tuple[float, AgentLaunch]:
        started = time.monotonic()
        prepared = checked(self.shell.run_each([n["name"] for n in nodes], lambda _: PREPARE, 300), "preparing")
        if prepared.failed:
            raise SystemExit(f"preparation failed: {[prepared[n].error for n in prepared.failed][:4]}")
        launch = start_agents(self._chain(nodes), self.labrun.addresses, self.auth, window=WINDOW)
        return time.monotonic() - started, launch

    def together(self, nodes: list[dict]) -> tuple[float, AgentLaunch]:
        started = time.monotonic()
        launch = start_agents(self._chain(nodes), self.labrun.addresses, self.auth, window=WINDOW,
                              prepare=lambda _: PREPARE, prepare_timeout=300)  # fmt: skip
        return time.monotonic() - started, launch

    def finish(self, launch: AgentLaunch, count: int) -> None:
        """Send the small image through the ready agents and check every node wrote it."""
        with launch:
            if launch.failed:
                raise SystemExit(f"agents failed: {[r.error for r in launch.failed.values()][:4]}")
            sent = broadcast(self.image, launch.ready, SINK, key=launch.key, options=BroadcastOptions())
            launch.close(failed=set(sent.failed))
        if sent.failed or len(sent) != count:
            raise SystemExit(f"broadcast failed: {[sent[n].error for n in sent.failed][:4]}")

    @staticmethod
    def _chain(nodes: list[dict]) -> list[ChainNode]:
        return [ChainNode(n["name"], f"{n['ip']}:7373", n["switch"], n["rack"]) for n in nodes]


def measure(labrun: labkit.LabRun, counts: list[int], rounds: int) -> None:
    image = labrun.work / "image.bin"
    image.write_bytes(os.urandom(1 << 20))
    print(f"lab of {len(labrun.nodes)} nodes; seconds until every agent is ready on a prepared node\n")
    with inside_netns(labrun.netns):
        start = Start(labrun, image)
        for count in counts:
            nodes = labrun.nodes[:count]
            best = {"separate": float("inf"), "together": float("inf")}
            for round_ in range(1, rounds + 1):
                ways = ["separate", "together"] if round_ % 2 else ["together", "separate"]
                for way in ways:
                    elapsed, launch = getattr(start, way)(nodes)
                    start.finish(launch, count)
                    best[way] = min(best[way], elapsed)
                    print(f"N={count:<3} round {round_}: {way:<9} {elapsed:6.2f} s", flush=True)
            print(f"N={count:<3} best: separate {best['separate']:.2f} s, together {best['together']:.2f} s")
            print(ratio_line(f"start N={count} separate / together", best["separate"] / best["together"]), flush=True)


def parse_counts(text: str, parser: argparse.ArgumentParser) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        parser.error(f"--nodes must be node counts separated by commas, not {text!r}")
    if not counts or min(counts) < 1:
        parser.error("--nodes: every count must be positive")
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="8,32", help="node counts, comma-separated")
    parser.add_argument("--link", type=int, default=100, help="node link rate, Mbit/s")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 nodes, 1 round: a smoke run")
    args = parser.parse_args()
    counts = [2] if args.quick else parse_counts(args.nodes, parser)
    rounds = 1 if args.quick else args.rounds
    if rounds < 1 or args.link < 1:
        parser.error("--rounds and --link must be positive")
    name = LAB + ("q" if args.quick else "")
    plan = LabPlan(name, nodes=max(counts), switches=2 if max(counts) > 1 else 1, link=f"{args.link}mbit",
                   uplink="10gbit")  # fmt: skip
    with labkit.lab_up(plan) as labrun:
        measure(labrun, counts, rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
