"""Chain broadcast vs every node fetching from one HTTP server, on loopback.

    PYTHONPATH=. python bench/broadcast.py [--size-mib 64] [--nodes 1,2,4,8] [--server-rate-mib 50]

For each N it times, in one run and side by side: the chain broadcast of one image to N agents
(each hashing it and discarding it, or writing it with ``--sink raw``), and N clients fetching the
same image at once from a ``http.server`` on 127.0.0.1 (each hashing it too). It prints times,
T(N)/T(1) and the HTTP/chain ratio. ``--server-rate-mib`` caps what the server sends per second in
both cases (the chain's source, the HTTP server's total) to mimic a server uplink slower than the
nodes' links; loopback has no real links, so without it every process competes for the same CPUs.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "transports"))

from chain_agents import AgentGroup  # noqa: E402

from kasched.transports.chain import BroadcastOptions, broadcast  # noqa: E402

FETCH = """
import hashlib, sys, urllib.request
hasher = hashlib.sha256()
with urllib.request.urlopen(sys.argv[1], timeout=120) as response:
    while chunk := response.read(1 << 20):
        hasher.update(chunk)
print(hasher.hexdigest())
"""


class RateLimit:
    """A token bucket shared by every sender of the HTTP server."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.sent = 0

    def take(self, size: int) -> None:
        if not self.rate:
            return
        with self.lock:
            self.sent += size
            ahead = self.sent / self.rate - (time.monotonic() - self.started)
        if ahead > 0:
            time.sleep(ahead)

    def reset(self) -> None:
        with self.lock:
            self.started, self.sent = time.monotonic(), 0


def start_http(image: Path, limit: RateLimit) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(image.stat().st_size))
            self.end_headers()
            with open(image, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    limit.take(len(chunk))
                    self.wfile.write(chunk)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/image"


def time_http(url: str, count: int, limit: RateLimit, expected: str) -> float:
    limit.reset()
    started = time.monotonic()
    clients = [
        subprocess.Popen([sys.executable, "-c", FETCH, url], stdout=subprocess.PIPE, text=True) for _ in range(count)
    ]
    digests = [client.communicate(timeout=300)[0].strip() for client in clients]
    elapsed = time.monotonic() - started
    if set(digests) != {expected}:
        raise SystemExit(f"HTTP baseline: wrong digests {digests}")
    return elapsed


def time_chain(image: Path, count: int, rate: float | None, sink: dict[str, str]) -> float:
    agents = AgentGroup(count, subnet=43).start()
    try:
        options = BroadcastOptions(timeout=300.0, stall_timeout=30.0, rate_limit=rate)
        started = time.monotonic()
        result = broadcast(image, agents.nodes, sink, key=agents.key, options=options)
        elapsed = time.monotonic() - started
    finally:
        agents.stop()
    if not result.ok:
        raise SystemExit(f"chain failed: { {n: r.error for n, r in result.items() if not r.ok} }")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--nodes", default="1,2,4,8")
    parser.add_argument("--server-rate-mib", type=float, default=None)
    parser.add_argument("--sink", choices=["discard", "raw"], default="discard")
    args = parser.parse_args()
    counts = [int(n) for n in args.nodes.split(",")]
    rate = args.server_rate_mib * (1 << 20) if args.server_rate_mib else None
    with tempfile.TemporaryDirectory(prefix="kasched-bench-") as tmp:
        image = Path(tmp) / "image.raw"
        with open(image, "wb") as handle:
            for _ in range(args.size_mib):
                handle.write(os.urandom(1 << 20))
        expected = hashlib.sha256(image.read_bytes()).hexdigest()
        sink = {"kind": args.sink, "dest": str(Path(tmp) / "{node}.img")}
        limit = RateLimit(rate)
        server, url = start_http(image, limit)
        print(f"image {args.size_mib} MiB, server rate {args.server_rate_mib or 'uncapped'} MiB/s, "
              f"sink {args.sink}, {os.cpu_count()} CPUs")  # fmt: skip
        print(
            f"{'N':>3} {'chain s':>8} {'MiB/s':>7} {'T(N)/T(1)':>9} {'http s':>8} {'T(N)/T(1)':>9} {'http/chain':>10}"
        )
        first: tuple[float, float] | None = None
        for count in counts:
            chain_time = time_chain(image, count, rate, sink)
            http_time = time_http(url, count, limit, expected)
            first = first or (chain_time, http_time)
            chain_cells = f"{chain_time:>8.2f} {args.size_mib / chain_time:>7.0f} {chain_time / first[0]:>9.2f}"
            http_cells = f"{http_time:>8.2f} {http_time / first[1]:>9.2f} {http_time / chain_time:>10.2f}"
            print(f"{count:>3} {chain_cells} {http_cells}", flush=True)
        server.shutdown()


if __name__ == "__main__":
    main()
