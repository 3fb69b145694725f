"""Time to bring up and tear down a lab of N nodes, and what each node costs (memory, disk).

Usage (as root): ``python bench/lab.py [N ...]`` (default: 8 64). Memory is the proportional set
size (PSS) of each node's processes (its system, sshd, power supply) plus its BMC's ``ipmi_sim``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kasched.lab.lab import Lab
from kasched.lab.system import netns_pids, read_pid
from kasched.lab.topology import LabPlan


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def node_costs(lab: Lab, plan: LabPlan) -> tuple[float, float, float]:
    """Mean PSS of a node's processes, of its BMC (MiB), and mean disk use of its image (MiB)."""
    node_kib = bmc_kib = disk_kib = 0
    for node in plan.nodes_list:
        node_kib += sum(pss_kib(pid) for pid in netns_pids(node.netns))
        node_dir = lab.state_dir / "nodes" / node.name
        bmc_pid = read_pid(node_dir / "bmc.pid")
        bmc_kib += pss_kib(bmc_pid) if bmc_pid else 0
        disk_kib += int(subprocess.run(["du", "-k", str(node_dir / "disk.img")], capture_output=True,
                                       text=True, check=True).stdout.split()[0])  # fmt: skip
    n = len(plan.nodes_list)
    return node_kib / n / 1024, bmc_kib / n / 1024, disk_kib / n / 1024


def bench(nodes: int, switches: int, state_root: Path) -> None:
    plan = LabPlan(f"kb{nodes}", nodes=nodes, switches=switches, link="100mbit", uplink="200mbit")
    lab = Lab(plan.name, state_dir=state_root / plan.name)
    lab.down()
    try:
        started = time.monotonic()
        lab.up(plan, boot_timeout=max(120, 3 * nodes))
        up_seconds = time.monotonic() - started
        node_mib, bmc_mib, disk_mib = node_costs(lab, plan)
    finally:
        started = time.monotonic()
        lab.down()
        down_seconds = time.monotonic() - started
    print(
        f"{nodes:4d} nodes / {switches} switches: up (all sshd answering) {up_seconds:6.1f} s, "
        f"down {down_seconds:5.1f} s; per node: {node_mib:5.1f} MiB node processes + "
        f"{bmc_mib:4.1f} MiB BMC (PSS), disk image {disk_mib:5.1f} MiB on the host",
        flush=True,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("nodes", nargs="*", type=int, default=[8, 64])
    parser.add_argument("--switches", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kasched-lab-bench-") as root:
        for count in args.nodes:
            bench(count, min(args.switches, count), Path(root))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
