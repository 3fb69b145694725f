"""Broadcast on the lab, over shaped links: kasched's chain, every node fetching from one HTTP server
(what Warewulf, Ironic and MAAS do), TakTuk (a chain, ``-d 1``, and its default adaptive tree) and
udpcast (multicast), measured side by side in one run.

    .venv/bin/python bench/broadcast_lab.py [--nodes 1,8] [--size-mib 48] [--link 100[,20]] [--quick]
    .venv/bin/python bench/broadcast_lab.py --nodes 1,8,32,64 --size-mib 48 --link 100,20   # the full run
    .venv/bin/python bench/broadcast_lab.py --nodes 1,64 --link 10 --methods chain,chain-20ms,chain-40ms
    .venv/bin/python bench/broadcast_lab.py --nodes 1,64 --link 10 --methods chain-paced,chain-overlap --rounds 3

Builds a lab (``kbcast``) whose node links are shaped to ``--link`` Mbit/s, boots the nodes into the
deployment system and puts TakTuk (with Perl and an SSH client) and udpcast into it (``labkit``).
The server (10.77.0.1, the lab host) sends at most the link rate in all: the chain's source and TakTuk's
root feed one node's link, the HTTP server is throttled to one link in Python, udp-sender is given
``--max-bitrate`` 95 % of the link. For each N, each method sends a random image to N nodes, each
hashing it and discarding it. Every time counts the whole operation from the server's side,
including starting the remote programs over SSH, on warm nodes (each node first runs, untimed, an
SSH session with python3 and sha256sum, so that no method pays for another's cold start). Prints per
method the time, E = (size / time) / link rate, T(N)/T(1), the time against the chain's, and for the
chain its startup (agents over SSH) and stream phases and how busy the host's CPUs were during the
stream; then ``RATIO`` lines. ``chain-overlap`` is ``broadcast_over_ssh(overlap=True)``: the agents
started in chain order while the stream already leaves (an option, off in deployments: measured
slower on the lab), paced like ``chain-paced``; its time has no phases. ``--rounds R`` measures
every method R times at each N, in turn, the order reversed every other round, and takes the median
time. With several
``--link`` rates, the same lab and image are measured at each in turn (the links reshaped in place).
All the lab's nodes share the host's CPUs: where they are busy near 100 %, the lab, not the method,
sets the pace; a slower link asks the same work of them over a longer time, as nodes with their own
CPUs would see it. Removes the lab at the end, also on failure.
"""

from __future__ import annotations

import argparse
import http.server
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import labkit
from labkit import LabRun, ratio_line

from kasched.deploy.nodes import NodeShell
from kasched.lab.network import shape_node_links
from kasched.lab.system import inside_netns
from kasched.lab.topology import LabPlan
from kasched.transports.chain import BroadcastOptions, ChainNode, broadcast
from kasched.transports.chain_ssh import broadcast_over_ssh, start_agents
from kasched.transports.ssh_session import SshAuth

LAB = "kbcast"
METHODS = ("chain", "chain-paced", "chain-overlap", "http", "taktuk-chain", "taktuk-tree", "udpcast")
# the chain with a node's batches bounded to this many ms of its stream instead of the default 10
# (BroadcastOptions.batch_seconds): less CPU per byte, more delay per hop; only when asked for
BATCH_VARIANTS = {"chain-20ms": 0.02, "chain-40ms": 0.04}
FETCH = (
    'python3 -c "import hashlib,urllib.request;h=hashlib.sha256();'
    "r=urllib.request.urlopen('{url}',timeout=900)\n"
    'while (c:=r.read(1<<20)): h.update(c)\nprint(h.hexdigest())"'
)


class ServerLink:
    """The server's one link: every byte it sends, to any client, passes through this rate."""

    def __init__(self, rate: float) -> None:
        self.rate, self.lock, self.next_free = rate, threading.Lock(), time.monotonic()

    def take(self, size: int) -> None:
        with self.lock:
            start = max(self.next_free, time.monotonic())
            self.next_free = start + size / self.rate
        time.sleep(max(0.0, start - time.monotonic()))


