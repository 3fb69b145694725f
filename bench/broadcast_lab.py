"""Broadcast on the lab, over shaped links: the chain against every node fetching from one HTTP
server (what Warewulf, Ironic and MAAS do), measured side by side in one run.

    .venv/bin/python bench/broadcast_lab.py [--nodes 1,4,8] [--size-mib 48] [--link 100]

Builds a lab (``benchbc``) whose node links are shaped to ``--link`` Mbit/s; the server has one link
of that rate too (the chain's source and the HTTP server both send at most that rate in all). It
boots the nodes into the deployment system, then for each N: the chain broadcast of a random image
to N nodes (each hashing it and discarding it), and N nodes fetching it at once over HTTP from the
lab host (each hashing it). Prints times, efficiency E = (size / time) / link rate, T(N)/T(1) and the
HTTP/chain ratio. Removes the lab at the end.
"""

from __future__ import annotations

import argparse
import http.server
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "plugins")]

import yaml  # noqa: E402

from kasched.deploy.nodes import NodeShell  # noqa: E402
from kasched.engine.chain import BroadcastOptions, ChainNode  # noqa: E402
from kasched.engine.chain_ssh import broadcast_over_ssh  # noqa: E402
from kasched.engine.ssh_session import SshAuth  # noqa: E402
from kasched.lab.system import inside_netns  # noqa: E402

LAB = "benchbc"
KASCHED = [sys.executable, "-m", "kasched"]
FETCH = (
    'python3 -c "import hashlib,urllib.request;h=hashlib.sha256();'
    "r=urllib.request.urlopen('{url}',timeout=300)\n"
    'while (c:=r.read(1<<20)): h.update(c)\nprint(h.hexdigest())"'
)


def run(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:5])}: {done.stderr.strip()[-500:]}")
    return done.stdout


def boot_deploy_system(lab: Path, nodes: list[str], work: Path) -> None:
    """Every node into the deployment system, through kasched itself (IPMI, PXE), as root/admin."""
    config = work / "kasched.yaml"
    data = yaml.safe_load((lab / "kasched.yaml").read_text())
    data["state_dir"] = str(work / "state")
    config.write_text(yaml.safe_dump(data))
    env = {"KASCHED_CONFIG": str(config), "KASCHED_DIRECT": "1", "PYTHONPATH": str(REPO)}
    run(*KASCHED, "nodes", "import", str(lab / "inventory.yaml"), env=env)
    run(
        *KASCHED,
        "lab",
        "exec",
        "--name",
        LAB,
        "--",
        *KASCHED,
        "reboot",
        "--level",
        "hard",
        "--to",
        "deploy",
        "-m",
        ",".join(nodes),
        env=env,
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1,4,8")
    parser.add_argument("--size-mib", type=int, default=48)
    parser.add_argument("--link", type=int, default=100, help="node link rate, Mbit/s")
    args = parser.parse_args()
    counts = [int(n) for n in args.nodes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="kasched-bench-"))
    lab = work / "lab"
    run(*KASCHED, "lab", "down", "--name", LAB)
    run(
        *KASCHED,
        "lab",
        "up",
        "--name",
        LAB,
        "--state-dir",
        str(lab),
        "--nodes",
        str(max(counts)),
        "--switches",
        "2",
        "--link",
        f"{args.link}mbit",
        "--uplink",
        "10gbit",
    )
    try:
        return measure(lab, work, counts, args)
    finally:
        run(*KASCHED, "lab", "down", "--name", LAB)


def measure(lab: Path, work: Path, counts: list[int], args: argparse.Namespace) -> int:
    inventory = yaml.safe_load((lab / "inventory.yaml").read_text())["clusters"][0]["nodes"]
    names = [n["name"] for n in inventory]
    boot_deploy_system(lab, names, work)
    image = work / "image.bin"
    image.write_bytes(os.urandom(args.size_mib << 20))
    size = image.stat().st_size
    key = lab / "ssh" / "id_ed25519"
    auth = SshAuth.from_key_file("root", str(key))
    link_bytes = args.link * 1e6 / 8
    print(f"image {args.size_mib} MiB, node links {args.link} Mbit/s, 2 switches, lab of {len(names)} nodes\n")
    print(
        f"{'N':>3} {'chain s':>8} {'E chain':>8} {'T(N)/T(1)':>10} {'http s':>8} {'E http':>7} {'T(N)/T(1)':>10} "
        f"{'http/chain':>11}"
    )
    first: dict[str, float] = {}
    with inside_netns(f"kl-{LAB}"):
        server = serve(work, "10.77.0.1", ServerLink(link_bytes))
        shell = NodeShell(key, {n["name"]: n["ip"] for n in inventory})
        for count in counts:
            chosen = inventory[:count]
            nodes = [ChainNode(n["name"], f"{n['ip']}:7373", n["switch"], n["rack"]) for n in chosen]
            start = time.monotonic()
            sent = broadcast_over_ssh(
                image,
                nodes,
                {"kind": "discard"},
                {n["name"]: n["ip"] for n in chosen},
                auth,
                options=BroadcastOptions(),
            )
            chain_time = time.monotonic() - start
            if not sent.ok:
                raise SystemExit(f"chain failed: {[r.error for r in sent.values() if not r.ok]}")
            url = f"http://10.77.0.1:{server.server_address[1]}/image.bin"
            start = time.monotonic()
            fetched = shell.run([n["name"] for n in chosen], FETCH.format(url=url), 600)
            http_time = time.monotonic() - start
            if not fetched.ok:
                raise SystemExit(f"http failed: {[r.error for r in fetched.values() if not r.ok]}")
            first.setdefault("chain", chain_time)
            first.setdefault("http", http_time)
            print(
                f"{count:>3} {chain_time:>8.2f} {size / chain_time / link_bytes:>8.2f} "
                f"{chain_time / first['chain']:>10.2f} {http_time:>8.2f} {size / http_time / link_bytes:>7.2f} "
                f"{http_time / first['http']:>10.2f} {http_time / chain_time:>11.2f}"
            )
        server.shutdown()
    print(
        "\nE counts the whole operation (agents started over SSH, the stream, the reports); "
        "the HTTP fetches start over SSH too."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
