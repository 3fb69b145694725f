"""URL images (issue 18, audit F7): only under a prefix the site allows, never from loopback or a
node's BMC or management address, no redirects, under the size cap, and every failure told in the
same words.

A site's image server is never on loopback, and loopback is always refused; so the allowed cases run
in a network namespace of their own, where one end of a veth pair holds 192.0.2.10 (TEST-NET-1) and a
real HTTP server (http.server) listens on it. ``kasched env add`` (direct mode, the same reading as
kaschedd's) runs inside that namespace: no test hook weakens the address check. The loopback
refusals through the API are in tests/test_environments.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
ADDRESS, PORT, CLOSED = "192.0.2.10", 8080, 8081
CAP = 4096
SERVER = """
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        routes = {"/img/ok.raw": (200, b"x" * 1000), "/img/big.raw": (200, b"y" * (int(sys.argv[2]) + 1)),
                  "/img/secret": (401, b"auth"), "/img/moved.raw": (302, b"")}
        status, body = routes.get(self.path, (404, b"no"))
        self.send_response(status)
        if status == 302:
            self.send_header("Location", "/img/ok.raw")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], 8080), Handler).serve_forever()
"""


class Namespace:
    def __init__(self, work: Path) -> None:
        self.name = f"ksf-url-{os.getpid()}"
        self.work = work
        self.server: subprocess.Popen[bytes] | None = None

    def up(self) -> None:
        for command in (
            ["ip", "netns", "add", self.name],
            ["ip", "-n", self.name, "link", "set", "lo", "up"],
            ["ip", "-n", self.name, "link", "add", "v0", "type", "veth", "peer", "name", "v1"],
            ["ip", "-n", self.name, "addr", "add", f"{ADDRESS}/24", "dev", "v0"],
            ["ip", "-n", self.name, "link", "set", "v0", "up"],
            ["ip", "-n", self.name, "link", "set", "v1", "up"],
        ):
            subprocess.run(command, check=True, capture_output=True)
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", SERVER, ADDRESS, str(CAP)]
        )
        for _ in range(100):
            probe = self.run_python(f"import socket; socket.create_connection(('{ADDRESS}', {PORT}), 1)")
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError("the test HTTP server did not start")

    def down(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)

    def run_python(self, code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.name, sys.executable, "-c", code], capture_output=True,
                              text=True, timeout=60)  # fmt: skip

    def kasched(self, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/sbin:/usr/bin:/bin", "KASCHED_CONFIG": str(config), "KASCHED_DIRECT": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}  # fmt: skip
        return subprocess.run(["ip", "netns", "exec", self.name, sys.executable, "-m", "kasched", *args],
                              capture_output=True, text=True, env=env, timeout=120)  # fmt: skip


@pytest.fixture(scope="module")
def netns() -> Iterator[Namespace]:
    work = Path(tempfile.mkdtemp(prefix="kasched-url-"))
    namespace = Namespace(work)
    try:
        namespace.up()
        yield namespace
    finally:
        namespace.down()
        shutil.rmtree(work, ignore_errors=True)


def site(netns: Namespace, name: str, allow: list[str]) -> Path:
    config = netns.work / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"site": name, "state_dir": str(netns.work / name), "image_max_size": CAP,
                                      "admin_group": "kasched-test-admins", "image_url_allow": allow}))  # fmt: skip
    return config


def add(netns: Namespace, config: Path, url: str) -> subprocess.CompletedProcess[str]:
    description = netns.work / "url.yaml"
    description.write_text(f"name: fromurl\nimage: {{file: '{url}', kind: raw}}\n")
    return netns.kasched(config, "env", "add", str(description))


def one_line(done: subprocess.CompletedProcess[str], text: str) -> str:
    assert done.returncode != 0 and text in done.stderr, (done.returncode, done.stdout, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip()


def test_an_allowed_url_is_copied_into_the_store(netns: Namespace) -> None:
    config = site(netns, "ok", [f"http://{ADDRESS}:{PORT}/img/"])
    added = add(netns, config, f"http://{ADDRESS}:{PORT}/img/ok.raw")
    assert added.returncode == 0 and "1000 bytes" in added.stdout, added.stderr
    stored = list((netns.work / "ok" / "images" / "store").iterdir())
    assert [p.read_bytes() for p in stored] == [b"x" * 1000]


def test_refused_urls(netns: Namespace) -> None:
    prefix = f"http://{ADDRESS}:{PORT}/img/"
    config = site(netns, "refusals", [prefix, f"http://{ADDRESS}:{CLOSED}/img/", f"http://localhost:{PORT}/img/"])
    one_line(add(netns, config, f"http://{ADDRESS}:{PORT}/other/ok.raw"), "is not under a URL prefix the site allows")
    one_line(add(netns, config, f"http://{ADDRESS}:{PORT}/img/../other"), "is not under a URL prefix the site allows")
    # an allowed prefix whose host is loopback: refused by the address check, before any connection
    one_line(add(netns, config, f"http://localhost:{PORT}/img/ok.raw"), "its host's address is refused")
    # a redirect is not followed, a body over the cap is not kept: the same words as any failure
    urls = {
        "redirect": f"{prefix}moved.raw",
        "over the cap": f"{prefix}big.raw",
        "404": f"{prefix}nothere.raw",
        "401": f"{prefix}secret",
        "closed port": f"http://{ADDRESS}:{CLOSED}/img/ok.raw",
    }
    texts = {what: one_line(add(netns, config, url), "cannot fetch") for what, url in urls.items()}
    shapes = {text.replace(urls[what], "URL") for what, text in texts.items()}
    assert shapes == {"kasched: error: image URL URL: cannot fetch"}, texts
    assert all(
        not any(word in text for word in ("401", "404", "302", "refused", "Connection")) for text in texts.values()
    )
    assert not list((netns.work / "refusals" / "images" / "store").glob("*"))


def test_a_nodes_bmc_address_is_never_fetched(netns: Namespace) -> None:
    config = site(netns, "bmc", [f"http://{ADDRESS}:{PORT}/img/"])
    inventory = netns.work / "inventory.yaml"
    inventory.write_text(yaml.safe_dump({"site": "bmc", "clusters": [{"name": "c", "nodes": [
        {"name": "n1", "mac": "52:54:00:00:00:01", "ip": "10.9.0.1", "bmc": {"address": ADDRESS, "credentials": "x"}}]}]}))  # fmt: skip
    imported = netns.kasched(config, "nodes", "import", str(inventory))
    assert imported.returncode == 0, imported.stderr
    one_line(add(netns, config, f"http://{ADDRESS}:{PORT}/img/ok.raw"), "its host's address is refused")
