"""``true`` on N lab nodes: kasched's tree exec (direct and tree) against ClusterShell's ``clush``
and TakTuk, side by side in one run.

    .venv/bin/python bench/tree_exec_lab.py [--nodes 16,64,128] [--fanout 8] [--quick]

Builds a lab (``ktree``) of max(N) nodes (up to 64 per switch), boots them into the deployment system
(python3 + paramiko + kasched, for kasched's relays) and puts TakTuk, Perl and an SSH client there
(``labkit``). For each N, from the lab host (the lab namespace):

* ``kasched direct``: ``tree.run(fanout=0, window=64)``, one paramiko connection per node;
* ``kasched tree``: ``tree.run(fanout=--fanout)``, relays on the nodes (``python3 -m kasched.transports.relay``);

both started as a process (``python -c``: the interpreter, kasched's imports and paramiko's included),
as ``clush`` and ``taktuk`` are, so that the ratios compare like with like;
* ``clush``: ``clush -f 64`` (its default fan-out), OpenSSH from the host to every node;
* ``taktuk``: ``taktuk -s`` (self-propagating, its default adaptive tree, window 10), OpenSSH.

Each checks every node answered (exit status 0). Prints wall times, the ratios to kasched direct, then
``RATIO`` lines. Removes the lab at the end, also on failure. On the lab all nodes share the host's CPUs,
which handshakes and interpreters compete for: a tree cannot spread that load as on real nodes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import labkit
from labkit import LabRun, ratio_line

from kasched.lab.system import inside_netns
from kasched.lab.topology import LabPlan

LAB = "ktree"
CLUSH = str(Path(sys.executable).parent / "clush")


# What a ``kasched`` process does to run a command on nodes: start, import, run, report (exit 0: all ok).
EXEC = """
import json, sys
from kasched.transports import tree
args = json.loads(sys.argv[1])
result = tree.run(args.pop("nodes"), "true", window=64, connect_timeout=30, command_timeout=120, **args)
failed = [(r.node, r.error) for r in result.values() if not r.ok]
print(json.dumps(failed[:4]))
sys.exit(1 if failed else 0)
"""


def kasched_exec(labrun: LabRun, nodes: list[dict], fanout: int) -> float:
    """Wall time of a process running kasched's tree exec, as clush and taktuk are timed."""
    args = {"nodes": [n["name"] for n in nodes], "key_file": str(labrun.key), "addresses": labrun.addresses,
            "fanout": fanout}  # fmt: skip
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", EXEC, json.dumps(args)], capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        failed = f"{done.stdout[-400:]} {done.stderr[-400:]}"
        raise SystemExit(f"kasched fanout={fanout}: status {done.returncode}: {failed}")
    return elapsed


def clush_exec(labrun: LabRun, nodes: list[dict]) -> float:
    ssh_options = f"-i {labrun.key} {labkit.SSH_OPTIONS}"
    command = labkit.in_lab(labrun, CLUSH, "-f", "64", "-l", "root", "-o", ssh_options, "-S", "-q", "-t", "30",
                            "-w", ",".join(n["ip"] for n in nodes), "true; echo ok")  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - started
    if done.returncode != 0 or done.stdout.count(": ok") != len(nodes):
        raise SystemExit(f"clush: status {done.returncode}: {done.stdout[-400:]} {done.stderr[-400:]}")
    return elapsed


def taktuk_exec(labrun: LabRun, nodes: list[dict]) -> float:
    machines = [arg for n in nodes for arg in ("-m", n["ip"])]
    command = labkit.in_lab(labrun, "taktuk", "-s", "-c", labrun.ssh_connector(), *machines,
                            "broadcast", "exec", "[", "true", "]")  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - started
    if done.returncode != 0 or done.stdout.count("Exited with status 0") != len(nodes):
        raise SystemExit(f"taktuk: status {done.returncode}: {done.stdout[-400:]} {done.stderr[-400:]}")
    return elapsed


def measure(labrun: LabRun, counts: list[int], fanout: int) -> None:
    tools: dict[str, Callable[[list[dict]], float]] = {
        "kasched direct": lambda nodes: kasched_exec(labrun, nodes, 0),
        f"kasched tree k={fanout}": lambda nodes: kasched_exec(labrun, nodes, fanout),
        "clush -f 64": lambda nodes: clush_exec(labrun, nodes),
        "taktuk -s": lambda nodes: taktuk_exec(labrun, nodes),
    }
    print(f"`true` on N lab nodes (deployment system), wall seconds; lab of {len(labrun.nodes)} nodes\n")
    print(f"{'N':>4} " + " ".join(f"{name:>17}" for name in tools))
    with inside_netns(labrun.netns):
        for count in counts:
            nodes = labrun.nodes[:count]
            times = {name: run(nodes) for name, run in tools.items()}
            print(f"{count:>4} " + " ".join(f"{t:>17.2f}" for t in times.values()), flush=True)
            direct = times["kasched direct"]
            for name, took in times.items():
                if name != "kasched direct":
                    print(ratio_line(f"N={count} {name} / kasched direct", took / direct), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="16,64,128")
    parser.add_argument("--fanout", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="4 nodes: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.fanout = "4", 2
    counts = sorted({int(n) for n in args.nodes.split(",")})
    name = LAB + ("q" if args.quick else "")  # smoke runs never touch a full run's lab
    plan = LabPlan(name, nodes=max(counts), switches=max(1, -(-max(counts) // 64)),
                   link="1gbit", uplink="10gbit")
    with labkit.lab_up(plan, extras=True) as labrun:
        measure(labrun, counts, args.fanout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
