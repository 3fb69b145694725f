"""kaschedd status queries under load: 100 concurrent clients over the Unix socket, today's kaschedd
side by side with the one of an older commit (by default the one before issue 18's request checks).

Run: .venv/bin/python bench/api.py [--clients 100] [--seconds 10] [--old REV] [--rounds 2]
Starts each kaschedd (a separate process, its code from this tree or from ``git archive REV``) on a
scratch SQLite site of its own with 64 nodes, then runs the clients in 4 processes; prints requests
per second, latency percentiles and kaschedd's CPU time per request (/proc, less sensitive than the
rates to what else runs on the machine) for each query and each kaschedd, in turn (the order reversed
every other round), and the ratios new/old: what the new checks of every request cost (the total time per
request, the connection caps, the deadline sent by the client and bounding each database wait, node
ranges counted before they are expanded).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

from kasched.service.client import ServiceClient  # noqa: E402

QUERIES = {"health": "/v1/health", "rights check": "/v1/rights/check?nodes=node-%5B1-8%5D"}
OLD = "30f8e4e"  # the commit issue 18's request checks start from
SETUP = (
    "import sys; from pathlib import Path; from kasched.compose import open_site; from kasched.config import Config; "
    "from kasched.identity import Caller; config = Config(site='bench', state_dir=Path(sys.argv[1])); "
    "api = open_site(config, Caller('root', is_admin=True), load_entry_points=False); "
    "api.import_nodes(sys.argv[2]); api.grant('root', 'node-[1-8]', hours=1); api.close()"
)


def client_process(socket_path: str, url: str, threads: int, seconds: float, queue: multiprocessing.Queue) -> None:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        client = ServiceClient(Path(socket_path))
        mine = []
        while time.monotonic() < deadline:
            start = time.perf_counter()
            status, _ = client.request("GET", url)
            mine.append(time.perf_counter() - start)
            if status != 200:
                with lock:
                    errors[0] += 1
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    queue.put((latencies, errors[0]))


def measure(socket_path: Path, url: str, clients: int, seconds: float) -> tuple[float, list[float], int]:
    processes = 4
    queue: multiprocessing.Queue = multiprocessing.Queue()
    workers = [
        multiprocessing.Process(
            target=client_process, args=(str(socket_path), url, clients // processes, seconds, queue)
        )
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    latencies: list[float] = []
    errors = 0
    for _ in workers:
        got, failed = queue.get(timeout=seconds + 120)
        latencies.extend(got)
        errors += failed
    for worker in workers:
        worker.join()
    return len(latencies) / seconds, latencies, errors


class Server:
    """A kaschedd on a scratch site of its own, its code from ``tree``."""

    def __init__(self, name: str, tree: Path, directory: Path) -> None:
        self.name, self.tree = name, tree
        state = directory / name
        self.socket = state / "kaschedd.sock"
        self.config = directory / f"{name}.yaml"
        self.config.write_text(f"site: bench\nstate_dir: {state}\n")
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(tree / "plugins")])}
        subprocess.run([sys.executable, "-c", SETUP, str(state), str(ROOT / "examples" / "cluster.yaml")],
                       env=self.env, check=True)  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kasched.service.main", "--config", str(self.config)],
            env=self.env, stderr=subprocess.DEVNULL, cwd=self.tree,
        )  # fmt: skip
        for _ in range(200):
            if self.socket.exists():
                break
            time.sleep(0.05)
        return self

    def __exit__(self, *_: object) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(10)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far (/proc/PID/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def old_tree(revision: str, directory: Path) -> Path:
    """kasched and its plugins as they were at ``revision`` (git archive)."""
    tree = directory / "old-tree"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "kasched", "plugins"],
                             capture_output=True, check=True)  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--old", default=OLD, help=f"the commit to compare with (default {OLD})")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        servers = [Server("old", old_tree(args.old, directory), directory), Server("new", ROOT, directory)]
        # one uid's 100 clients: the new kaschedd's per-user cap must let them all in, as the old one did
        servers[1].config.write_text(servers[1].config.read_text() + "service_max_connections_per_user: 1000\n")
        print(f"{args.clients} clients, {args.seconds:.0f} s per query and kaschedd, old = {args.old}, "
              f"{args.rounds} rounds\n")  # fmt: skip
        header = f"{'query':<14} {'kaschedd':<9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
        print(f"{header} {'CPU us/req':>10}")
        rates: dict[tuple[str, str], list[float]] = {}
        cpus: dict[tuple[str, str], list[float]] = {}
        for round_number in range(args.rounds):
            for server in servers if round_number % 2 == 0 else servers[::-1]:
                with server:
                    assert server.process is not None
                    for name, url in QUERIES.items():
                        cpu = cpu_seconds(server.process.pid)
                        rate, latencies, errors = measure(server.socket, url, args.clients, args.seconds)
                        per_request = (cpu_seconds(server.process.pid) - cpu) / len(latencies) * 1e6
                        ordered = sorted(latencies)
                        p50, p99 = statistics.median(ordered) * 1000, ordered[int(0.99 * (len(ordered) - 1))] * 1000
                        print(
                            f"{name:<14} {server.name:<9} {rate:>8.0f} {p50:>8.1f} {p99:>8.1f} {errors:>7} "
                            f"{per_request:>10.0f}"
                        )
                        rates.setdefault((name, server.name), []).append(rate)
                        cpus.setdefault((name, server.name), []).append(per_request)
        print()
        for name in QUERIES:
            old, new = statistics.median(rates[(name, "old")]), statistics.median(rates[(name, "new")])
            old_cpu, new_cpu = statistics.median(cpus[(name, "old")]), statistics.median(cpus[(name, "new")])
            print(
                f"{name:<14} medians of {args.rounds}: req/s new/old {new / old:.3f}, kaschedd CPU per request "
                f"new/old {new_cpu / old_cpu:.3f} ({old_cpu:.0f} -> {new_cpu:.0f} us)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