def serve(directory: Path, address: str, link: ServerLink) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object) -> None:
            super().__init__(*a, directory=str(directory))  # type: ignore[arg-type]

        def copyfile(self, source, outputfile) -> None:  # type: ignore[no-untyped-def]
            while chunk := source.read(256 << 10):
                link.take(len(chunk))
                outputfile.write(chunk)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((address, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Bench:
    """One lab, one image; ``method(nodes)`` sends the image to those nodes and returns its phases."""

    def __init__(self, labrun: LabRun, image: Path, link_mbit: int) -> None:
        self.labrun, self.image, self.link_mbit = labrun, image, link_mbit
        self.digest = subprocess.run(["sha256sum", str(image)], capture_output=True, text=True,
                                     check=True).stdout.split()[0]  # fmt: skip
        self.auth = SshAuth.from_key_file("root", str(labrun.key))
        self.shell = NodeShell(labrun.key, labrun.addresses, window=64, pins=labrun.pins())
        self.server = serve(image.parent, "10.77.0.1", ServerLink(link_mbit * 1e6 / 8))

    def chain(self, nodes: list[dict], options: BroadcastOptions | None = None, ordered: bool = True,
              during: Callable[[], None] | None = None, image: Path | None = None) -> dict[str, float]:  # fmt: skip
        """The chain; ``ordered=False`` keeps the nodes' order; ``during`` runs in a thread as the stream
        starts; ``image``: another image than the bench's."""
        chain = [ChainNode(n["name"], f"{n['ip']}:7373", n["switch"], n["rack"]) for n in nodes]
        started = time.monotonic()
        with start_agents(chain, {n["name"]: n["ip"] for n in nodes}, self.auth, window=64) as launch:
            agents_up = time.monotonic()
            cpu = labkit.CpuMeter()
            if during:
                threading.Thread(target=during, daemon=True).start()
            sent = broadcast(image or self.image, launch.ready, {"kind": "discard"}, key=launch.key,
                             options=options or BroadcastOptions(), ordered=ordered)  # fmt: skip
            streamed, busy = time.monotonic(), cpu.busy()
            launch.close(failed=set(sent.failed))
        failed = [f"{r.node}: {r.error}" for r in sent.values() if not r.ok] + list(launch.failed)
        if failed and not during:
            raise SystemExit(f"chain failed: {failed[:4]}")
        return {"startup": agents_up - started, "stream": streamed - agents_up, "total": time.monotonic() - started,
                "failed": float(len(failed)), "cpu": busy}  # fmt: skip

    def chain_overlap(self, nodes: list[dict], options: BroadcastOptions) -> dict[str, float]:
        """The chain with ``overlap=True``: agents on a known port, started in chain order while the
        stream leaves, each node waiting for a successor still starting."""
        chain = [ChainNode(n["name"], f"{n['ip']}:7373", n["switch"], n["rack"]) for n in nodes]
        started, cpu = time.monotonic(), labkit.CpuMeter()
        sent = broadcast_over_ssh(self.image, chain, {"kind": "discard"}, {n["name"]: n["ip"] for n in nodes},
                                  self.auth, options=options, window=64, overlap=True)  # fmt: skip
        took = time.monotonic() - started
        if failed := [f"{r.node}: {r.error}" for r in sent.values() if not r.ok]:
            raise SystemExit(f"chain-overlap failed: {failed[:4]}")
        return {"total": took, "cpu": cpu.busy()}

    def http(self, nodes: list[dict]) -> dict[str, float]:
        url = f"http://10.77.0.1:{self.server.server_address[1]}/{self.image.name}"
        started = time.monotonic()
        fetched = self.shell.run([n["name"] for n in nodes], FETCH.format(url=url), 1800)
        self._check({name: r.value.stdout if r.value else r.error for name, r in fetched.items()}, "http")
        return {"total": time.monotonic() - started}

    def taktuk(self, nodes: list[dict], arity: str) -> dict[str, float]:
        machines = [arg for n in nodes for arg in ("-m", n["ip"])]
        command = labkit.in_lab(self.labrun, "taktuk", "-s", "-d", arity, "-c", self.labrun.ssh_connector(),
                                *machines, "broadcast", "exec", "[", "sha256sum", "]", ";",
                                "broadcast", "input", "file", "[", str(self.image), "]")  # fmt: skip
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        elapsed = time.monotonic() - started
        outputs = [line for line in done.stdout.splitlines() if "output >" in line]
        if len(outputs) != len(nodes) or any(self.digest not in line for line in outputs):
            raise SystemExit(f"taktuk failed: {done.stdout[-600:]} {done.stderr[-300:]}")
        return {"total": elapsed}

    def udpcast(self, nodes: list[dict]) -> dict[str, float]:
        receive = "udp-receiver --nokbd --interface eth0 --mcast-rdv-address 224.0.0.1 2>/dev/null | sha256sum"
        sender = labkit.in_lab(self.labrun, "udp-sender", "--nokbd", "--interface", "sw1", "--mcast-rdv-address",
                               "224.0.0.1", "--min-receivers", str(len(nodes)), "--max-bitrate",
                               f"{int(self.link_mbit * 0.95)}m", "--file", str(self.image))  # fmt: skip
        started = time.monotonic()
        with ThreadPoolExecutor(1) as pool:
            receivers = pool.submit(self.shell.run, [n["name"] for n in nodes], receive, 1800)
            sent = subprocess.run(sender, capture_output=True, text=True, timeout=1800)
            received = receivers.result()
        if sent.returncode != 0:
            raise SystemExit(f"udp-sender: {sent.stderr[-400:]}")
        self._check({name: r.value.stdout if r.value else r.error for name, r in received.items()}, "udpcast")
        return {"total": time.monotonic() - started}

    def _check(self, outputs: dict[str, str], what: str) -> None:
        wrong = {name: out for name, out in outputs.items() if self.digest not in (out or "")}
        if wrong:
            raise SystemExit(f"{what}: wrong or no checksum on {sorted(wrong)[:4]}: {list(wrong.values())[:2]}")

    def paced(self) -> BroadcastOptions:
        """The server's kernel paced to the nodes' link rate (the lab's kasched.yaml does the same)."""
        return BroadcastOptions(source_rate=self.link_mbit * 1e6 / 8)

    def runners(self) -> dict[str, Callable[[list[dict]], dict[str, float]]]:
        return {
            "chain": self.chain,
            # the server's kernel paced to the nodes' link (the site's broadcast_source_rate; the lab's
            # server has no link of its own): BBR's probing no longer queues at the first node's link
            "chain-paced": lambda nodes: self.chain(nodes, self.paced()),
            # the same, the stream leaving while the agents start (an option, off in deployments)
            "chain-overlap": lambda nodes: self.chain_overlap(nodes, self.paced()),
            "http": self.http,
            "taktuk-chain": lambda nodes: self.taktuk(nodes, "1"),
            "taktuk-tree": lambda nodes: self.taktuk(nodes, "0"),
            "udpcast": self.udpcast,
        } | {
            name: lambda nodes, seconds=seconds: self.chain(nodes, BroadcastOptions(batch_seconds=seconds))
            for name, seconds in BATCH_VARIANTS.items()
        }


WARM_UP = "python3 -I -S -c 'import hashlib, json, queue, select, socket, threading' && sha256sum /dev/null"


def warm_up(bench: Bench, nodes: list[dict]) -> None:
    """Run once on every node, untimed, what the methods start there (an SSH session, python3 and the
    modules the chain agent and the HTTP client import, sha256sum). A node's first SSH session and
    first python3 took about twice as long as later ones (startup of 64 agents: 6.5 s cold, 3.1 s
    warm), which fell on whichever method reached the node first: the chain, at every new N."""
    done = bench.shell.run([node["name"] for node in nodes], WARM_UP, 300)
    if cold := sorted(name for name, result in done.items() if not result.ok):
        raise SystemExit(f"warm-up failed on {cold[:4]}: {done[cold[0]].error}")
    # and one small chain through every node: the first 64-node broadcast of a run took 64-65 s
    # whatever its batches (10, 20 or 40 ms; both orders), the next ones 51-53 s
    small = bench.image.with_name("warm-up.bin")
    small.write_bytes(os.urandom(2 << 20))
    try:
        bench.chain(nodes, image=small)
    finally:
        small.unlink()


def measure(
    labrun: LabRun, counts: list[int], methods: list[str], image: Path, link: int, http_max: float, rounds: int = 1
) -> None:
    """Every method at every N, ``rounds`` times in turn, the nodes' links shaped to ``link`` Mbit/s;
    HTTP only where it can take at most ``http_max`` seconds (N images through the server's one link)."""
    shape_node_links(labrun.plan, list(labrun.plan.nodes_list), f"{link}mbit")
    size, link_bytes = image.stat().st_size, link * 1e6 / 8
    print(f"\nimage {size >> 20} MiB, node links {link} Mbit/s, lab of {len(labrun.nodes)} nodes; "
          "E = (size / time) / link rate", flush=True)  # fmt: skip
    print(f"{'N':>3} {'method':<13} {'time s':>7} {'E':>5}  phases")
    first: dict[str, float] = {}
    with inside_netns(labrun.netns):
        bench = Bench(labrun, image, link)
        warm_up(bench, labrun.nodes[: counts[-1]])
        runners = bench.runners()
        for count in counts:
            runnable = [m for m in methods if m != "http" or count * size / link_bytes <= http_max]
            for method in sorted(set(methods) - set(runnable)):
                floor = count * size / link_bytes
                print(f"{count:>3} {method:<13} skipped: at least {floor:.0f} s, over --http-max-seconds")
            times: dict[str, list[float]] = {}
            for turn in range(rounds):
                for method in runnable if turn % 2 == 0 else runnable[::-1]:
                    phases = runners[method](labrun.nodes[:count])
                    took = phases["total"]
                    times.setdefault(method, []).append(took)
                    print(f"{count:>3} {method:<13} {took:>7.2f} {size / took / link_bytes:>5.2f}  "
                          f"{_phases(phases, size, link_bytes)}", flush=True)  # fmt: skip
            _summarize(count, {m: statistics.median(t) for m, t in times.items()}, first, size / link_bytes,
                       f"{link}Mbit", first_count=counts[0], last=count == counts[-1], rounds=rounds)  # fmt: skip
        bench.server.shutdown()


def _phases(phases: dict[str, float], size: int, link_bytes: float) -> str:
    if "startup" not in phases:
        return f"host CPUs {phases['cpu']:.0%} busy" if "cpu" in phases else ""
    return (f"startup {phases['startup']:.2f} s, stream {phases['stream']:.2f} s "
            f"(E stream {size / phases['stream'] / link_bytes:.2f}, host CPUs {phases['cpu']:.0%} busy)")  # fmt: skip


def _summarize(count: int, took: dict[str, float], first: dict[str, float], ideal: float, at: str, *,
               first_count: int, last: bool, rounds: int) -> None:  # fmt: skip
    """One line per method at this N (the median of the rounds), then, at the last N, the RATIO lines.
    ``ideal``: the seconds the image takes at the link's rate; ``first``: each method's time at the
    first N (filled here)."""
    print(f"{count:>3} {'median of ' + str(rounds):<13} {'time s':>7} {'E':>5} {'T(N)/T(1)':>9} {'vs chain':>8} "
          f"{'vs paced':>8}")  # fmt: skip
    for method, seconds in took.items():
        first.setdefault(method, seconds)
        versus = [f"{seconds / took[base]:8.2f}" if base in took else f"{'':8}" for base in ("chain", "chain-paced")]
        print(f"{count:>3} {method:<13} {seconds:>7.2f} {ideal / seconds:>5.2f} {seconds / first[method]:>9.2f} "
              f"{' '.join(versus)}", flush=True)  # fmt: skip
        if last:
            print(ratio_line(f"{method} E N={count} {at}", ideal / seconds))
            print(ratio_line(f"{method} T({count})/T({first_count}) {at}", seconds / first[method]), flush=True)
    if last and "chain-overlap" in took and "chain-paced" in took:
        print(ratio_line(f"chain-overlap/chain-paced time N={count} {at}", took["chain-overlap"] / took["chain-paced"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1,8", help="comma-separated N, e.g. 1,8,32,64")
    parser.add_argument("--size-mib", type=int, default=48)
    parser.add_argument("--link", default=None, help="node link rates, Mbit/s, comma-separated: each one "
                        "measured in turn on the same lab (e.g. 100,20)")  # fmt: skip
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--http-max-seconds", type=float, default=600.0,
                        help="skip HTTP where N images through one link would take longer")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="measure every method this many times at each N, "
                        "in turn, the order reversed every other round; the median counts")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="2 nodes, 8 MiB, links 100 then 50: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.nodes, args.size_mib, args.link = "1,2", 8, args.link or "100,50"
    args.link = args.link or "100"
    counts = sorted({int(n) for n in args.nodes.split(",")})
    try:
        links = [int(rate) for rate in args.link.split(",") if rate]
    except ValueError:
        parser.error(f"--link {args.link!r}: comma-separated whole Mbit/s, e.g. 100,20")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least 1")
    if not links or min(links) <= 0:
        parser.error(f"--link {args.link!r}: each rate must be a positive number of Mbit/s")
    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(METHODS) - set(BATCH_VARIANTS):
        parser.error(f"unknown methods {sorted(unknown)}; known: {', '.join([*METHODS, *BATCH_VARIANTS])}")
    name = LAB + ("q" if args.quick else "")  # smoke runs never touch a full run's lab
    plan = LabPlan(name, nodes=max(counts), switches=max(1, min(4, max(counts) // 16)),
                   link=f"{links[0]}mbit", uplink="10gbit")  # fmt: skip
    with labkit.lab_up(plan, extras=bool({"taktuk-chain", "taktuk-tree", "udpcast"} & set(methods))) as labrun:
        image = labrun.work / "image.bin"
        image.write_bytes(os.urandom(args.size_mib << 20))
        for link in links:
            measure(labrun, counts, methods, image, link, args.http_max_seconds, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
