"""kaschedd status queries under load: 100 concurrent clients over the Unix socket.

Run: .venv/bin/python bench/api.py [--clients 100] [--seconds 10]
Starts kaschedd (a separate process) on a scratch SQLite site with 64 nodes, then runs the clients in
4 processes; prints requests per second and latency percentiles for two queries, side by side.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

from kasched.api import Kasched  # noqa: E402
from kasched.config import Config  # noqa: E402
from kasched.identity import Caller  # noqa: E402
from kasched.service.client import ServiceClient  # noqa: E402

QUERIES = {"health": "/v1/health", "rights check": "/v1/rights/check?nodes=node-%5B1-8%5D"}


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        config_file = Path(directory) / "kasched.yaml"
        config_file.write_text(f"site: bench\nstate_dir: {directory}/state\n")
        config = Config(site="bench", state_dir=Path(directory) / "state")
        api = Kasched.open(config, Caller("root", is_admin=True), load_entry_points=False)
        api.import_nodes(ROOT / "examples" / "cluster.yaml")
        api.grant("root", "node-[1-8]", hours=1)
        api.close()
        server = subprocess.Popen(
            [sys.executable, "-m", "kasched.service.main", "--config", str(config_file)], stderr=subprocess.DEVNULL
        )
        try:
            for _ in range(100):
                if config.service_socket.exists():
                    break
                time.sleep(0.1)
            print(f"{args.clients} clients, {args.seconds:.0f} s per query, kaschedd in its own process\n")
            print(f"{'query':<14} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
            rates = {}
            for name, url in QUERIES.items():
                rate, latencies, errors = measure(config.service_socket, url, args.clients, args.seconds)
                ordered = sorted(latencies)
                p99 = ordered[int(0.99 * (len(ordered) - 1))] * 1000
                print(f"{name:<14} {rate:>8.0f} {statistics.median(ordered) * 1000:>8.1f} {p99:>8.1f} {errors:>7}")
                rates[name] = rate
            print(f"\nratio: rights check / health = {rates['rights check'] / rates['health']:.2f}")
        finally:
            server.terminate()
            server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
