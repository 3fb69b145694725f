"""What a chain agent's CPU costs per MiB it receives, hashes, writes and forwards, by batch size.

    .venv/bin/python bench/agent_cpu.py [--nodes 8] [--size-mib 12] [--rate-mbit 10] [--rounds 2]
                                        [--batches 16,64,256]

Real agents (``python3 -I -S``, as shipped to the nodes) listen on 127.0.0.x; the server sends the
image through them at ``--rate-mbit`` in frames of each ``--batches`` KiB, so that every node wakes up
once per frame, as the pacer makes it do on a link of that speed (16 KiB is the floor a node waits
for at 10-20 Mbit/s, see docs/transports.md). Each node writes the stream to a file under a
temporary directory. The CPU counted is the agents' own (user + system, from /proc) between "ready"
and their report, so the interpreter's start is left out; on loopback the kernel's TCP receive path
runs in the sender's system time, so the figure includes both ends of each hop. Batch sizes
alternate within each round, so that the machine's load weighs on all alike. Prints milliseconds of
CPU per MiB and node for each batch size, then ``RATIO`` lines (each size against the smallest).

On the lab, where all the nodes share the host's 2 CPUs, this cost times the node count is what
bounds a broadcast; on a real site each node pays it on its own CPU.
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

sys.path.insert(0, str(Path(__file__).resolve().parent))

from labkit import ratio_line

from kasched.transports.chain import BroadcastOptions, ChainNode, broadcast
from kasched.transports.chain_ssh import AGENT_FLAGS, agent_program, new_key


class FramedReader:
    """The image, read ``piece`` bytes at a time: the server sends one frame per read."""

    def __init__(self, handle: BinaryIO, piece: int) -> None:
        self.handle = handle
        self.piece = piece

    def read(self, size: int = -1) -> bytes:
        return self.handle.read(self.piece)


def start_agents(count: int, key: bytes) -> tuple[list[subprocess.Popen[bytes]], list[ChainNode]]:
    processes, nodes = [], []
    for index in range(count):
        name = f"b{index + 1:02d}"
        argv = ["python3", *AGENT_FLAGS.split(), "-", "--listen", f"127.0.91.{index + 1}:0",
                "--name", name, "--accept-timeout", "60"]  # fmt: skip
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdin is not None
        process.stdin.write(agent_program(key))  # the program shipped to nodes, as over SSH
        process.stdin.close()
        processes.append(process)
    try:
        for index, process in enumerate(processes):
            assert process.stdout is not None and process.stderr is not None
            if not select.select([process.stdout], [], [], 20)[0]:
                raise SystemExit("an agent did not start within 20 s")
            line = process.stdout.readline().decode().split()
            if len(line) != 2 or line[0] != "ready":
                raise SystemExit(f"an agent did not start: {process.stderr.read().decode()[-300:]}")
            nodes.append(ChainNode(f"b{index + 1:02d}", line[1], "sw1", "r1"))
    except BaseException:
        stop(processes)
        raise
    return processes, nodes


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def cpu_seconds(processes: list[subprocess.Popen[bytes]]) -> float:
    """User + system CPU of the (running or exited, not yet reaped) agents."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for process in processes:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def one_run(image: Path, work: Path, nodes_count: int, piece: int, rate: float) -> float:
    """CPU ms per MiB and node for one broadcast in frames of ``piece`` bytes."""
    key = new_key()
    processes, nodes = start_agents(nodes_count, key)
    try:
        before = cpu_seconds(processes)
        with image.open("rb") as handle:
            sink = {"kind": "raw", "dest": str(work / "{node}.img")}
            result = broadcast(FramedReader(handle, piece), nodes, sink, key=key,
                               options=BroadcastOptions(rate_limit=rate))  # fmt: skip
        time.sleep(0.2)  # the agents exit right after their report
        spent = cpu_seconds(processes) - before
    finally:
        stop(processes)
    if not result.ok:
        raise SystemExit(f"broadcast failed: {[(n, result[n].error) for n in result.failed][:3]}")
    return spent * 1000 / nodes_count / (image.stat().st_size / (1 << 20))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--size-mib", type=int, default=12)
    parser.add_argument("--rate-mbit", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", default="16,64,256", help="KiB per frame, comma-separated")
    args = parser.parse_args()
    try:
        batches = [int(kib) for kib in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches must be KiB counts separated by commas, not {args.batches!r}")
    if args.nodes < 1 or args.size_mib < 1 or args.rounds < 1 or args.rate_mbit <= 0 or min(batches) < 1:
        parser.error("--nodes, --size-mib, --rounds, --rate-mbit and every batch must be positive")
    figures: dict[int, list[float]] = {kib: [] for kib in batches}
    with tempfile.TemporaryDirectory(prefix="kasched-agent-cpu-") as directory:
        work = Path(directory)
        image = work / "image.bin"
        image.write_bytes(os.urandom(args.size_mib << 20))
        for round_number in range(args.rounds):
            for kib in batches:
                cost = one_run(image, work, args.nodes, kib << 10, args.rate_mbit * 1e6 / 8)
                figures[kib].append(cost)
                print(f"round {round_number + 1}: {kib:4d} KiB batches: {cost:6.2f} ms of CPU per MiB and node",
                      flush=True)  # fmt: skip
    if unmeasured := [kib for kib in batches if not min(figures[kib])]:
        raise SystemExit(f"{unmeasured} KiB batches: the agents spent less CPU than the kernel counts "
                         f"({1000 // os.sysconf('SC_CLK_TCK')} ms ticks); give a larger --size-mib")  # fmt: skip
    smallest = min(batches)
    for kib in batches:
        print(f"{kib:4d} KiB batches: best {min(figures[kib]):6.2f} ms/MiB per node")
    for kib in batches:
        if kib != smallest:
            print(ratio_line(f"agent CPU per MiB, {smallest} KiB / {kib} KiB batches",
                             min(figures[smallest]) / min(figures[kib])))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
