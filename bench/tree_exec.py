"""Tree exec vs direct exec of ``true`` on 16 and 64 fake nodes (real sshd on loopback, needs root).

    PYTHONPATH=. python bench/tree_exec.py [--nodes 16,64] [--fanouts 0,4,8] [--window 64]

Prints the wall time of each mode. On loopback every sshd and relay shares the host's CPUs, so this
measures the cost of the tree (relay start-up, extra SSH hops) more than its benefit, which is to
spread the SSH handshakes and connections over the nodes instead of the server.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "transports"))

from sshd_nodes import RELAY_COMMAND, SshdCluster  # noqa: E402

from kasched.transports import tree  # noqa: E402


def time_run(cluster: SshdCluster, nodes: list[str], fanout: int, window: int) -> tuple[float, int]:
    started = time.monotonic()
    result = tree.run(
        nodes, "true", key_file=str(cluster.key_file), addresses=cluster.addresses, fanout=fanout,
        window=window, relay_command=RELAY_COMMAND, command_timeout=60.0, connect_timeout=30.0,
    )  # fmt: skip
    return time.monotonic() - started, len(result.failed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="16,64")
    parser.add_argument("--fanouts", default="0,4,8")
    parser.add_argument("--window", type=int, default=64)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root to start sshd")
    counts = [int(n) for n in args.nodes.split(",")]
    fanouts = [int(f) for f in args.fanouts.split(",")]
    with tempfile.TemporaryDirectory(prefix="kasched-bench-") as tmp:
        cluster = SshdCluster(Path(tmp), max(counts), subnet=45).start()
        try:
            print(f"{os.cpu_count()} CPUs, direct window {args.window}; wall time in seconds (failed nodes)")
            print(f"{'nodes':>5} " + " ".join(f"{'direct' if f == 0 else f'tree k={f}':>12}" for f in fanouts))
            for count in counts:
                cells = []
                for fanout in fanouts:
                    elapsed, failed = time_run(cluster, cluster.nodes[:count], fanout, args.window)
                    cells.append(f"{elapsed:>8.2f}" + (f" ({failed})" if failed else "    "))
                print(f"{count:>5} " + " ".join(cells), flush=True)
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
